"""Adapter slots: an adapter copied into a free slot computes what PEFT's own load computes.

The adapters here are random, untrained LoRA weights saved by PEFT, so each one changes the base
model's output clearly and the tests need no training run. Logits are compared with torch.equal:
a copied adapter has the same weights bit for bit and runs the same PEFT code, so any difference
is a bug, not rounding.
"""

from __future__ import annotations

import copy
import shutil

import pytest
import torch
from peft import PeftModel

from assistant.answer.generation import GenerationSettings
from assistant.errors import ModelError

PROBE = [{"role": "user", "content": "Which antibiotic treats mild community-acquired pneumonia?"}]
QUESTIONS = [
    "Hi",
    "What blood pressure confirms hypertension?",
    "Write the hospital course: admitted with cellulitis, flucloxacillin for five days, home on day 3.",
    "How is diabetic ketoacidosis treated in the first hour?",
]
# name -> (r, lora_alpha, seed); "wide" has another rank, so it never shares a slot with the others
ADAPTERS = {
    "anchor": (8, 16, 1),
    "alpha": (8, 16, 2),
    "beta": (8, 16, 3),
    "gamma": (8, 16, 4),
    "wide": (4, 8, 5),
}


SYSTEM = "Answer a clinician's question in one short sentence."


def chat(question):
    return [{"role": "user", "content": question}]


@pytest.fixture(scope="module")
def adapter_folders(base_model, tmp_path_factory):
    """Folders of PEFT adapters with random LoRA weights on q_proj and v_proj, saved as safetensors."""
    from peft import LoraConfig, get_peft_model

    root = tmp_path_factory.mktemp("slot-adapters")
    model = copy.deepcopy(base_model[0])
    peft_model = None
    for name, (rank, alpha, seed) in ADAPTERS.items():
        config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=["q_proj", "v_proj"], lora_dropout=0.0,
                            init_lora_weights=False, task_type="CAUSAL_LM")
        # init_lora_weights=False draws both LoRA matrices at random, so the adapter changes the output
        torch.manual_seed(seed)
        if peft_model is None:
            peft_model = get_peft_model(model, config, adapter_name=name)
        else:
            peft_model.add_adapter(name, config)
    for name in ADAPTERS:
        peft_model.save_pretrained(str(root), selected_adapters=[name])
    # PEFT saves every adapter but "default" into a subfolder of its name
    return {name: root / name for name in ADAPTERS}


def new_generator(base_model, model_spec, **kwargs):
    from assistant import models
    from assistant.answer.generation import LocalGenerator

    model, tokenizer = base_model
    return LocalGenerator(copy.deepcopy(model), tokenizer, model_spec.display_name,
                          models.model_fingerprint(model_spec), **kwargs)


def route_logits(generator, adapter):
    inputs = generator.encode([PROBE])
    with generator.adapters_active(), torch.inference_mode():
        return generator.model(**inputs, **generator.adapter_kwargs([adapter])).logits


def slot_names(generator):
    return set(getattr(generator.model, "peft_config", {}))


@pytest.fixture(scope="module")
def reference(base_model, model_spec, adapter_folders):
    """A generator with every test adapter injected by PEFT, none through a reused slot."""
    generator = new_generator(base_model, model_spec, max_free_adapter_slots=0)
    for name, folder in adapter_folders.items():
        generator.load_adapter(name, folder)
        assert not generator.last_load_reused_slot
    return generator


@pytest.fixture
def reused(base_model, model_spec, adapter_folders):
    """A generator with "anchor" loaded and one free slot, left by unloading "alpha"."""
    generator = new_generator(base_model, model_spec)
    generator.load_adapter("anchor", adapter_folders["anchor"])
    generator.load_adapter("alpha", adapter_folders["alpha"])
    generator.unload_adapter("alpha")
    return generator


def test_reused_slot_equals_peft_load(reused, reference, adapter_folders):
    alpha_logits = route_logits(reference, "alpha")

    reused.load_adapter("beta", adapter_folders["beta"])

    assert reused.last_load_reused_slot
    assert len(slot_names(reused)) == 2
    assert torch.equal(route_logits(reused, "beta"), route_logits(reference, "beta"))
    assert torch.equal(route_logits(reused, "anchor"), route_logits(reference, "anchor"))
    assert torch.equal(route_logits(reused, None), route_logits(reference, None))
    # the slot's earlier adapter is really gone
    assert not torch.equal(route_logits(reused, "beta"), alpha_logits)
    settings = GenerationSettings(max_new_tokens=8)
    assert reused.generate(PROBE, "beta", settings) == reference.generate(PROBE, "beta", settings)


def test_reused_slot_config_and_names(reused, adapter_folders):
    reused.load_adapter("beta", adapter_folders["beta"])

    beta_slot, anchor_slot = reused.peft_adapter_names(["beta", "anchor"])
    assert beta_slot != anchor_slot
    assert beta_slot.startswith("slot-")
    assert reused.peft_adapter_names([None, "__base__"]) == ["__base__", "__base__"]
    assert reused.adapters == {"anchor": str(adapter_folders["anchor"]), "beta": str(adapter_folders["beta"])}
    assert reused.model.peft_config[beta_slot].inference_mode
    with pytest.raises(ModelError, match=r"adapter\(s\) \['alpha'\] are not loaded"):
        reused.peft_adapter_names(["alpha"])


def test_mixed_batch_after_reuse_matches_solo(reused, adapter_folders):
    from assistant.answer.prefix_cache import SharedPrefixGenerator

    reused.load_adapter("beta", adapter_folders["beta"])
    assert reused.last_load_reused_slot
    reused.load_adapter("gamma", adapter_folders["gamma"])
    settings = GenerationSettings(max_new_tokens=10)
    prompts = [[{"role": "system", "content": SYSTEM}, *chat(q)] for q in QUESTIONS]
    adapters = ["anchor", "beta", "gamma", None]

    solo = [reused.generate(p, a, settings) for p, a in zip(prompts, adapters, strict=True)]
    batched = reused.generate_batch(prompts, adapters, settings)
    shared = SharedPrefixGenerator(reused, prompts[0][:1]).generate_batch(prompts, adapters, settings)

    assert len(set(solo)) == 4
    for index, (alone, together) in enumerate(zip(solo, batched, strict=True)):
        assert together == alone, f"row {index} ({adapters[index]}) differs from its solo run"
    for index, (alone, together) in enumerate(zip(solo, shared, strict=True)):
        assert together == alone, f"shared-prefix row {index} ({adapters[index]}) differs from its solo run"


def test_other_rank_injects_new_slot(reused, reference, adapter_folders):
    free_before = slot_names(reused)

    reused.load_adapter("wide", adapter_folders["wide"])

    assert not reused.last_load_reused_slot
    assert len(slot_names(reused)) == 3
    assert free_before < slot_names(reused)
    assert torch.equal(route_logits(reused, "wide"), route_logits(reference, "wide"))
    # the free slot is still there for an adapter of its own shape
    reused.load_adapter("beta", adapter_folders["beta"])
    assert reused.last_load_reused_slot
    assert len(slot_names(reused)) == 3


def truncated_copy(source, tmp_path):
    """Copy an adapter folder and cut one lora_A matrix to 4 of its 8 rows, so its shape fits no layer."""
    from safetensors.torch import load_file, save_file

    folder = tmp_path / "truncated"
    shutil.copytree(source, folder)
    weights = load_file(str(folder / "adapter_model.safetensors"))
    key = sorted(k for k in weights if k.endswith("lora_A.weight"))[0]
    weights[key] = weights[key][:4].contiguous()
    save_file(weights, str(folder / "adapter_model.safetensors"), metadata={"format": "pt"})
    return folder


def test_wrong_shape_rejected_others_unchanged(reused, adapter_folders, tmp_path):
    folder = truncated_copy(adapter_folders["beta"], tmp_path)
    anchor_before = route_logits(reused, "anchor")
    base_before = route_logits(reused, None)
    slots_before = slot_names(reused)

    with pytest.raises(ModelError, match=r"(?s)could not load adapter 'truncated'.*size mismatch"):
        reused.load_adapter("truncated", folder)

    assert list(reused.adapters) == ["anchor"]
    assert slot_names(reused) == slots_before
    assert torch.equal(route_logits(reused, "anchor"), anchor_before)
    assert torch.equal(route_logits(reused, None), base_before)
    # the free slot survived the failure and still takes a well-formed adapter
    reused.load_adapter("beta", adapter_folders["beta"])
    assert reused.last_load_reused_slot


def test_wrong_shape_first_adapter_leaves_base(base_model, model_spec, adapter_folders, tmp_path):
    from peft.tuners.tuners_utils import BaseTunerLayer

    folder = truncated_copy(adapter_folders["beta"], tmp_path)
    generator = new_generator(base_model, model_spec)
    base_before = route_logits(generator, None)

    with pytest.raises(ModelError, match=r"(?s)could not load adapter 'truncated'.*size mismatch"):
        generator.load_adapter("truncated", folder)

    assert generator.adapters == {}
    assert not isinstance(generator.model, PeftModel)
    assert not any(isinstance(m, BaseTunerLayer) for m in generator.model.modules())
    assert torch.equal(route_logits(generator, None), base_before)
    generator.load_adapter("beta", adapter_folders["beta"])
    assert slot_names(generator) == {"slot-1"}


def test_free_slot_cap(base_model, model_spec, adapter_folders):
    generator = new_generator(base_model, model_spec, max_free_adapter_slots=1)
    for name in ("anchor", "alpha", "beta", "gamma"):
        generator.load_adapter(name, adapter_folders[name])
    assert len(slot_names(generator)) == 4

    generator.unload_adapter("alpha")
    assert len(slot_names(generator)) == 4
    generator.unload_adapter("beta")
    assert len(slot_names(generator)) == 3
    generator.unload_adapter("gamma")
    assert len(slot_names(generator)) == 2

    with pytest.raises(ValueError, match="max_free_adapter_slots must be 0 or more, not -1"):
        new_generator(base_model, model_spec, max_free_adapter_slots=-1)


def test_unloading_last_adapter_restores_base(base_model, model_spec, adapter_folders):
    from peft.tuners.tuners_utils import BaseTunerLayer

    generator = new_generator(base_model, model_spec)
    base_before = route_logits(generator, None)
    for name in ("anchor", "alpha", "beta"):
        generator.load_adapter(name, adapter_folders[name])
    generator.unload_adapter("alpha")
    generator.unload_adapter("beta")
    assert len(slot_names(generator)) == 3

    generator.unload_adapter("anchor")

    assert generator.adapters == {}
    assert not isinstance(generator.model, PeftModel)
    assert not any(isinstance(m, BaseTunerLayer) for m in generator.model.modules())
    assert torch.equal(route_logits(generator, None), base_before)
    # the next load starts again from a bare base and injects
    generator.load_adapter("gamma", adapter_folders["gamma"])
    assert not generator.last_load_reused_slot
