"""The adapter registry: promotion with evidence, refusal of a worse candidate, rollback and removal."""

from __future__ import annotations

import json
import shutil

import pytest

from assistant.errors import BedsideError
from assistant.tuning.registry import AdapterRegistry, folder_file_hashes

pytest_plugins = ["tuning_support"]


@pytest.fixture
def registry_copy(tuning_settings, trained_adapters, tmp_path):
    """A private copy of the test registry (three candidates) and settings pointing at it."""
    from assistant.config import Settings

    root = tmp_path / "adapters"
    shutil.copytree(tuning_settings.adapters_dir, root)
    return AdapterRegistry(root), Settings(adapters_dir=root, dtype="float32", device="cpu")


def register_worse_copy(registry, trained_adapters, name="cardiology-worse"):
    """Register a copy of the cardiology adapter with its LoRA update reversed and amplified."""
    from safetensors.torch import load_file, save_file

    source = trained_adapters["cardiology"]
    folder = registry.root / name
    shutil.copytree(source.output, folder)
    weights = load_file(folder / "adapter_model.safetensors")
    weights = {k: (v * -8.0 if "lora_B" in k else v).contiguous() for k, v in weights.items()}
    save_file(weights, folder / "adapter_model.safetensors")
    entry = {**source.entry, "name": name, "path": name, "files": folder_file_hashes(folder)}
    entry.pop("version")
    return registry.register(entry)


def test_promote_against_base_records_scores(registry_copy, trained_adapters, adapter_generator):
    from assistant.tuning.promotion import promote

    registry, settings = registry_copy
    name = trained_adapters["cardiology"].name
    result = promote(settings, name, generator=adapter_generator)
    assert result.promoted
    assert result.incumbent is None
    assert result.candidate_score["loss"] < result.incumbent_score["loss"]

    entry = registry.get(name)
    assert entry["status"] == "active"
    evidence = entry["promotions"][-1]
    assert evidence["incumbent"] == "base model"
    assert evidence["candidate_loss"] == result.candidate_score["loss"]
    assert evidence["incumbent_loss"] == result.incumbent_score["loss"]
    assert evidence["evaluation"]["examples"] == entry["data"]["heldout_examples"]
    # the recipe and the promotion score the same rows the same way
    assert evidence["candidate_loss"] == pytest.approx(entry["metrics"]["heldout_loss"], abs=1e-5)
    assert registry.read()["events"][-1]["action"] == "promote"


def test_worse_candidate_refused_then_forced(registry_copy, trained_adapters, adapter_generator):
    from assistant.tuning.promotion import promote

    registry, settings = registry_copy
    good = trained_adapters["cardiology"].name
    promote(settings, good, generator=adapter_generator)
    register_worse_copy(registry, trained_adapters)

    with pytest.raises(BedsideError, match=r"cardiology-worse' scores held-out loss .* against .* --force"):
        promote(settings, "cardiology-worse", generator=adapter_generator)
    refused = registry.read()["events"][-1]
    assert refused["action"] == "promote-refused"
    assert refused["incumbent"] == good
    assert refused["candidate_loss"] > refused["incumbent_loss"]
    assert registry.active("cardiology")["name"] == good

    forced = promote(settings, "cardiology-worse", force=True, generator=adapter_generator)
    assert forced.forced
    assert registry.active("cardiology")["name"] == "cardiology-worse"
    assert registry.get(good)["status"] == "retired"
    assert registry.get("cardiology-worse")["promotions"][-1]["forced"] is True

    retired, restored = registry.rollback("cardiology")
    assert (retired["name"], restored["name"]) == ("cardiology-worse", good)
    assert registry.active("cardiology")["name"] == good
    assert registry.get("cardiology-worse")["status"] == "retired"


def test_remove_and_rollback_rules(registry_copy, trained_adapters):
    registry, _ = registry_copy
    name = trained_adapters["infectious_disease"].name
    with pytest.raises(BedsideError, match="no active adapter for specialty 'infectious_disease'"):
        registry.rollback("infectious_disease")

    registry.activate(name, {"note": "test"})
    with pytest.raises(BedsideError, match="is active .* rollback"):
        registry.remove(name)
    with pytest.raises(BedsideError, match="nothing to roll back to"):
        registry.rollback("infectious_disease")

    candidate = trained_adapters["discharge_summary"].name
    folder = registry.folder(registry.get(candidate))
    registry.remove(candidate)
    assert not folder.exists()
    with pytest.raises(BedsideError, match="is not in"):
        registry.get(candidate)


def test_promote_needs_recorded_data_or_heldout_file(registry_copy, trained_adapters, adapter_generator, tmp_path):
    from assistant.tuning.promotion import promote

    registry, settings = registry_copy
    name = trained_adapters["infectious_disease"].name
    with registry.transaction() as data:
        next(e for e in data["adapters"] if e["name"] == name)["data"]["sha256"] = "0" * 64
    with pytest.raises(BedsideError, match="missing or changed since training.*--heldout"):
        promote(settings, name, generator=adapter_generator)

    heldout = tmp_path / "heldout.jsonl"
    heldout.write_text(json.dumps({"instruction": "Which antibiotic treats cellulitis?",
                                   "output": "ID consult: flucloxacillin 500 mg four times daily."}) + "\n")
    result = promote(settings, name, heldout_file=heldout, generator=adapter_generator)
    assert result.evaluation == {"source": str(heldout), "examples": 1, "sha256": result.evaluation["sha256"],
                                 "tokens": result.candidate_score["tokens"]}


def test_corrupt_registry_is_reported(tmp_path):
    (tmp_path / "registry.json").write_text("{not json")
    with pytest.raises(BedsideError, match="not valid JSON"):
        AdapterRegistry(tmp_path).entries()
    (tmp_path / "registry.json").write_text(json.dumps({"format": 99, "adapters": []}))
    with pytest.raises(BedsideError, match="upgrade bedside"):
        AdapterRegistry(tmp_path).entries()


def test_register_rejects_duplicate_name(registry_copy, trained_adapters):
    registry, _ = registry_copy
    with pytest.raises(BedsideError, match="already registered"):
        registry.register(dict(trained_adapters["cardiology"].entry))
    assert len(registry.entries()) == 3
