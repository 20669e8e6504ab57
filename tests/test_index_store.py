"""The versioned index store: incremental rebuilds, deletes, crashes, corruption, rollback and embedder checks."""

from __future__ import annotations

import json
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import DEMO_CORPUS, build_index, make_chunker, run_cli

from assistant.cli import main
from assistant.corpus import load_corpus
from assistant.errors import IndexStoreError
from assistant.indexing import IndexStore
from assistant.retrieval import Retriever

SMALL_CORPUS = [
    "cardiology-atrial-fibrillation-anticoagulation.md",
    "endocrinology-hypoglycaemia.md",
    "infectious-disease-urinary-tract-infection.md",
    "nephrology-hyperkalaemia.md",
    "oncology-tumour-lysis-syndrome.md",
    "pulmonology-asthma-stepwise-therapy.md",
]
EDITED = "endocrinology-hypoglycaemia"
DELETED = "oncology-tumour-lysis-syndrome"


@pytest.fixture(scope="module")
def base(tmp_path_factory, embedder, embedder_info) -> tuple[Path, Path]:
    """A six-document corpus folder and its index (one version), built once; tests copy both.

    The corpus is loaded through the relative path `corpus`, so each document's source (part of its
    content hash) is the same in every test's copy and an unchanged copy re-embeds nothing.
    """
    root = tmp_path_factory.mktemp("store-base")
    (root / "corpus").mkdir()
    for name in SMALL_CORPUS:
        shutil.copy(DEMO_CORPUS / name, root / "corpus" / name)
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(root)
        build_index(root / "index", load_corpus([Path("corpus")]).documents, embedder, embedder_info)
    return root / "corpus", root / "index"


@pytest.fixture
def work(base, tmp_path, monkeypatch) -> tuple[Path, Path]:
    """Copies of the base corpus and index; the test runs in their folder and names the corpus relatively."""
    corpus, index = base
    shutil.copytree(corpus, tmp_path / "corpus")
    shutil.copytree(index, tmp_path / "index")
    monkeypatch.chdir(tmp_path)
    return Path("corpus"), tmp_path / "index"


def rebuild(corpus: Path, index: Path, embedder, embedder_info, **kwargs):
    return build_index(index, load_corpus([corpus]).documents, embedder, embedder_info, **kwargs)


def current_folder(index: Path) -> Path:
    return index / "versions" / (index / "CURRENT").read_text().strip()


def chunk_rows(index: Path) -> dict[str, str]:
    """chunk_id -> doc_id of the serving version, read straight from its SQLite file."""
    with sqlite3.connect(current_folder(index) / "chunks.sqlite") as db:
        return dict(db.execute("SELECT chunk_id, doc_id FROM chunks").fetchall())


def assert_consistent(index: Path) -> int:
    """Vectors, ids and metadata rows agree one to one; returns the chunk count."""
    import faiss

    folder = current_folder(index)
    dense = faiss.read_index(str(folder / "dense.faiss"))
    ids = np.load(folder / "ids.npy")
    with sqlite3.connect(folder / "chunks.sqlite") as db:
        rows = db.execute("SELECT int_id FROM chunks").fetchall()
    manifest = json.loads((folder / "manifest.json").read_text())
    assert dense.ntotal == len(ids) == len(rows) == manifest["chunks"]
    assert set(faiss.vector_to_array(dense.id_map).tolist()) == {r[0] for r in rows} == set(ids.tolist())
    assert np.load(folder / "vectors.npy").shape == (len(ids), manifest["embedder"]["dimension"])
    return len(rows)


def edit_document(corpus: Path) -> None:
    path = corpus / f"{EDITED}.md"
    path.write_text(path.read_text(encoding="utf-8") + "\nRecheck capillary glucose 15 minutes after treatment.\n",
                    encoding="utf-8")


# incremental rebuilds

def test_rebuild_twice_reuses_everything(work, embedder, embedder_info):
    corpus, index = work
    first_rows = chunk_rows(index)

    summary = rebuild(corpus, index, embedder, embedder_info)

    assert summary.chunks == len(first_rows)
    assert summary.embedded_chunks == 0
    assert (summary.unchanged, summary.added, summary.changed, summary.removed) == (6, 0, 0, 0)
    assert chunk_rows(index) == first_rows
    assert assert_consistent(index) == len(first_rows)
    assert len([p for p in (index / "versions").iterdir()]) == 2


def test_edit_reembeds_only_that_document(work, embedder, embedder_info):
    corpus, index = work
    before = chunk_rows(index)
    edit_document(corpus)

    summary = rebuild(corpus, index, embedder, embedder_info)

    after = chunk_rows(index)
    edited_chunks = [c for c, doc in after.items() if doc == EDITED]
    assert (summary.changed, summary.added, summary.removed, summary.unchanged) == (1, 0, 0, 5)
    assert summary.embedded_chunks == len(edited_chunks)
    assert {c for c, d in after.items() if d != EDITED} == {c for c, d in before.items() if d != EDITED}
    assert set(edited_chunks) != {c for c, d in before.items() if d == EDITED}
    assert_consistent(index)


def exact_text_hits(index: Path, embedder, embedder_info) -> list[tuple[str, str]]:
    """(expected doc, top hit's doc) for a search with the exact text of each document's first chunk."""
    loaded = IndexStore(index).open(embedder_info)
    retriever = Retriever(loaded, embedder)
    pairs = []
    with sqlite3.connect(loaded.folder / "chunks.sqlite") as db:
        firsts = db.execute("SELECT doc_id, text FROM chunks WHERE position = 0 ORDER BY doc_id").fetchall()
    for doc_id, text in firsts:
        pairs.append((doc_id, retriever.search(text, top_k=3)[0].doc_id))
    loaded.close()
    return pairs


def test_delete_removes_chunks_and_search_still_exact(work, embedder, embedder_info):
    corpus, index = work
    (corpus / f"{DELETED}.md").unlink()

    summary = rebuild(corpus, index, embedder, embedder_info)

    assert (summary.removed, summary.unchanged, summary.embedded_chunks) == (1, 5, 0)
    assert DELETED not in chunk_rows(index).values()
    assert_consistent(index)
    pairs = exact_text_hits(index, embedder, embedder_info)
    assert len(pairs) == 5
    assert all(expected == top for expected, top in pairs), pairs


def test_index_remove_command(work, embedder, embedder_info, tmp_path):
    _, index = work

    result = run_cli("index", "remove", DELETED, "--index", str(index), cwd=tmp_path)

    assert result.returncode == 0, result.stderr
    assert "1 removed" in result.stdout
    assert "0 embedded" in result.stdout
    assert DELETED not in chunk_rows(index).values()
    assert_consistent(index)
    pairs = exact_text_hits(index, embedder, embedder_info)
    assert all(expected == top for expected, top in pairs), pairs


def test_index_remove_unknown_document(work, capsys):
    _, index = work
    before = (index / "CURRENT").read_text()

    status = main(["index", "remove", "no-such-guideline", "--index", str(index)])

    assert status == 1
    assert "'no-such-guideline'" in capsys.readouterr().err
    assert (index / "CURRENT").read_text() == before


# crashes and corruption

def test_kill_during_rebuild_keeps_previous_version(demo_index_copy, tmp_path, embedder, embedder_info):
    index = demo_index_copy
    serving = (index / "CURRENT").read_text()
    command = [sys.executable, "-m", "assistant.cli", "index", "rebuild", "--full", "--corpus", str(DEMO_CORPUS),
               "--index", str(index), "--no-progress", "-q"]
    process = subprocess.Popen(command, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 300
        while not list((index / "versions").glob(".building-*")):
            assert process.poll() is None, process.stderr.read().decode()
            assert time.monotonic() < deadline, "the rebuild never started a build folder"
            time.sleep(0.05)
        # the build folder is made before chunking and embedding 220 chunks, so this lands mid-build
        time.sleep(0.5)
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
        process.stderr.close()

    assert process.returncode == -signal.SIGKILL
    assert list((index / "versions").glob(".building-*"))
    assert (index / "CURRENT").read_text() == serving
    result = run_cli("search", "potassium above 6.5 with ECG changes", "--index", str(index), "--json",
                     cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    hits = json.loads(result.stdout)["hits"]
    assert hits
    assert hits[0]["doc_id"] == "nephrology-hyperkalaemia"

    summary = build_index(index, load_corpus([DEMO_CORPUS]).documents, embedder, embedder_info)

    assert not list((index / "versions").glob(".building-*"))
    assert summary.embedded_chunks == 0
    assert_consistent(index)


def build_second_version(corpus: Path, index: Path, embedder, embedder_info) -> tuple[str, str]:
    first = (index / "CURRENT").read_text().strip()
    edit_document(corpus)
    second = rebuild(corpus, index, embedder, embedder_info).version
    return first, second


@pytest.mark.parametrize("artifact", ["chunks.sqlite", "ids.npy"])
def test_truncated_artifact_falls_back(artifact, work, embedder, embedder_info, caplog):
    corpus, index = work
    previous, current = build_second_version(corpus, index, embedder, embedder_info)
    target = index / "versions" / current / artifact
    data = target.read_bytes()
    target.write_bytes(data[: len(data) // 2])
    documents = {d.doc_id: " ".join(d.text.split()) for d in load_corpus([corpus]).documents}

    loaded = IndexStore(index).open(embedder_info)

    assert loaded.version == previous
    logged = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert any(current in m and artifact in m and f"serving the previous version {previous}" in m for m in logged)
    for hit in Retriever(loaded, embedder).search("insulin and glucose for high potassium", top_k=10):
        assert hit.chunk_id.split("#")[0] == hit.doc_id
        # every line of the chunk is in the document it is cited under
        assert all(" ".join(line.split()) in documents[hit.doc_id] for line in hit.text.splitlines())
    loaded.close()


def test_corrupt_only_version_raises(work, embedder_info):
    _, index = work
    target = current_folder(index) / "chunks.sqlite"
    target.write_bytes(target.read_bytes()[:1000])

    with pytest.raises(IndexStoreError, match="chunks.sqlite does not match its checksum") as caught:
        IndexStore(index).open(embedder_info)

    assert "no previous version to fall back to" in str(caught.value)
    assert "bedside index rebuild" in str(caught.value)


# info and rollback

def test_info_json_and_rollback(work, embedder, embedder_info, tmp_path):
    corpus, index = work
    previous, current = build_second_version(corpus, index, embedder, embedder_info)

    info = run_cli("index", "info", "--json", "--index", str(index), cwd=tmp_path)
    rollback = run_cli("index", "rollback", "--index", str(index), cwd=tmp_path)

    assert info.returncode == 0, info.stderr
    fields = json.loads(info.stdout)
    assert fields["version"] == current
    assert fields["previous_version"] == previous
    assert fields["documents"] == 6
    assert fields["chunks"] == assert_consistent(index)
    assert fields["embedder"] == embedder_info.name
    assert fields["built_at"].startswith("20")
    assert rollback.returncode == 0, rollback.stderr
    assert rollback.stdout.strip() == f"serving index version {previous}"
    assert (index / "CURRENT").read_text().strip() == previous
    assert IndexStore(index).read_manifest()["version"] == previous
    # the version rolled back to has no older one kept
    with pytest.raises(IndexStoreError, match="no previous version to roll back to"):
        IndexStore(index).rollback()


# embedder mismatch

@pytest.fixture(scope="module")
def perturbed_embedder_dir(tmp_path_factory, embedder_path) -> Path:
    """A copy of the embedded MiniLM with one weight nudged: same name and dimension, other vectors."""
    from safetensors.torch import load_file, save_file

    folder = tmp_path_factory.mktemp("embedder") / "minilm-perturbed"
    shutil.copytree(embedder_path, folder)
    weights = load_file(folder / "model.safetensors")
    weights["embeddings.LayerNorm.bias"] = weights["embeddings.LayerNorm.bias"] + 0.01
    save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})
    return folder


def test_same_dimension_other_embedder_refused(demo_index_dir, perturbed_embedder_dir, embedder_info, tmp_path):
    from assistant import models
    from assistant.answer.pipeline import embedder_info as describe

    other = models.load_embedder(str(perturbed_embedder_dir), "cpu")
    other_info = describe(str(perturbed_embedder_dir), str(perturbed_embedder_dir), other)
    assert other_info.dimension == embedder_info.dimension
    assert other_info.fingerprint != embedder_info.fingerprint

    with pytest.raises(IndexStoreError) as caught:
        IndexStore(demo_index_dir).open(other_info)
    result = run_cli("search", "hyperkalaemia", "--index", str(demo_index_dir), "--embedder",
                     str(perturbed_embedder_dir), cwd=tmp_path)

    for message in (str(caught.value), result.stderr):
        assert "'all-MiniLM-L6-v2 (embedded)'" in message
        assert str(perturbed_embedder_dir) in message
        assert "bedside index rebuild" in message
    assert result.returncode == 1
    assert result.stdout == ""


def test_rebuild_with_other_embedder_reembeds_all(work, perturbed_embedder_dir, embedder_info):
    from assistant import models
    from assistant.answer.pipeline import embedder_info as describe

    corpus, index = work
    other = models.load_embedder(str(perturbed_embedder_dir), "cpu")
    other_info = describe(str(perturbed_embedder_dir), str(perturbed_embedder_dir), other)

    summary = IndexStore(index).rebuild(load_corpus([corpus]).documents, make_chunker(other), other, other_info,
                                        {"test": True})

    assert summary.embedded_chunks == summary.chunks
    with pytest.raises(IndexStoreError, match="was built with embedder"):
        IndexStore(index).open(embedder_info)
