"""Training recipes on the real base model: LoRA changes the output, artifacts round-trip exactly,
runs are deterministic, and a full fine-tune yields a plain transformers folder usable as a base."""

from __future__ import annotations

import copy
import json
import math
import os

import pytest
import torch
from conftest import run_cli

from assistant import models
from assistant.errors import BedsideError, ModelError
from assistant.tuning.data import file_sha256

pytest_plugins = ["tuning_support"]

PROBES = [
    [{"role": "user", "content": "What blood pressure confirms hypertension on home monitoring?"}],
    [{"role": "user", "content": "Which drug lowers blood pressure in older adults?"}],
]
# Merging folds B·A·scaling into each weight, so the sums run in another order and fp32 rounding
# differs. Measured on this model after 20 steps at lr 2e-3: max difference 1.4e-4 on logits of
# magnitude about 20, i.e. under 1e-5 of the largest logit. The bound allows 5e-5 of it.
MERGE_RELATIVE_TOLERANCE = 5e-5
# The reloaded adapter has bit-identical weights (checked separately), yet one run of this test
# in three gave logits that differ in the fourth decimal (magnitude about 20) from the trained model's.
# NOTE: the cause is not confirmed; CPU matrix kernels that sum in another order for other memory
# alignments of the two model copies would explain it. The bound allows 2e-5 of the largest logit.
RELOAD_RELATIVE_TOLERANCE = 2e-5


def probe_batch(tokenizer):
    ids = tokenizer.apply_chat_template(PROBES[0], add_generation_prompt=True, tokenize=True)
    ids = ids["input_ids"] if hasattr(ids, "keys") else ids
    return torch.tensor([list(ids)])


def test_lora_changes_greedy_output(trained_adapters, adapter_generator):
    from assistant.answer.generation import GenerationSettings

    name = trained_adapters["cardiology"].name
    settings = GenerationSettings(max_new_tokens=24)
    base = [adapter_generator.generate(p, None, settings) for p in PROBES]
    tuned = [adapter_generator.generate(p, name, settings) for p in PROBES]
    assert base != tuned, f"adapter output equals the base output: {tuned}"


def test_training_writes_full_record(trained_adapters, tiny_data, model_spec):
    from assistant.tuning.registry import AdapterRegistry

    result = trained_adapters["cardiology"]
    assert sorted(p.name for p in result.output.iterdir()) == [
        "adapter_config.json", "adapter_model.safetensors", "training.json"]
    record = json.loads((result.output / "training.json").read_text())
    assert record["seed"] == 0
    assert record["config"]["lora_r"] == 8
    assert record["config"]["max_steps"] == 20
    assert record["data"]["sha256"] == file_sha256(tiny_data["cardiology"])
    assert record["data"]["train_examples"] + record["data"]["heldout_examples"] == 10
    assert {"torch", "transformers", "peft", "python"} <= set(record["libraries"])
    assert record["base"]["fingerprint"] == models.model_fingerprint(model_spec)

    metrics = record["metrics"]
    assert metrics["steps"] == 20
    assert metrics["heldout_loss"] < metrics["base_heldout_loss"]
    assert metrics["heldout_perplexity"] == pytest.approx(2.718281828 ** metrics["heldout_loss"], rel=1e-3)

    entry = AdapterRegistry(result.output.parent).get(result.name)
    assert entry["status"] == "candidate"
    assert entry["files"]["adapter_model.safetensors"] == file_sha256(result.output / "adapter_model.safetensors")
    assert entry["base"]["fingerprint"] == record["base"]["fingerprint"]
    assert len(entry["router"]["centroid"]) == 384


def test_save_load_reproduces_logits(trained_adapters, base_model):
    from peft import PeftModel, get_peft_model_state_dict

    model, tokenizer = base_model
    trained = trained_adapters["cardiology"].model.eval()
    loaded = PeftModel.from_pretrained(copy.deepcopy(model), str(trained_adapters["cardiology"].output)).eval()

    # the saved weights are the trained ones, bit for bit
    trained_weights = get_peft_model_state_dict(trained)
    loaded_weights = get_peft_model_state_dict(loaded)
    assert trained_weights.keys() == loaded_weights.keys()
    assert all(torch.equal(trained_weights[key], loaded_weights[key]) for key in trained_weights)

    batch = probe_batch(tokenizer)
    with torch.inference_mode():
        before = trained(input_ids=batch).logits
        after = loaded(input_ids=batch).logits
        plain = model(input_ids=batch).logits
    difference = (before - after).abs().max().item()
    scale = after.abs().max().item()
    assert difference <= RELOAD_RELATIVE_TOLERANCE * scale, \
        f"logits before and after save/load differ by {difference:.2e} (largest logit {scale:.1f})"
    assert torch.equal(before.argmax(-1), after.argmax(-1))
    assert not torch.allclose(after, plain, atol=1e-3)

    # merged into the weights: same function up to float summation order
    merged = loaded.merge_and_unload()
    with torch.inference_mode():
        folded = merged(input_ids=batch).logits
    difference = (folded - after).abs().max().item()
    scale = after.abs().max().item()
    assert difference <= MERGE_RELATIVE_TOLERANCE * scale, \
        f"merged and unmerged logits differ by {difference:.2e} (largest logit {scale:.1f})"
    assert torch.equal(folded.argmax(-1), after.argmax(-1))


def test_training_is_deterministic(tiny_data, tmp_path):
    from safetensors.torch import load_file
    from tuning_support import train_adapter

    from assistant.config import Settings

    settings = Settings(adapters_dir=tmp_path / "adapters", dtype="float32", device="cpu")
    runs = [train_adapter(settings, tiny_data["infectious_disease"], "infectious_disease", max_steps=2,
                          lora_dropout=0.1, register=False, out=str(tmp_path / f"run{i}")) for i in range(2)]
    first, second = (load_file(run.output / "adapter_model.safetensors") for run in runs)
    assert first.keys() == second.keys()
    assert all(torch.equal(first[key], second[key]) for key in first)
    assert runs[0].metrics["heldout_loss"] == runs[1].metrics["heldout_loss"]
    assert not (tmp_path / "adapters" / "registry.json").exists()


def test_existing_output_folder_rejected(tiny_data, tmp_path):
    from tuning_support import train_adapter

    from assistant.config import Settings

    (tmp_path / "taken").mkdir()
    with pytest.raises(BedsideError, match="already exists"):
        train_adapter(Settings(adapters_dir=tmp_path), tiny_data["cardiology"], "cardiology",
                      out=str(tmp_path / "taken"))


def test_full_finetune_folder_serves_as_base(tiny_data, tmp_path, base_model, model_spec, fresh_generator):
    from transformers import AutoModelForCausalLM
    from tuning_support import train_adapter

    from assistant.config import Settings
    from assistant.tuning.loading import load_registered_adapter
    from assistant.tuning.registry import AdapterRegistry

    settings = Settings(adapters_dir=tmp_path / "adapters", dtype="float32", device="cpu")
    full = train_adapter(settings, tiny_data["cardiology"], "cardiology", method="full", max_steps=2, lr=1e-4,
                         out=str(tmp_path / "full-model"))
    full.model = None
    names = {p.name for p in full.output.iterdir()}
    assert {"config.json", "model.safetensors", "training.json", "tokenizer.json"} <= names
    assert not [n for n in names if n.endswith(models.PICKLED_WEIGHT_SUFFIXES)]
    assert not (tmp_path / "adapters" / "registry.json").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "staging folder left behind"

    # plain transformers loads it, and training changed it
    tuned = AutoModelForCausalLM.from_pretrained(str(full.output), dtype=torch.float32)
    original = dict(base_model[0].named_parameters())
    changed = [n for n, p in tuned.named_parameters() if not torch.equal(p, original[n])]
    assert len(changed) > 100

    # an adapter trained on it records its fingerprint, and the GGUF base refuses it
    adapter = train_adapter(settings, tiny_data["cardiology"], "cardiology", base=str(full.output), max_steps=2)
    adapter.model = None
    full_fingerprint = models.model_fingerprint(models.resolve_model(str(full.output)))
    assert adapter.entry["base"]["fingerprint"] == full_fingerprint
    assert full_fingerprint != models.model_fingerprint(model_spec)
    with pytest.raises(ModelError, match="trained on base model .*fingerprint"):
        load_registered_adapter(fresh_generator, AdapterRegistry(settings.adapters_dir), adapter.entry)
    assert fresh_generator.adapters == {}


def test_cli_train_reports_bad_lines_and_registers(tmp_path, tiny_data):

    data = tmp_path / "data.jsonl"
    data.write_text(tiny_data["cardiology"].read_text() + "{oops\n", encoding="utf-8")
    adapters = tmp_path / "adapters"
    env = {"BEDSIDE_ADAPTERS_DIR": str(adapters), "BEDSIDE_DTYPE": "float32", "BEDSIDE_DEVICE": "cpu",
           "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "")}
    env = {k: v for k, v in env.items() if v}
    trained = run_cli("train", "--specialty", "cardiology", "--data", str(data), "--max-steps", "1",
                      "--lora-r", "4", "--target-modules", "q_proj", "--batch-size", "2", "--no-progress",
                      "--name", "cli-cardiology", cwd=tmp_path, env=env)
    assert trained.returncode == 0, trained.stderr
    assert f"{data}:11 skipped: invalid JSON" in trained.stderr
    assert "registered as a candidate" in trained.stdout
    assert (adapters / "cli-cardiology" / "adapter_model.safetensors").is_file()

    listed = run_cli("adapters", "list", "--json", cwd=tmp_path, env=env)
    assert listed.returncode == 0, listed.stderr
    entries = json.loads(listed.stdout)
    assert [(e["name"], e["status"], e["method"]) for e in entries] == [("cli-cardiology", "candidate", "lora")]


def test_cli_train_rejects_file_without_valid_lines(tmp_path):
    """The base path does not exist, so reaching any model load would fail with another message."""

    data = tmp_path / "bad.jsonl"
    data.write_text(json.dumps({"text": "plain"}) + "\n{oops\n", encoding="utf-8")
    result = run_cli("train", "--specialty", "cardiology", "--data", str(data),
                     "--base", str(tmp_path / "no-model"), cwd=tmp_path,
                     env={"BEDSIDE_ADAPTERS_DIR": str(tmp_path / "adapters")})
    assert result.returncode == 1
    assert "has no valid examples (line 1: has neither `messages` nor `instruction`" in result.stderr
    assert "line 2: invalid JSON" in result.stderr
    assert not (tmp_path / "adapters").exists()


def test_unmatched_target_modules_rejected_in_training(tiny_data, tmp_path):
    from tuning_support import train_adapter

    from assistant.config import Settings

    settings = Settings(adapters_dir=tmp_path / "adapters", dtype="float32", device="cpu")
    with pytest.raises(BedsideError, match=r"--target-modules query_key_value matched 0 of \d+ modules"):
        train_adapter(settings, tiny_data["cardiology"], "cardiology", target_modules=["query_key_value"],
                      max_steps=1)
    assert not (tmp_path / "adapters").exists()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="QLoRA trains on a CUDA GPU only")
def test_qlora_trains_on_cuda(tiny_data, tmp_path, base_model):
    """A 4-bit QLoRA run saves a plain LoRA adapter that loads on the full-precision base."""
    pytest.importorskip("bitsandbytes")
    from peft import PeftModel
    from tuning_support import train_adapter

    from assistant.config import Settings

    settings = Settings(adapters_dir=tmp_path / "adapters", device="cuda")
    result = train_adapter(settings, tiny_data["cardiology"], "cardiology", method="qlora", max_steps=5,
                           lr=2e-3, register=False, out=str(tmp_path / "qlora"))
    result.model = None
    assert sorted(p.name for p in result.output.iterdir()) == [
        "adapter_config.json", "adapter_model.safetensors", "training.json"]
    record = json.loads((result.output / "training.json").read_text())
    assert record["method"] == "qlora"
    assert record["device"] == "cuda"
    assert record["metrics"]["steps"] == 5
    assert math.isfinite(record["metrics"]["heldout_loss"])

    model, tokenizer = base_model
    loaded = PeftModel.from_pretrained(copy.deepcopy(model), str(result.output)).eval()
    batch = probe_batch(tokenizer)
    with torch.inference_mode():
        assert not torch.allclose(loaded(input_ids=batch).logits, model(input_ids=batch).logits, atol=1e-3)


def _report_peak(queue) -> None:
    from assistant.tuning.recipes import peak_rss_mb

    queue.put(peak_rss_mb())


def test_peak_rss_excludes_parent_in_spawned_process():
    """Linux carries ru_maxrss over exec, so the recorded peak must come from the child's own memory."""
    import multiprocessing
    import resource

    ballast = bytearray(1024 * 2**20)
    for offset in range(0, len(ballast), 4096):
        ballast[offset] = 1
    parent_peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    del ballast

    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    child = context.Process(target=_report_peak, args=(queue,))
    child.start()
    child_peak_mb = queue.get(timeout=300)
    child.join()
    assert parent_peak_mb > 1024
    assert child_peak_mb < parent_peak_mb - 512, (child_peak_mb, parent_peak_mb)
