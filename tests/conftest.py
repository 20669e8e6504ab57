"""Shared fixtures: real models loaded once per session, a demo index built once, shared data paths.

Tests that need `../shared/data` skip with a reason when it is absent; with
BEDSIDE_REQUIRE_SHARED_DATA=1 (set by .ci/run) that skip becomes a failure instead.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("BEDSIDE_SHARED_DATA", REPO.parent / "shared" / "data"))
DEMO_CORPUS = REPO / "corpora" / "demo"
DEMO_QUESTIONS = REPO / "corpora" / "questions" / "demo_questions.jsonl"


def need_shared(*parts: str) -> Path:
    """Return a path under the shared data folder, or skip (fail under CI) when it is missing."""
    path = SHARED_DATA.joinpath(*parts)
    if not path.exists():
        message = f"shared data {path} is absent"
        if os.environ.get("BEDSIDE_REQUIRE_SHARED_DATA") == "1":
            pytest.fail(message + " and BEDSIDE_REQUIRE_SHARED_DATA=1")
        pytest.skip(message)
    return path


@pytest.fixture(scope="session")
def embedder_path() -> str:
    from assistant import models

    return models.resolve_embedder("")


@pytest.fixture(scope="session")
def embedder(embedder_path):
    from assistant import models

    return models.load_embedder(embedder_path, "cpu")


@pytest.fixture(scope="session")
def embedder_info(embedder_path, embedder):
    from assistant.answer.pipeline import embedder_info as describe

    return describe("", embedder_path, embedder)


@pytest.fixture(scope="session")
def base_model():
    """(model, tokenizer) of the embedded SmolLM2-135M in fp32, so greedy outputs are comparable."""
    from assistant import models

    return models.load_base_model(models.resolve_model(""), "float32", "cpu")


@pytest.fixture(scope="session")
def model_spec():
    from assistant import models

    return models.resolve_model("")


def make_chunker(embedder, chunk_tokens: int = 200, overlap: int = 32):
    from assistant.chunking import Chunker

    return Chunker(embedder.tokenizer, chunk_tokens, overlap, embedder.max_seq_length)


def build_index(root: Path, documents, embedder, embedder_info, **kwargs):
    from assistant.indexing import IndexStore

    return IndexStore(root).rebuild(documents, make_chunker(embedder), embedder, embedder_info,
                                    {"test": True}, **kwargs)


@pytest.fixture(scope="session")
def demo_index_dir(tmp_path_factory, embedder, embedder_info) -> Path:
    """A demo-corpus index built once per session; tests must not modify it (copy it first)."""
    from assistant.corpus import load_corpus

    root = tmp_path_factory.mktemp("demo-index")
    report = load_corpus([DEMO_CORPUS])
    assert not report.problems, report.problems
    build_index(root, report.documents, embedder, embedder_info)
    return root


@pytest.fixture
def demo_index_copy(demo_index_dir, tmp_path) -> Path:
    target = tmp_path / "index"
    shutil.copytree(demo_index_dir, target)
    return target


@pytest.fixture(scope="session")
def demo_assistant(demo_index_dir, embedder, embedder_info, base_model, model_spec, tmp_path_factory):
    """An Assistant over the demo index with the fp32 base model and an audit log in a temp folder."""
    from assistant import models
    from assistant.answer.generation import LocalGenerator
    from assistant.answer.pipeline import Assistant
    from assistant.audit import AuditLog
    from assistant.config import Settings
    from assistant.indexing import IndexStore
    from assistant.retrieval import Retriever

    audit_dir = tmp_path_factory.mktemp("audit")
    settings = Settings(index_dir=demo_index_dir, audit_db=audit_dir / "audit.db", dtype="float32", device="cpu",
                        max_new_tokens=48)
    index = IndexStore(demo_index_dir).open(embedder_info)
    model, tokenizer = base_model
    generator = LocalGenerator(model, tokenizer, model_spec.display_name, models.model_fingerprint(model_spec))
    return Assistant(settings, Retriever(index, embedder), generator, audit=AuditLog(settings.audit_db))


def run_cli(*args: str, cwd: Path | None = None, env: dict | None = None, timeout: int = 600):
    """Run the real `bedside` console script in a subprocess; returns CompletedProcess with text."""
    import subprocess
    import sys

    full_env = {**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})}
    command = [sys.executable, "-m", "assistant.cli", *args]
    return subprocess.run(command, cwd=cwd or REPO, env=full_env, capture_output=True, text=True, timeout=timeout)
