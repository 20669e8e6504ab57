"""`bedside train --launcher accelerate`: two CPU processes (DDP over gloo) train one loadable adapter.

Part of the scale suite (`make test-vllm`) because two processes of SmolLM2 took 223 s on 2 CPU
cores shared with other jobs. It needs no vLLM, only accelerate, which bedside depends on.
"""

from __future__ import annotations

import json

from tests.conftest import REPO, run_cli

pytest_plugins = ["vllm_support"]

DATA = REPO / "corpora" / "training" / "cardiology.jsonl"


def test_two_process_training_writes_adapter(tmp_path):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from assistant import models
    from assistant.tuning.loading import check_adapter_files, check_base_fingerprint, check_file_hashes
    from assistant.tuning.registry import AdapterRegistry

    adapters_dir = tmp_path / "adapters"
    result = run_cli(
        "train",
        "--specialty",
        "cardiology",
        "--data",
        str(DATA),
        "--max-steps",
        "2",
        "--batch-size",
        "2",
        "--max-seq-length",
        "128",
        "--lora-r",
        "8",
        "--device",
        "cpu",
        "--no-progress",
        "--launcher",
        "accelerate",
        "--num-processes",
        "2",
        cwd=tmp_path,
        env={"BEDSIDE_ADAPTERS_DIR": str(adapters_dir)},
    )

    assert result.returncode == 0, result.stderr[-4000:]
    registry = AdapterRegistry(adapters_dir)
    entries = registry.entries()
    assert [e["name"] for e in entries] == ["cardiology-lora-v1"]
    entry = entries[0]
    folder = registry.folder(entry)
    metrics = json.loads((folder / "training.json").read_text())["metrics"]
    assert metrics["steps"] == 2
    # the same range as a single-process run: a causal-LM loss near the base's, lowered by training
    assert 0.5 < metrics["train_loss"] < 10
    assert metrics["heldout_loss"] < metrics["base_heldout_loss"]
    # the other rank's copy went to a temporary folder, so only rank 0's adapter exists
    assert sorted(p.name for p in adapters_dir.iterdir() if p.is_dir()) == ["cardiology-lora-v1"]

    spec = models.resolve_model("")
    check_adapter_files(folder)
    check_base_fingerprint(entry, models.model_fingerprint(spec))
    check_file_hashes(entry, folder)
    base = AutoModelForCausalLM.from_pretrained(models.dequantized_gguf_folder(spec), dtype=torch.float32)
    adapted = PeftModel.from_pretrained(base, str(folder))
    assert adapted.active_adapter == "default"
