"""Bad files and bad queries: each is a clear one-line error naming the input, and nothing is lost."""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

import pytest
from conftest import DEMO_CORPUS, SHARED_DATA, run_cli

from assistant.cli import main
from assistant.corpus import load_corpus, load_file
from assistant.errors import CorpusError

GOOD_DOCS = ["nephrology-hyperkalaemia.md", "oncology-febrile-neutropenia.md"]


@pytest.fixture
def clean_env(tmp_path, monkeypatch):
    """Run in-process commands from an empty folder with no BEDSIDE_* settings inherited."""
    for name in list(os.environ):
        if name.startswith("BEDSIDE_") and name not in {"BEDSIDE_SHARED_DATA", "BEDSIDE_REQUIRE_SHARED_DATA"}:
            monkeypatch.delenv(name)
    monkeypatch.setenv("BEDSIDE_AUDIT_DB", str(tmp_path / "audit.db"))
    monkeypatch.chdir(tmp_path)
    return tmp_path


def snapshot(folder: Path) -> dict[str, str]:
    """sha256 of every file under `folder`, so a test can show nothing was written."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def error_line(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if line.startswith("bedside: error:")]
    assert len(lines) == 1, stderr
    return lines[0]


# bad files

def write_bad_files(folder: Path) -> dict[str, Path]:
    folder.mkdir(parents=True, exist_ok=True)
    files = {
        "latin-1 text": folder / "latin1.txt",
        "latin-1 markdown": folder / "latin1.md",
        "corrupt pdf": folder / "corrupt.pdf",
        "malformed xml": folder / "malformed.xml",
        "empty markdown": folder / "empty.md",
        "empty text": folder / "empty.txt",
        "empty html": folder / "empty.html",
        "empty pdf": folder / "empty.pdf",
        "empty xml": folder / "empty.xml",
        "empty jsonl": folder / "empty.jsonl",
        "bad front matter": folder / "front.md",
    }
    files["latin-1 text"].write_bytes("Caf\u00e9 au lait\n".encode("latin-1"))
    files["latin-1 markdown"].write_bytes("---\ntitle: Na\u00efve\n---\nbody\n".encode("latin-1"))
    files["corrupt pdf"].write_bytes(b"%PDF-1.4\n1 0 obj << /Type /Catalog garbage\n")
    files["malformed xml"].write_text("<Document><QAPairs><QAPair>unclosed", encoding="utf-8")
    for key in ("empty markdown", "empty text", "empty html", "empty pdf", "empty xml", "empty jsonl"):
        files[key].write_bytes(b"")
    files["bad front matter"].write_text("---\ntitle: [unclosed\n---\nbody\n", encoding="utf-8")
    return files


def test_each_bad_file_is_one_line_corpus_error(tmp_path):
    files = write_bad_files(tmp_path)

    for kind, path in files.items():
        with pytest.raises(CorpusError) as caught:
            load_file(path)
        message = str(caught.value)
        assert str(path) in message, kind
        assert "\n" not in message, kind

    assert "not valid UTF-8 (byte 0xe9" in str(pytest.raises(CorpusError, load_file, files["latin-1 text"]).value)
    assert "not a readable PDF" in str(pytest.raises(CorpusError, load_file, files["corrupt pdf"]).value)
    assert "not well-formed XML" in str(pytest.raises(CorpusError, load_file, files["malformed xml"]).value)


def test_truncated_real_pdf_rejected(tmp_path, caplog):
    source = SHARED_DATA / "guidelines" / "cdc_outpatient_infection_prevention.pdf"
    if not source.exists():
        pytest.skip("shared guideline PDF is absent")
    data = source.read_bytes()
    path = tmp_path / "half.pdf"
    path.write_bytes(data[: len(data) // 2])

    with pytest.raises(CorpusError, match="is not a readable PDF") as caught:
        load_file(path)

    assert str(path) in str(caught.value)
    # pypdf's per-object repair warnings (thousands for a cut file) stay out of the log
    assert len(caplog.records) < 5


def test_corpus_with_bad_file_loads_the_rest(tmp_path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for name in GOOD_DOCS:
        shutil.copy(DEMO_CORPUS / name, corpus / name)
    (corpus / "broken.txt").write_bytes(b"\xff\xfe bad bytes")

    report = load_corpus([corpus])

    assert sorted(d.doc_id for d in report.documents) == sorted(Path(n).stem for n in GOOD_DOCS)
    assert len(report.problems) == 1
    where, reason = report.problems[0]
    assert where == str(corpus / "broken.txt")
    assert "not valid UTF-8" in reason


def test_rebuild_cli_skips_bad_file(tmp_path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for name in GOOD_DOCS:
        shutil.copy(DEMO_CORPUS / name, corpus / name)
    (corpus / "broken.xml").write_text("<doc><qaPairs>", encoding="utf-8")
    (corpus / "extra.jsonl").write_text(
        '{"id": "extra-note", "title": "Extra", "text": "Check lactate.", "source": "ward"}\n{"id": \n',
        encoding="utf-8")
    index = tmp_path / "index"

    result = run_cli("index", "rebuild", "--corpus", str(corpus), "--index", str(index), "--no-progress",
                     cwd=tmp_path)

    assert result.returncode == 0, result.stderr
    skipped = [line for line in result.stderr.splitlines() if line.startswith("bedside: skipped")]
    assert len(skipped) == 2
    assert "broken.xml" in skipped[0]
    assert "not well-formed XML" in skipped[0]
    assert f"{corpus / 'extra.jsonl'}:2: invalid JSON" in skipped[1]
    assert "3 documents (3 added" in result.stdout
    assert "2 bad files or lines skipped" in result.stdout


def test_rebuild_with_only_bad_files_keeps_index(demo_index_copy, tmp_path, clean_env, capsys):
    corpus = tmp_path / "all-bad"
    write_bad_files(corpus)
    before = snapshot(demo_index_copy)

    status = main(["index", "rebuild", "--corpus", str(corpus), "--index", str(demo_index_copy), "--no-progress"])

    assert status == 1
    line = error_line(capsys.readouterr().err)
    assert "no documents could be loaded" in line
    assert "left unchanged" in line
    assert snapshot(demo_index_copy) == before


# bad queries

BAD_QUERIES = {
    "empty": ("", "the query is empty"),
    "whitespace": (" \t\n ", "the query is empty"),
    "100 kB": ("dose " * 20_000, "characters long; the limit is"),
    "control character": ("potassium\x07 dose", "control character U+0007"),
}


@pytest.mark.parametrize("command", ["search", "ask"])
def test_bad_queries_rejected(command, demo_index_copy, clean_env, capsys):
    before = snapshot(demo_index_copy)

    for name, (query, expected) in BAD_QUERIES.items():
        status = main([command, query, "--index", str(demo_index_copy)])
        line = error_line(capsys.readouterr().err)
        assert status == 1, name
        assert expected in line, name
        assert len(line) < 300, name

    assert snapshot(demo_index_copy) == before
    assert not (clean_env / "audit.db").exists()


def test_bad_query_through_real_cli(demo_index_copy, tmp_path):
    result = run_cli("search", "   ", "--index", str(demo_index_copy), cwd=tmp_path)

    assert result.returncode == 1
    assert result.stdout == ""
    assert result.stderr.strip() == "bedside: error: the query is empty; type a question or search terms"


def test_bad_query_in_queries_file_names_line(demo_index_copy, clean_env, capsys):
    queries = clean_env / "queries.txt"
    queries.write_text("hyperkalaemia treatment\n\n" + "x" * 5000 + "\n", encoding="utf-8")

    status = main(["search", "--queries", str(queries), "--index", str(demo_index_copy)])

    assert status == 1
    line = error_line(capsys.readouterr().err)
    assert f"{queries}:3" in line
    assert "5,000 characters" in line


@pytest.mark.parametrize("command", ["search", "ask"])
def test_missing_index_says_rebuild(command, clean_env, capsys):
    status = main([command, "what dose of insulin?", "--index", str(clean_env / "nowhere")])

    assert status == 1
    line = error_line(capsys.readouterr().err)
    assert "no index found in" in line
    assert "nowhere" in line
    assert "`bedside index rebuild --index" in line


@pytest.mark.parametrize("command", ["search", "ask"])
def test_bad_since_date(command, demo_index_copy, clean_env, capsys):
    for since in ("2024-13-01", "yesterday", "2024-01-01x"):
        status = main([command, "potassium", "--since", since, "--index", str(demo_index_copy)])

        assert status == 1, since
        line = error_line(capsys.readouterr().err)
        assert f"'{since}'" in line
        assert "--since" in line
        assert "YYYY-MM-DD" in line


@pytest.mark.parametrize("command", ["search", "ask"])
def test_unknown_specialty(command, demo_index_copy, clean_env, capsys):
    status = main([command, "potassium", "--specialty", "cardiologgy", "--index", str(demo_index_copy)])

    assert status == 1
    line = error_line(capsys.readouterr().err)
    assert "'cardiologgy'" in line
    assert "cardiology" in line
    assert "nephrology" in line


def test_search_top_k_zero_rejected(demo_index_copy, clean_env, capsys):
    status = main(["search", "potassium", "--top-k", "0", "--index", str(demo_index_copy)])

    assert status == 1
    assert "--top-k 0 is invalid" in error_line(capsys.readouterr().err)
