"""The answer path end to end: `bedside ask --json`, `bedside search --queries`, and how settings resolve."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest
from conftest import DEMO_QUESTIONS, run_cli

from assistant.cli import main
from assistant.config import Settings, load_settings
from assistant.errors import BedsideError

ANSWER_FIELDS = {"answer", "abstained", "citations", "flags", "dropped_chunks", "model", "adapter", "index_version",
                 "timings"}
CITATION_FIELDS = {"marker", "chunk_id", "doc_id", "title", "source", "page", "section", "date", "text", "support"}
HIT_FIELDS = {"chunk_id", "doc_id", "score", "title", "source", "page", "section", "date", "text"}
MARKER = re.compile(r"\[(\d+)\]")


def in_corpus_questions(count: int) -> list[dict]:
    rows = [json.loads(line) for line in DEMO_QUESTIONS.read_text(encoding="utf-8").splitlines() if line.strip()]
    return [row for row in rows if row["in_corpus"]][:count]


def assert_markers_resolve(record: dict, prompt_chunks: list[str]) -> None:
    """Every [n] in the answer names a citation, and every citation's chunk was a numbered source in the prompt."""
    assert ANSWER_FIELDS <= set(record), ANSWER_FIELDS - set(record)
    by_marker = {c["marker"]: c for c in record["citations"]}
    for citation in record["citations"]:
        assert CITATION_FIELDS <= set(citation), CITATION_FIELDS - set(citation)
        assert prompt_chunks[citation["marker"] - 1] == citation["chunk_id"]
        assert citation["chunk_id"].split("#")[0] == citation["doc_id"]
    for number in MARKER.findall(record["answer"]):
        assert int(number) in by_marker, (number, record["answer"])


# bedside ask

def test_ask_citations_resolve_on_demo_questions(demo_assistant):
    cited = 0
    for row in in_corpus_questions(10):
        answer = demo_assistant.ask(row["question"])
        record = answer.to_dict()

        assert not record["abstained"], row["question"]
        assert_markers_resolve(record, [hit.chunk_id for hit in answer.retrieved])
        assert row["doc_id"] in {hit.doc_id for hit in answer.retrieved}, row["question"]
        cited += len(record["citations"]) > 0

    # the 135M model cites sparingly in 48 tokens; the verifier attaches sources to supported sentences
    assert cited >= 5


def test_ask_out_of_corpus_abstains(demo_assistant):
    answer = demo_assistant.ask("What is the boiling point of tungsten?").to_dict()

    assert answer["abstained"] is True
    assert answer["citations"] == []
    assert "do not cover" in answer["answer"]
    assert any(flag["type"] == "abstained" for flag in answer["flags"])


def test_ask_json_through_real_cli(demo_index_dir, tmp_path):
    question = in_corpus_questions(1)[0]

    result = run_cli("ask", question["question"], "--json", "--index", str(demo_index_dir), "--max-new-tokens", "32",
                     "--dtype", "float32", cwd=tmp_path, env={"BEDSIDE_AUDIT_DB": str(tmp_path / "audit.db")})

    assert result.returncode == 0, result.stderr
    record = json.loads(result.stdout)
    assert record["abstained"] is False
    assert_markers_resolve(record, [hit["chunk_id"] for hit in record["retrieved"]])
    assert record["index_version"] == (demo_index_dir / "CURRENT").read_text().strip()
    assert record["model"].startswith("SmolLM2-135M-Instruct")
    assert record["generation"]["max_new_tokens"] == 32
    assert (tmp_path / "audit.db").is_file()


# bedside search

def test_search_queries_file_prints_json_lines(demo_index_dir, tmp_path):
    queries = tmp_path / "queries.jsonl"
    queries.write_text(json.dumps({"query": "potassium above 6.5 with ECG changes"}) + "\n\n"
                       + json.dumps({"query": "CURB-65 score in pneumonia"}) + "\n", encoding="utf-8")

    result = run_cli("search", "--queries", str(queries), "--top-k", "3", "--index", str(demo_index_dir),
                     cwd=tmp_path)

    assert result.returncode == 0, result.stderr
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    assert [line["query"] for line in lines] == ["potassium above 6.5 with ECG changes", "CURB-65 score in pneumonia"]
    for line in lines:
        assert len(line["hits"]) == 3
        assert all(set(hit) == HIT_FIELDS for hit in line["hits"])
    assert lines[0]["hits"][0]["doc_id"] == "nephrology-hyperkalaemia"
    assert lines[1]["hits"][0]["doc_id"] == "infectious-disease-community-acquired-pneumonia"


# settings

@pytest.fixture
def settings_env(tmp_path, monkeypatch) -> Path:
    """An empty working folder and no inherited BEDSIDE_* settings."""
    for name in list(os.environ):
        if name.startswith("BEDSIDE_") and name not in {"BEDSIDE_SHARED_DATA", "BEDSIDE_REQUIRE_SHARED_DATA"}:
            monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_settings_precedence_file_env_flags(settings_env, monkeypatch):
    (settings_env / "bedside.toml").write_text('index_dir = "from-file"\ntop_k = 7\nmin_relevance = 0.3\n'
                                               'max_new_tokens = 64\n', encoding="utf-8")
    monkeypatch.setenv("BEDSIDE_TOP_K", "9")
    monkeypatch.setenv("BEDSIDE_INDEX_DIR", "from-env")
    monkeypatch.setenv("BEDSIDE_MAX_NEW_TOKENS", "80")

    settings = load_settings(None, {"index_dir": "from-flag", "max_new_tokens": None})

    assert settings.index_dir == Path("from-flag")
    assert settings.top_k == 9
    assert settings.max_new_tokens == 80
    assert settings.min_relevance == 0.3
    assert settings.chunk_tokens == Settings().chunk_tokens


def test_settings_precedence_through_cli(settings_env, monkeypatch, capsys):
    (settings_env / "bedside.toml").write_text('[bedside]\nindex_dir = "file-index"\n', encoding="utf-8")

    resolved = []
    for env, flags in [({}, []), ({"BEDSIDE_INDEX_DIR": "env-index"}, []),
                       ({"BEDSIDE_INDEX_DIR": "env-index"}, ["--index", "flag-index"])]:
        for name, value in env.items():
            monkeypatch.setenv(name, value)
        assert main(["index", "info", *flags]) == 1
        resolved.append(re.search(r"no index found in '([^']+)'", capsys.readouterr().err).group(1))

    assert resolved == ["file-index", "env-index", "flag-index"]


def test_missing_config_file(settings_env, capsys):
    status = main(["index", "info", "--config", "missing.toml"])

    assert status == 1
    err = capsys.readouterr().err.strip()
    assert err == "bedside: error: config file 'missing.toml' not found; pass an existing TOML file to --config"


def test_unknown_setting_in_config(settings_env, capsys):
    config = settings_env / "site.toml"
    config.write_text('top_k = 3\nchunk_size = 400\n', encoding="utf-8")

    status = main(["index", "info", "--config", str(config)])

    assert status == 1
    err = capsys.readouterr().err
    assert "unknown setting 'chunk_size'" in err
    assert str(config) in err
    assert "chunk_tokens" in err


@pytest.mark.parametrize(("text", "expected"), [
    ("top_k = \"many\"\n", "setting 'top_k' has invalid value 'many'"),
    ("top_k = 0\n", "top_k 0 is invalid"),
    ("min_relevance = 1.5\n", "min_relevance 1.5 is invalid"),
    ("max_new_tokens = 0\n", "max_new_tokens 0 is invalid"),
    ("top_k = [\n", "is not valid TOML"),
])
def test_invalid_setting_values(settings_env, text, expected):
    (settings_env / "bedside.toml").write_text(text, encoding="utf-8")

    with pytest.raises(BedsideError, match=re.escape(expected)):
        load_settings()


def test_invalid_environment_value(settings_env, monkeypatch):
    monkeypatch.setenv("BEDSIDE_STORE_TEXT", "perhaps")

    with pytest.raises(BedsideError, match="setting 'store_text' has invalid value 'perhaps'"):
        load_settings()
