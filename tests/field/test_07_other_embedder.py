"""Field case 7: an index built with one 384-dimension embedder, a different 384-dimension embedder
configured.

Expected: a clear refusal naming both embedders and telling the user to rebuild; nothing is
searched or generated with vectors from two different spaces.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from field_helpers import run_bedside, snapshot

pytest_plugins = ["field_support"]


@pytest.fixture(scope="module")
def other_embedder_dir(tmp_path_factory, embedder_path) -> Path:
    """The embedded MiniLM with CLS pooling instead of mean pooling: 384 dimensions, other vectors.

    Every file but the pooling config is a symbolic link, so the 90 MB of weights are not copied.
    """
    source = Path(embedder_path)
    folder = tmp_path_factory.mktemp("embedder") / "minilm-cls-pooling"
    for path in source.rglob("*"):
        target = folder / path.relative_to(source)
        if path.is_dir():
            target.mkdir(parents=True, exist_ok=True)
        elif path.name != "config.json" or path.parent.name != "1_Pooling":
            target.parent.mkdir(parents=True, exist_ok=True)
            target.symlink_to(path)
    pooling = json.loads((source / "1_Pooling" / "config.json").read_text())
    pooling.update(pooling_mode_cls_token=True, pooling_mode_mean_tokens=False)
    (folder / "1_Pooling" / "config.json").write_text(json.dumps(pooling))
    return folder


@pytest.mark.parametrize("command", ["search", "ask"])
def test_other_embedder_rejected(command, isolated, demo_index_copy, other_embedder_dir, embedder):
    from assistant import models

    # the two embedders share a dimension but not a vector space
    other = models.load_embedder(str(other_embedder_dir), "cpu")
    text = "potassium above 6.5 with ECG changes"
    vectors = [e.encode([text], normalize_embeddings=True)[0] for e in (embedder, other)]
    assert len(vectors[0]) == len(vectors[1]) == 384
    assert float(vectors[0] @ vectors[1]) < 0.99
    before = snapshot(demo_index_copy)

    rejected = run_bedside(command, "potassium above 6.5 with ECG changes", "--index", demo_index_copy,
                          "--embedder", other_embedder_dir, "--dtype", "float32", "--device", "cpu")

    assert rejected.status == 1, rejected.stderr
    assert rejected.stdout == ""
    line = rejected.error_line()
    assert "'all-MiniLM-L6-v2 (embedded)'" in line
    assert f"'{other_embedder_dir}'" in line
    assert "384 dims" in line
    assert "bedside index rebuild" in line
    assert snapshot(demo_index_copy) == before
    assert not (isolated / "audit.db").exists()
