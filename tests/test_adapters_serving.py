"""Serving adapters on one base: base route untouched, per-request adapters under concurrency,
mixed-adapter batches equal to solo runs, refusals of mismatched adapters, and routing."""

from __future__ import annotations

import json
import shutil
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from peft import PeftModel

from assistant.answer.generation import GenerationSettings
from assistant.errors import ModelError

pytest_plugins = ["tuning_support"]

QUESTIONS = [
    "Hi",
    "What blood pressure confirms hypertension?",
    "Which antibiotic treats pneumonia?",
    "Summarise: admitted with sepsis, treated with antibiotics, discharged on day 6.",
    "ok",
    "Explain the CHA2DS2-VASc score in detail, including each component, how many points each adds, and "
    "how the total score changes the decision to offer anticoagulation to men and to women with atrial "
    "fibrillation who have no other reason for anticoagulation.",
    "Dose?",
    "Write the hospital course: admitted with a hip fracture, surgery on day two, mobilised on day four, "
    "transferred to rehabilitation on day seven with paracetamol and enoxaparin for 28 days. " * 3,
]


def chat(question):
    return [{"role": "user", "content": question}]


@pytest.fixture(scope="module")
def names(trained_adapters):
    return [trained_adapters[s].name for s in ("cardiology", "infectious_disease", "discharge_summary")]


def test_base_route_unchanged_by_loading_adapters(fresh_generator, trained_adapters):
    settings = GenerationSettings(max_new_tokens=8)
    prompts = [chat(q) for q in QUESTIONS[:3]]
    probe = fresh_generator.encode(prompts[1:2])
    with torch.inference_mode():
        raw_before = fresh_generator.model(**probe).logits
    before = [fresh_generator.generate(p, None, settings) for p in prompts]

    for result in trained_adapters.values():
        fresh_generator.load_adapter(result.name, result.output)
    after = [fresh_generator.generate(p, None, settings) for p in prompts]
    batched = fresh_generator.generate_batch(prompts, [None, None, None], settings)
    # outside a generation call the adapter layers are off, so the bare base object computes the base
    with torch.inference_mode():
        raw_after = fresh_generator.model.get_base_model()(**probe).logits

    assert after == before
    assert batched == before
    assert torch.equal(raw_after, raw_before)

    # unloading the last adapter takes the PEFT wrapping off again
    for result in trained_adapters.values():
        fresh_generator.unload_adapter(result.name)
    assert fresh_generator.adapters == {}
    assert not isinstance(fresh_generator.model, PeftModel)
    assert fresh_generator.generate(prompts[0], None, settings) == before[0]


def test_concurrent_requests_match_solo(adapter_generator, names):
    settings = GenerationSettings(max_new_tokens=8)
    # five prompts against two alternating adapters: the 20 requests hold each (prompt, adapter) pair twice
    short = [q for q in QUESTIONS if len(q) < 120][:5]
    requests = [(short[i % 5], names[i % 2]) for i in range(20)]
    # greedy decoding is deterministic, so each distinct request is run alone once
    solo = {(question, adapter): adapter_generator.generate(chat(question), adapter, settings)
            for question, adapter in set(requests)}
    with ThreadPoolExecutor(max_workers=20) as pool:
        concurrent = list(pool.map(lambda r: adapter_generator.generate(chat(r[0]), r[1], settings),
                                   requests))
    for index, (request, output) in enumerate(zip(requests, concurrent, strict=True)):
        assert output == solo[request], f"request {index} ({request[1]}, {request[0]!r}) differs from solo"
    # the two adapters really are different models
    assert [solo[(q, names[0])] for q in short] != [solo[(q, names[1])] for q in short]


def test_mixed_batch_matches_solo_runs(adapter_generator, names):
    settings = GenerationSettings(max_new_tokens=12)
    prompts = [chat(q) for q in QUESTIONS]
    adapters = [names[i % 3] for i in range(8)]
    lengths = [adapter_generator.encode([p])["input_ids"].shape[1] for p in prompts]
    assert max(lengths) > 5 * min(lengths)

    solo = [adapter_generator.generate(p, a, settings) for p, a in zip(prompts, adapters, strict=True)]
    batched = adapter_generator.generate_batch(prompts, adapters, settings)
    for index, (alone, together) in enumerate(zip(solo, batched, strict=True)):
        assert together == alone, f"row {index} ({adapters[index]}, {lengths[index]} tokens) differs"


# refusals

def copy_adapter(trained_adapters, tmp_path, name="copy"):
    target = tmp_path / name
    shutil.copytree(trained_adapters["cardiology"].output, target)
    return target


def test_unmatched_target_modules_refused(adapter_generator, trained_adapters, tmp_path):
    folder = copy_adapter(trained_adapters, tmp_path)
    config = json.loads((folder / "adapter_config.json").read_text())
    config["target_modules"] = ["query_key_value"]
    (folder / "adapter_config.json").write_text(json.dumps(config))
    loaded = dict(adapter_generator.adapters)
    with pytest.raises(ModelError, match=r"targets modules query_key_value but matched 0 of \d+ modules"):
        adapter_generator.load_adapter("mismatched", folder)
    assert adapter_generator.adapters == loaded


def test_pickled_adapter_weights_refused(adapter_generator, trained_adapters, tmp_path):
    folder = copy_adapter(trained_adapters, tmp_path)
    (folder / "adapter_model.safetensors").rename(folder / "adapter_model.bin")
    with pytest.raises(ModelError, match=r"pickled weights \(adapter_model.bin\)"):
        adapter_generator.load_adapter("pickled", folder)
    assert "pickled" not in adapter_generator.adapters


def test_registry_checks_refuse_mismatches(adapter_generator, trained_adapters, tmp_path):
    from assistant.tuning.loading import load_registered_adapter
    from assistant.tuning.registry import AdapterRegistry

    registry = AdapterRegistry(tmp_path)
    copy_adapter(trained_adapters, tmp_path, "cardiology-copy")
    entry = {**trained_adapters["cardiology"].entry, "name": "cardiology-copy", "path": "cardiology-copy"}

    wrong_base = {**entry, "base": {"name": "another model", "fingerprint": "sha256:" + "0" * 64}}
    with pytest.raises(ModelError, match="trained on base model 'another model'.*retrain the adapter"):
        load_registered_adapter(adapter_generator, registry, wrong_base)

    changed = {**entry, "files": {**entry["files"], "adapter_model.safetensors": "f" * 64}}
    with pytest.raises(ModelError, match="changed after registration"):
        load_registered_adapter(adapter_generator, registry, changed)

    missing = {**entry, "path": "no-such-folder"}
    with pytest.raises(ModelError, match="not found"):
        load_registered_adapter(adapter_generator, registry, missing)
    assert "cardiology-copy" not in adapter_generator.adapters

    with pytest.raises(ModelError, match="reserved"):
        adapter_generator.load_adapter("__base__", tmp_path / "cardiology-copy")


# routing

@pytest.fixture(scope="module")
def router_setup(trained_adapters, tuning_settings, tmp_path_factory):
    """A copy of the test registry with the three adapters active and a fourth whose base is wrong."""
    from assistant.config import Settings
    from assistant.tuning.registry import AdapterRegistry

    root = tmp_path_factory.mktemp("router") / "adapters"
    shutil.copytree(tuning_settings.adapters_dir, root)
    registry = AdapterRegistry(root)
    for result in trained_adapters.values():
        registry.activate(result.name, {"note": "activated for the routing tests"})
    shutil.copytree(root / trained_adapters["cardiology"].name, root / "oncology-foreign")
    foreign = {**trained_adapters["cardiology"].entry, "name": "oncology-foreign", "specialty": "oncology",
               "path": "oncology-foreign", "base": {"name": "other", "fingerprint": "sha256:" + "1" * 64}}
    registry.register(foreign)
    registry.activate("oncology-foreign", {"note": "activated for the routing tests"})
    return Settings(adapters_dir=root, dtype="float32", device="cpu")


@pytest.fixture(scope="module")
def router(router_setup, adapter_generator, embedder):
    from assistant.tuning.routing import build_router

    return build_router(router_setup, adapter_generator, embedder)


def test_router_follows_requested_specialty(router, trained_adapters):
    cardiology = trained_adapters["cardiology"]
    choice = router.choose("anything", "cardiology")
    assert (choice.name, choice.specialty) == (cardiology.name, "cardiology")
    assert choice.sha256 == cardiology.entry["files"]["adapter_model.safetensors"]

    none = router.choose("anything", "nephrology")
    assert none.name is None
    assert "no active adapter for specialty 'nephrology'" in none.reason


def test_router_rejects_adapter_for_another_base(router):
    assert "oncology" in router.rejected
    with pytest.raises(ModelError, match="oncology-foreign.*fingerprint"):
        router.choose("How is tumour lysis prevented?", "oncology")
    assert "oncology" not in router.scores("How is tumour lysis prevented?")


def test_router_picks_nearest_centroid_or_base(router, trained_adapters):
    infection = router.choose("Which antibiotic should an outpatient with pneumonia get?")
    assert infection.name == trained_adapters["infectious_disease"].name
    assert "router: similarity" in infection.reason

    heart = router.choose("Which statin dose is right after a heart attack?")
    assert heart.name == trained_adapters["cardiology"].name

    unrelated = router.choose("What is the capital of France?")
    assert unrelated.name is None
    assert "below the threshold" in unrelated.reason


def test_answer_reports_adapter_used(router, adapter_generator, demo_index_dir, embedder, embedder_info,
                                     trained_adapters, tmp_path):
    from assistant.answer.pipeline import Assistant
    from assistant.config import Settings
    from assistant.indexing import IndexStore
    from assistant.retrieval import Retriever

    settings = Settings(index_dir=demo_index_dir, dtype="float32", device="cpu", max_new_tokens=12)
    retriever = Retriever(IndexStore(demo_index_dir).open(embedder_info), embedder)
    assistant = Assistant(settings, retriever, adapter_generator, router=router)
    answer = assistant.ask("When should anticoagulation be offered in atrial fibrillation?",
                           specialty="cardiology").to_dict()
    assert answer["adapter"]["name"] == trained_adapters["cardiology"].name
    assert answer["adapter"]["sha256"] == trained_adapters["cardiology"].entry["files"]["adapter_model.safetensors"]
    assert answer["adapter"]["specialty"] == "cardiology"
