"""Field case 6: `kill -9` during the index save, or a metadata file truncated to half.

Expected: start-up detects the mismatch (checksums, counts) and serves the previous version, or
refuses when there is none; it never serves a chunk under another document's name. The next
rebuild removes what the crash left behind.
"""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys

import pytest
from conftest import build_index
from field_helpers import REPO, copy_demo_documents, run_bedside
from test_index_store import assert_consistent, current_folder

pytest_plugins = ["field_support"]

NAMES = [
    "cardiology-hypertension-management.md",
    "nephrology-acute-kidney-injury.md",
    "oncology-febrile-neutropenia.md",
]
REMOVED = "oncology-febrile-neutropenia"

# Removes REMOVED through IndexStore.remove_documents (the `bedside index remove` path, which embeds
# nothing) and SIGKILLs itself at the named point of the save.
KILLER = """
import os, signal, sys
from pathlib import Path

import assistant.indexing.store as store

point, root, doc_id = sys.argv[1:4]


def die():
    os.kill(os.getpid(), signal.SIGKILL)


if point == "artifacts":
    # vectors, ids and FAISS are written, the chunk table too, but no manifest yet
    write_chunks = store._write_chunks_db

    def write_chunks_then_die(path, chunks):
        write_chunks(path, chunks)
        die()

    store._write_chunks_db = write_chunks_then_die
elif point == "switch":
    # the finished version folder is renamed into place, but CURRENT still names the old one
    write_text = store.atomic_write_text

    def die_at_current(path, text):
        if Path(path).name == "CURRENT":
            die()
        write_text(path, text)

    store.atomic_write_text = die_at_current
store.IndexStore(Path(root)).remove_documents([doc_id])
"""


@pytest.fixture(scope="module")
def built(tmp_path_factory, embedder, embedder_info):
    """A three-document corpus and its index with two versions (the second adds one line)."""

    from assistant.corpus import load_corpus

    root = tmp_path_factory.mktemp("case-06")
    corpus = copy_demo_documents(root / "corpus", NAMES)
    build_index(root / "index", load_corpus([corpus]).documents, embedder, embedder_info)
    first = (root / "index" / "CURRENT").read_text().strip()
    edited = corpus / NAMES[0]
    edited.write_text(edited.read_text() + "\nRecheck blood pressure within four weeks.\n")
    build_index(root / "index", load_corpus([corpus]).documents, embedder, embedder_info)
    return corpus, root / "index", first


@pytest.fixture
def work(built, isolated):
    corpus, index, first = built
    shutil.copytree(corpus, isolated / "corpus")
    shutil.copytree(index, isolated / "index")
    return isolated / "corpus", isolated / "index", first


def assert_hits_under_own_names(index, corpus, embedder, embedder_info, expected_version):
    from assistant.corpus import load_corpus
    from assistant.indexing import IndexStore
    from assistant.retrieval import Retriever

    documents = {d.doc_id: " ".join(d.text.split()) for d in load_corpus([corpus]).documents}
    loaded = IndexStore(index).open(embedder_info)
    try:
        assert loaded.version == expected_version
        for query in ("fever after chemotherapy", "blood pressure target", "creatinine rise"):
            for hit in Retriever(loaded, embedder).search(query, top_k=10):
                assert hit.chunk_id.split("#")[0] == hit.doc_id
                # every line of the chunk is in the document it is cited under
                assert all(" ".join(line.split()) in documents[hit.doc_id] for line in hit.text.splitlines())
    finally:
        loaded.close()


@pytest.mark.parametrize("point", ["artifacts", "switch"])
def test_kill_during_save_keeps_serving_version(point, work, embedder, embedder_info):
    corpus, index, _ = work
    serving = (index / "CURRENT").read_text().strip()

    killed = subprocess.run([sys.executable, "-c", KILLER, point, str(index), REMOVED], cwd=REPO,
                            capture_output=True, text=True, timeout=300)

    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert (index / "CURRENT").read_text().strip() == serving
    assert_hits_under_own_names(index, corpus, embedder, embedder_info, serving)
    found = run_bedside("search", "fever after chemotherapy", "--index", index)
    assert found.status == 0, found.stderr
    assert REMOVED in found.stdout

    # the next write clears the unfinished build and any version CURRENT never named
    removed = run_bedside("index", "remove", REMOVED, "--index", index)
    assert removed.status == 0, removed.stderr
    versions = sorted(p.name for p in (index / "versions").iterdir())
    assert versions == sorted([serving, (index / "CURRENT").read_text().strip()])
    assert_consistent(index)


@pytest.mark.parametrize("artifact", ["chunks.sqlite", "manifest.json", "ids.npy"])
def test_truncated_metadata_falls_back(artifact, work, embedder, embedder_info):
    corpus, index, first = work
    damaged = current_folder(index) / artifact
    damaged.write_bytes(damaged.read_bytes()[: damaged.stat().st_size // 2])

    # the previous version matches the corpus before the edit, so compare against that text
    original = corpus / NAMES[0]
    original.write_text(original.read_text().replace("\nRecheck blood pressure within four weeks.\n", ""))
    assert_hits_under_own_names(index, corpus, embedder, embedder_info, first)
    found = run_bedside("search", "blood pressure target", "--index", index, "--json")
    assert found.status == 0, found.stderr


def test_truncated_only_version_refused(work, embedder_info):
    from assistant.errors import IndexStoreError
    from assistant.indexing import IndexStore

    _, index, first = work
    shutil.rmtree(index / "versions" / first)
    damaged = current_folder(index) / "chunks.sqlite"
    damaged.write_bytes(damaged.read_bytes()[: damaged.stat().st_size // 2])

    with pytest.raises(IndexStoreError, match="does not match its checksum") as caught:
        IndexStore(index).open(embedder_info)
    assert "bedside index rebuild" in str(caught.value)
    refused = run_bedside("search", "blood pressure target", "--index", index)
    assert refused.status == 1
    assert "no previous version to fall back to" in refused.error_line()
