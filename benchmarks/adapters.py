"""Adapters and training: load and switch times, mixed-adapter batches, LoRA vs full steps, routing,
and adapters trained on real data (MedQuAD folders, the PubMedQA non-test half).

    python -m benchmarks.adapters [--quick] [--only serving training routing real] [--no-write]

Run from the repository root after the demo adapters exist (`adapters/README.md`). Each part's raw
results are kept in `.cache/benchmarks/adapters/results.json`, and the "adapters" section of
docs/benchmarks.md is rendered from all parts there, so `--only` re-measures some parts and keeps
the others' last results (each part states its own date and load). `run(quick)` is the entry point
of `python -m benchmarks.run`, which measures serving, training and routing (about 5 minutes on two
idle cores) and leaves the real-data training (about 10 more) to this module's own command. The
quick preset measures the same parts with fewer repeats and steps. The real-data part needs
../shared/data (or BEDSIDE_SHARED_DATA).
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import multiprocessing
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from benchmarks.common import (
    REPO,
    SHARED_DATA,
    command_line,
    load_average,
    machine,
    median_time,
    today,
    write_section,
)

logger = logging.getLogger(__name__)

MODULE = "adapters"
PARTS = ("serving", "training", "routing", "real")
RESULTS = REPO / ".cache" / "benchmarks" / "adapters" / "results.json"
ADAPTERS_DIR = REPO / "adapters"
DEMO_QUESTIONS = REPO / "corpora" / "questions" / "demo_questions.jsonl"
DEMO_CORPUS = REPO / "corpora" / "demo"
BATCH_QUESTIONS = [
    "What CHA2DS2-VASc score should prompt anticoagulation in a man with atrial fibrillation?",
    "Which antibiotic treats mild community-acquired pneumonia in adults?",
    "How is diabetic ketoacidosis treated in the first hour?",
    "Write the hospital course: admitted with cellulitis, flucloxacillin for five days, home on day 3.",
    "When should a patient with heart failure be offered an SGLT2 inhibitor?",
    "How long should hands be rubbed with alcohol gel?",
    "What is the target HbA1c for most adults with type 2 diabetes?",
    "Write the hospital course: admitted with a COPD exacerbation, prednisolone and nebulisers, home day 4.",
]
# The training comparison: the recipe's default LoRA, two variants, and full fine-tuning.
FULL_RUN = "full fine-tuning"
DEFAULT_LORA_RUN = "LoRA r=16, 7 projections, dropout 0.05 (default)"
NO_DROPOUT_LORA_RUN = "LoRA r=16, 7 projections, dropout 0"
TRAINING_RUNS: dict[str, dict[str, Any]] = {
    FULL_RUN: {"method": "full"},
    DEFAULT_LORA_RUN: {"method": "lora"},
    NO_DROPOUT_LORA_RUN: {"method": "lora", "lora_dropout": 0.0},
    "LoRA r=8, q k v o, dropout 0.05": {
        "method": "lora",
        "lora_r": 8,
        "lora_alpha": 16,
        "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"],
    },
}
# A training run took 2.5 minutes on the slower of the 2-core machines (5 steps, 2 more for memory,
# 1 profiled), so the suite trains only the two runs the targets compare, and `--all-variants` adds
# the LoRA variants (no dropout, r=8 on the attention projections).
SUITE_TRAINING_RUNS = [FULL_RUN, DEFAULT_LORA_RUN]
# glibc keeps freed blocks below its (adaptive) mmap threshold in the heap, so a process's peak RSS
# also counts memory PyTorch has already freed. Fixing the threshold at 64 KiB makes every tensor
# of the activation sizes here its own mapping, returned to the system when freed.
LIVE_MEMORY_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536"}

# Targets for these figures, checked in the rendered section and recorded for the summary table.
TARGETS = {
    "switch_ms": 5.0,  # selecting another loaded adapter for a request, at most 5 ms
    "load_ratio": 0.05,  # adapter load at most 1/20 of reloading the base
    "mixed_ratio": 0.8,  # mixed batch of 3 adapters, at least 0.8× one adapter's throughput
    "step_ratio": 0.5,  # LoRA step time at most 0.5× full fine-tuning's
    "memory_ratio": 0.6,  # LoRA peak memory at most 0.6× full fine-tuning's
}


@dataclass
class Preset:
    """Sizes of one benchmark run."""

    repeats: int = 5
    # the first step warms up and is not timed, so 4 steps give a median of 3
    train_steps: int = 4
    memory_steps: int = 2
    training_runs: list[str] = field(default_factory=lambda: list(SUITE_TRAINING_RUNS))
    real_steps: int = 40
    real_heldout: int = 100
    quick: bool = False


FULL = Preset()
QUICK = Preset(repeats=3, train_steps=3, training_runs=[FULL_RUN, DEFAULT_LORA_RUN], quick=True)


# serving: load, switch, batch


def demo_generator() -> tuple[Any, Any, list[dict[str, Any]]]:
    """A generator on a private fp32 copy of the embedded base, and the active demo registry entries."""
    from assistant import models
    from assistant.answer.generation import LocalGenerator
    from assistant.tuning.registry import AdapterRegistry

    spec = models.resolve_model("")
    model, tokenizer = models.load_base_model(spec, "float32", "cpu")
    generator = LocalGenerator(
        copy.deepcopy(model), tokenizer, spec.display_name, models.model_fingerprint(spec)
    )
    registry = AdapterRegistry(ADAPTERS_DIR)
    entries = registry.active_entries()
    if len(entries) < 3:
        raise SystemExit(
            f"{ADAPTERS_DIR}/registry.json has {len(entries)} active adapters; build the demo "
            "adapters first (adapters/README.md)"
        )
    return generator, registry, entries


# the calls inside one adapter load into a free slot whose cumulative time the section lists, as
# (label, function names)
LOAD_PROFILE_CALLS = [
    ("bedside: adapter folder check (files present, no pickled weights)", ("check_adapter_files",)),
    ("bedside: base fingerprint check", ("check_base_fingerprint",)),
    ("bedside: sha256 of the config and weights files against the registry", ("check_file_hashes",)),
    ("bedside: adapter_config.json read with PEFT's config class", ("read_adapter_config",)),
    ("bedside: target modules matched against the cached module names", ("check_target_modules",)),
    ("safetensors: read the adapter's tensors", ("load_file",)),
    ("bedside: keys and shapes checked against the slot", ("_state_mismatch",)),
    ("torch: tensors copied into the slot's parameters", ("_copy_state",)),
    ("PEFT: inject new LoRA layers (0 when a free slot is reused)", ("inject_adapter",)),
]


def profile_adapter_load(load: Callable[[], object]) -> dict[str, float]:
    """Cumulative milliseconds of the calls in LOAD_PROFILE_CALLS during one adapter load, under cProfile.

    cProfile slows Python-heavy code, so the shares matter here more than the absolute times.
    """
    import cProfile
    import pstats

    profiler = cProfile.Profile()
    profiler.enable()
    start = time.perf_counter()
    load()
    total = time.perf_counter() - start
    profiler.disable()
    stats = pstats.Stats(profiler).stats  # {(file, line, function): (calls, primitive, tottime, cumtime, callers)}
    profile = {"total": 1e3 * total}
    for label, functions in LOAD_PROFILE_CALLS:
        # a recursive function's cumulative time is counted once, at its outermost calls
        profile[label] = 1e3 * sum(row[3] for key, row in stats.items() if key[2] in functions)
    return profile


def bench_serving(repeats: int) -> dict[str, Any]:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from assistant import models
    from assistant.answer.generation import GenerationSettings
    from assistant.tuning.loading import (
        candidate_module_names,
        check_adapter_files,
        check_base_fingerprint,
        check_file_hashes,
        check_target_modules,
        load_registered_adapter,
        read_adapter_config,
    )

    results: dict[str, Any] = {}
    spec = models.resolve_model("")
    folder = models.dequantized_gguf_folder(spec)

    # base reload from the safetensors cache, as `load_base_model` does in every new process
    def load_weights() -> Any:
        return AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32, use_safetensors=True)

    def load_base() -> None:
        AutoTokenizer.from_pretrained(str(folder))
        load_weights()

    results["base_load_s"] = median_time(load_base, max(3, repeats))
    results["base_weights_load_s"] = median_time(load_weights, max(3, repeats))

    generator, registry, entries = demo_generator()

    # adapter load: checks (fingerprint, file hashes, target modules) plus PEFT's load. The first
    # adapter also wraps the base in a PeftModel; later ones are added beside it.
    first = []
    for _ in range(max(3, repeats // 2)):
        start = time.perf_counter()
        load_registered_adapter(generator, registry, entries[0])
        first.append(time.perf_counter() - start)
        generator.unload_adapter(entries[0]["name"])
    results["first_adapter_load_s"] = statistics.median(first)
    for entry in entries:
        load_registered_adapter(generator, registry, entry)
    names = [e["name"] for e in entries]
    results["adapters_loaded"] = len(names)
    results["model_modules"] = sum(1 for _ in generator.model.modules())

    def load_beside(label: str) -> list[float]:
        """Load a new name beside the loaded adapters and unload it, `repeats` times; seconds per load."""
        seconds = []
        for attempt in range(repeats):
            entry = {**entries[attempt % len(entries)], "name": f"bench-load-{label}-{attempt}"}
            start = time.perf_counter()
            load_registered_adapter(generator, registry, entry)
            seconds.append(time.perf_counter() - start)
            if generator.last_load_reused_slot != (label == "slot"):
                raise RuntimeError(f"adapter load {attempt} of the {label!r} figure took the other path")
            generator.unload_adapter(entry["name"])
        return seconds

    # With no free slot kept, each unload deletes the adapter's layers, so every load injects new
    # LoRA layers with PEFT: the first load of an adapter with a new LoRA shape.
    max_free_slots = generator.max_free_adapter_slots
    generator.max_free_adapter_slots = 0
    results["adapter_inject_load_s"] = statistics.median(load_beside("inject"))
    # A server that loads and unloads adapters of one shape: after the first unload, each load
    # copies the weights into the free slot the previous unload left.
    generator.max_free_adapter_slots = max_free_slots
    load_registered_adapter(generator, registry, {**entries[0], "name": "bench-load-first"})
    generator.unload_adapter("bench-load-first")
    results["adapter_load_s"] = statistics.median(load_beside("slot"))
    results["max_free_adapter_slots"] = max_free_slots
    results["load_profile"] = profile_adapter_load(
        lambda: load_registered_adapter(generator, registry, {**entries[0], "name": "bench-load-profiled"})
    )
    results["load_profile_reused_slot"] = generator.last_load_reused_slot
    generator.unload_adapter("bench-load-profiled")

    # the checks as a load runs them, with the module names collected once per generator
    candidates = candidate_module_names(generator.model)

    def checks() -> None:
        folder = registry.folder(entries[0])
        check_adapter_files(folder)
        check_base_fingerprint(entries[0], generator.model_fingerprint)
        check_file_hashes(entries[0], folder)
        check_target_modules(generator.model, folder, config=read_adapter_config(folder), candidates=candidates)

    results["checks_ms"] = 1e3 * median_time(checks, repeats)

    # switching. A request selects its adapter per row (`adapter_names`), so nothing global changes
    # between requests. What each request pays is turning the adapter layers on and off around its
    # generate call. PEFT's global `set_adapter` is shown for comparison, but bedside does not call it.
    def toggle() -> None:
        with generator.adapters_active():
            pass

    results["switch_ms"] = 1e3 * median_time(toggle, repeats * 20)
    peft_model = generator.model
    peft_names = generator.peft_adapter_names(names[:2])
    results["set_adapter_ms"] = (
        1e3 * median_time(lambda: [peft_model.set_adapter(n) for n in peft_names], repeats * 4) / 2
    )
    one_token = GenerationSettings(max_new_tokens=1)
    prompt = [{"role": "user", "content": BATCH_QUESTIONS[0]}]
    same = median_time(lambda: [generator.generate(prompt, names[0], one_token) for _ in range(2)], repeats)
    alternating = median_time(lambda: [generator.generate(prompt, n, one_token) for n in names[:2]], repeats)
    results["request_same_adapter_ms"] = 1e3 * same / 2
    results["request_alternating_ms"] = 1e3 * alternating / 2

    # batch of 8: one adapter for all rows, three adapters mixed, and the base route. The layouts
    # take turns in each round, so a change in the machine's load affects all three alike, and the
    # process's CPU time is recorded beside wall time because other jobs on the machine change it less.
    settings = GenerationSettings(max_new_tokens=32)
    prompts = [[{"role": "user", "content": q}] for q in BATCH_QUESTIONS]
    layouts = {
        "base route": [None] * 8,
        "one adapter": [names[0]] * 8,
        "three adapters mixed": [names[i % 3] for i in range(8)],
    }
    rounds: dict[str, list[tuple[float, float, int]]] = {label: [] for label in layouts}
    generator.generate_batch(prompts, layouts["three adapters mixed"], settings)
    for _ in range(max(3, repeats)):
        for label, adapters in layouts.items():
            start, cpu_start = time.perf_counter(), time.process_time()
            outputs = generator.generate_batch(prompts, adapters, settings)
            seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
            tokens = sum(
                len(generator.tokenizer(text, add_special_tokens=False).input_ids) for text in outputs
            )
            rounds[label].append((seconds, cpu_seconds, tokens))
    results["batch"] = {
        label: {
            "seconds": statistics.median(s for s, _, _ in runs),
            "cpu_seconds": statistics.median(c for _, c, _ in runs),
            "tokens": statistics.median(t for _, _, t in runs),
            "tokens_per_s": statistics.median(t / s for s, _, t in runs),
            "tokens_per_cpu_s": statistics.median(t / c for _, c, t in runs),
            "rounds": len(runs),
        }
        for label, runs in rounds.items()
    }
    return results


# training: LoRA vs full at sequence 256, batch 4


def long_examples(path: Path) -> Path:
    """Write one example per demo guideline, its title as the request and its body (over 256 tokens) as
    the answer."""
    from assistant.corpus import load_corpus

    documents = load_corpus([DEMO_CORPUS]).documents
    lines = [
        json.dumps(
            {
                "instruction": f"Summarise the guideline: {d.title}",
                "output": "\n\n".join(s.text for s in d.sections),
            }
        )
        for d in documents
    ]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def _train_child(overrides: dict[str, Any], adapters_dir: str, result_path: str) -> None:
    from assistant.config import Settings
    from assistant.tuning.config import load_train_config
    from assistant.tuning.recipes import train

    result = train(
        load_train_config(None, overrides), Settings(adapters_dir=Path(adapters_dir), device="cpu")
    )
    size = sum(p.stat().st_size for p in result.output.rglob("*") if p.is_file())
    Path(result_path).write_text(json.dumps({**result.metrics, "artifact_bytes": size}), encoding="utf-8")


def train_in_child(
    overrides: dict[str, Any], workdir: Path, env: dict[str, str] | None = None
) -> dict[str, Any]:
    """Train in a spawned process, so its peak RSS belongs to that method alone, with `env` added."""
    result_path = workdir / f"{overrides['name']}.json"
    process = multiprocessing.get_context("spawn").Process(
        target=_train_child, args=(overrides, str(workdir / "adapters"), str(result_path))
    )
    saved = {key: os.environ.get(key) for key in env or {}}
    os.environ.update(env or {})
    try:
        # the spawned interpreter copies this environment when it starts, and glibc reads it then
        process.start()
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
    process.join()
    if not result_path.is_file():
        raise RuntimeError(f"training {overrides['name']} failed (exit code {process.exitcode})")
    return json.loads(result_path.read_text(encoding="utf-8"))


def profile_step(data: Path, run: dict[str, Any]) -> dict[str, float]:
    """Profile one training step (batch 4 × 256 tokens, AdamW) of a method, built as the recipe builds it.

    Returns the size of the tensors autograd saves in the forward pass (parameters not counted,
    shared storage counted once), and the step's CPU time split into matrix products (`aten::mm`,
    `aten::addmm`, `aten::bmm`) and everything else. torch.profiler's "self CPU" times are wall time
    inside each operator, which other load on the machine stretches, so only their proportions are
    used, applied to the process's CPU time for the step.
    """
    import torch
    from torch.profiler import ProfilerActivity, profile
    from transformers import AutoTokenizer

    from assistant import models
    from assistant.tuning.config import load_train_config
    from assistant.tuning.data import PaddingCollator, load_examples, tokenize_examples
    from assistant.tuning.recipes import METHOD_SETUP, load_trainable_model

    config = load_train_config(None, {"specialty": "bench", "data": str(data), "max_seq_length": 256, **run})
    folder = str(models.dequantized_gguf_folder(models.resolve_model("")))
    tokenizer = AutoTokenizer.from_pretrained(folder)
    rows = tokenize_examples(tokenizer, load_examples(data).examples[:4], 256)
    batch = PaddingCollator(tokenizer.pad_token_id or 0)(rows)
    model = METHOD_SETUP[config.method](load_trainable_model(config, folder, "cpu"), config)
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=config.learning_rate)
    parameters = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved: dict[int, int] = {}

    def pack(tensor: Any) -> Any:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in parameters:
            saved[storage.data_ptr()] = storage.nbytes()
        return tensor

    def step() -> None:
        model(**batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    # the first step allocates the optimizer state; the profiled one is the second
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        step()
    cpu_start = time.process_time()
    with profile(activities=[ProfilerActivity.CPU]) as profiler:
        step()
    cpu_seconds = time.process_time() - cpu_start
    events = profiler.key_averages()
    total_us = sum(event.self_cpu_time_total for event in events)
    matmul_us = sum(
        event.self_cpu_time_total for event in events if event.key in {"aten::mm", "aten::addmm", "aten::bmm"}
    )
    # the process's CPU time, split in the proportions the profiler measured
    return {
        "saved_activations_mb": sum(saved.values()) / 2**20,
        "profiled_step_s": cpu_seconds,
        "matmul_s": cpu_seconds * matmul_us / total_us,
    }


def bench_training(steps: int, memory_steps: int, labels: list[str]) -> dict[str, Any]:
    """Train each method twice in its own process: once for step times, once for live peak memory."""
    results = {}
    with tempfile.TemporaryDirectory(prefix="bedside-bench-") as tmp:
        workdir = Path(tmp)
        data = long_examples(workdir / "long.jsonl")
        for number, label in enumerate(labels):
            run = TRAINING_RUNS[label]
            overrides = {
                "specialty": "bench",
                "data": str(data),
                "batch_size": 4,
                "max_seq_length": 256,
                "eval_fraction": 0.0,
                "register": False,
                "seed": 0,
                **run,
            }
            timed = train_in_child(
                {
                    **overrides,
                    "max_steps": steps,
                    "name": f"bench-{number}",
                    "out": str(workdir / f"out-{number}"),
                },
                workdir,
            )
            live = train_in_child(
                {
                    **overrides,
                    "max_steps": memory_steps,
                    "name": f"bench-memory-{number}",
                    "out": str(workdir / f"memory-{number}"),
                },
                workdir,
                env=LIVE_MEMORY_ENV,
            )
            results[label] = {
                **timed,
                "live_peak_rss_mb": live["peak_rss_mb"],
                **profile_step(data, run),
            }
            logger.info(
                "%s: %.2f s/step, peak RSS %.0f MB (live %.0f MB)",
                label,
                timed["median_step_seconds"],
                timed["peak_rss_mb"],
                live["peak_rss_mb"],
            )
    return results


# routing accuracy on the demo questions


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    # "\n" alone separates JSONL records; str.splitlines() would also split at U+2028 inside a string
    return [json.loads(line) for line in path.read_text(encoding="utf-8").split("\n") if line.strip()]


def bench_routing() -> dict[str, Any]:
    import numpy as np

    from assistant import models
    from assistant.tuning.data import load_examples
    from assistant.tuning.registry import AdapterRegistry
    from assistant.tuning.routing import DEFAULT_MARGIN, DEFAULT_THRESHOLD

    registry = AdapterRegistry(ADAPTERS_DIR)
    entries = registry.active_entries()
    embedder = models.load_embedder(models.resolve_embedder(""), "cpu")
    questions = read_jsonl(DEMO_QUESTIONS)
    specialties = [e["specialty"] for e in entries]
    expected = [q["specialty"] if q["specialty"] in specialties else None for q in questions]

    vectors = embedder.encode(
        [q["question"] for q in questions],
        normalize_embeddings=True,
        convert_to_numpy=True,
        show_progress_bar=False,
    )
    centroids = np.array([e["router"]["centroid"] for e in entries], dtype=np.float32)
    centroid_scores = vectors @ centroids.T
    # the alternative: similarity to the single nearest training question of each adapter
    nearest_scores = np.zeros_like(centroid_scores)
    for column, entry in enumerate(entries):
        examples = load_examples(REPO / entry["data"]["path"]).examples
        train_vectors = embedder.encode(
            [e.question for e in examples],
            normalize_embeddings=True,
            convert_to_numpy=True,
            show_progress_bar=False,
        )
        nearest_scores[:, column] = (vectors @ train_vectors.T).max(axis=1)

    def accuracy(scores: Any, threshold: float, margin: float) -> dict[str, Any]:
        picked = []
        for row in scores:
            ranked = np.sort(row)[::-1]
            routed = ranked[0] >= threshold and (len(ranked) == 1 or ranked[0] - ranked[1] >= margin)
            picked.append(specialties[int(row.argmax())] if routed else None)
        pairs = list(zip(picked, expected, strict=True))
        in_scope = [(p, e) for p, e in pairs if e is not None]
        out_scope = [(p, e) for p, e in pairs if e is None]
        return {
            "threshold": threshold,
            "margin": margin,
            "in_scope": (sum(p == e for p, e in in_scope), len(in_scope)),
            "out_of_scope": (sum(p is None for p, _ in out_scope), len(out_scope)),
            "overall": sum(p == e for p, e in pairs) / len(pairs),
            "misrouted": [
                (questions[i]["question"][:70], picked[i], expected[i])
                for i, (p, e) in enumerate(pairs)
                if p != e
            ],
        }

    grid = [(t, m) for t in (0.35, 0.40, 0.45, 0.50) for m in (0.0, 0.05, 0.10)]
    own = [float(centroid_scores[i, specialties.index(e)]) for i, e in enumerate(expected) if e is not None]
    other = [float(centroid_scores[i].max()) for i, e in enumerate(expected) if e is None]
    return {
        "adapters": specialties,
        "default": (DEFAULT_THRESHOLD, DEFAULT_MARGIN),
        "centroid": [accuracy(centroid_scores, t, m) for t, m in grid],
        "nearest_question": [accuracy(nearest_scores, t, m) for t, m in grid],
        "own_centroid_similarity": (min(own), max(own)) if own else None,
        "unrouted_best_similarity": (min(other), max(other)) if other else None,
    }


# real data: MedQuAD folders and the PubMedQA non-test half

MEDQUAD_SETS = {
    "medquad-nhlbi (heart, lung, blood)": "8_NHLBI_QA_XML",
    "medquad-cdc (infectious disease)": "9_CDC_QA",
}


def medquad_records(folder: Path) -> list[dict[str, str]]:
    from assistant.corpus.loaders import load_xml

    records = []
    for path in sorted(folder.glob("*.xml")):
        for document in load_xml(path):
            question = document.metadata.get("question")
            if question:
                records.append({"instruction": question, "output": document.sections[0].text})
    return records


def bench_real(steps: int, heldout_limit: int) -> dict[str, Any]:
    from assistant.config import Settings
    from assistant.evaluation.datasets import load_pubmedqa, pubmedqa_training_records, spread
    from assistant.tuning.config import load_train_config
    from assistant.tuning.data import Example, record_to_messages, tokenize_examples
    from assistant.tuning.heldout import heldout_loss
    from assistant.tuning.recipes import train

    if not (SHARED_DATA / "medquad").is_dir() or not (SHARED_DATA / "pubmedqa").is_dir():
        raise RuntimeError(f"{SHARED_DATA} lacks medquad/ or pubmedqa/; set BEDSIDE_SHARED_DATA")
    results = {}
    with tempfile.TemporaryDirectory(prefix="bedside-real-") as tmp:
        workdir = Path(tmp)
        sets: dict[str, tuple[list[dict[str, Any]], list[dict[str, Any]] | None, int]] = {}
        for label, folder in MEDQUAD_SETS.items():
            sets[label] = (medquad_records(SHARED_DATA / "medquad" / folder), None, 256)
        pubmedqa = load_pubmedqa(SHARED_DATA / "pubmedqa")
        # the release lists the test split sorted by decision, so an even spread keeps its label mix
        test = pubmedqa_training_records(pubmedqa, "test")
        scored = [test[i] for i in spread(list(range(len(test))), heldout_limit)]
        sets["pubmedqa (non-test half; scored on the test half)"] = (
            pubmedqa_training_records(pubmedqa, "train"),
            scored,
            384,
        )

        for number, (label, (records, external, seq)) in enumerate(sets.items()):
            path = workdir / f"set{number}.jsonl"
            # ASCII escapes keep U+2028 in abstracts from reading as a line break in other tools
            path.write_text(
                "\n".join(json.dumps(r, ensure_ascii=True) for r in records) + "\n", encoding="utf-8"
            )
            config = load_train_config(
                None,
                {
                    "specialty": f"real{number}",
                    "data": str(path),
                    "method": "lora",
                    "lora_r": 8,
                    "lora_alpha": 16,
                    "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"],
                    "lr": 1e-3,
                    "max_steps": steps,
                    "batch_size": 4,
                    "max_seq_length": seq,
                    "eval_fraction": 0.0 if external else 0.1,
                    "register": False,
                    "seed": 0,
                    "out": str(workdir / f"adapter{number}"),
                },
            )
            result = train(config, Settings(adapters_dir=workdir / "adapters", device="cpu"))
            record = json.loads((result.output / "training.json").read_text(encoding="utf-8"))
            row = {
                "examples": len(records),
                # the recipe drops examples whose prompt alone fills max_seq_length
                "train_examples_used": record["data"]["train_examples"],
                "steps": result.metrics["steps"],
                "seconds_per_step": result.metrics["median_step_seconds"],
                "max_seq_length": seq,
            }
            if external is None:
                row.update(
                    heldout_candidates=record["data"]["heldout_examples"],
                    heldout_examples=record["data"]["heldout_examples"],
                    base_loss=result.metrics["base_heldout_loss"],
                    adapter_loss=result.metrics["heldout_loss"],
                )
            else:
                tokenizer = _tokenizer()
                rows = tokenize_examples(
                    tokenizer,
                    [Example(record_to_messages(r), n) for n, r in enumerate(external, 1)],
                    seq,
                    purpose="evaluation",
                )
                model = result.model
                with model.disable_adapter():
                    base = heldout_loss(model, tokenizer, rows, batch_size=4)
                tuned = heldout_loss(model, tokenizer, rows, batch_size=4)
                row.update(
                    heldout_candidates=len(external),
                    heldout_examples=len(rows),
                    base_loss=base["loss"],
                    adapter_loss=tuned["loss"],
                )
            results[label] = row
            result.model = None
    return results


def _tokenizer() -> Any:
    from transformers import AutoTokenizer

    from assistant import models

    tokenizer = AutoTokenizer.from_pretrained(str(models.dequantized_gguf_folder(models.resolve_model(""))))
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


# headline figures and targets


def headline(results: dict[str, Any]) -> list[dict[str, Any]]:
    """Return the figures with a target: name, value, unit, reference, ratio, target and whether it is met."""
    rows = []
    serving = (results.get("serving") or {}).get("data")
    if serving:
        mixed = serving["batch"]["three adapters mixed"]["tokens_per_cpu_s"]
        single = serving["batch"]["one adapter"]["tokens_per_cpu_s"]
        rows += [
            {
                "name": "switch between loaded adapters (per request)",
                "value": serving["switch_ms"],
                "unit": "ms",
                "reference": None,
                "reference_name": "",
                "target": f"value <= {TARGETS['switch_ms']:g}",
            },
            {
                "name": "adapter load into a free slot, beside loaded adapters",
                "value": 1e3 * serving["adapter_load_s"],
                "unit": "ms",
                "reference": 1e3 * serving["base_load_s"],
                "reference_name": "base reload",
                "target": f"ratio <= {TARGETS['load_ratio']:g}",
            },
            {
                "name": "mixed batch of 8, 3 adapters",
                "value": mixed,
                "unit": "tokens/CPU-s",
                "reference": single,
                "reference_name": "one adapter",
                "target": f"ratio >= {TARGETS['mixed_ratio']:g}",
            },
        ]
    training = (results.get("training") or {}).get("data")
    if training and FULL_RUN in training and DEFAULT_LORA_RUN in training:
        full, lora = training[FULL_RUN], training[DEFAULT_LORA_RUN]
        rows += [
            {
                "name": "LoRA training step (default recipe)",
                "value": lora["median_step_cpu_seconds"],
                "unit": "CPU-s",
                "reference": full["median_step_cpu_seconds"],
                "reference_name": "full fine-tuning",
                "target": f"ratio <= {TARGETS['step_ratio']:g}",
            },
            {
                "name": "LoRA training peak memory (default recipe)",
                "value": lora["live_peak_rss_mb"] / 1024,
                "unit": "GB",
                "reference": full["live_peak_rss_mb"] / 1024,
                "reference_name": "full fine-tuning",
                "target": f"ratio <= {TARGETS['memory_ratio']:g}",
            },
        ]
    for row in rows:
        row["ratio"] = row["value"] / row["reference"] if row["reference"] else None
        subject, operator, bound = row["target"].split()
        measured = row["value"] if subject == "value" else row["ratio"]
        row["met"] = measured <= float(bound) if operator == "<=" else measured >= float(bound)
    return rows


def record_figures(results: dict[str, Any]) -> None:
    from benchmarks.common import record_figure

    for row in headline(results):
        record_figure(
            MODULE,
            row["name"],
            row["value"],
            row["unit"],
            reference=row["reference"],
            reference_name=row["reference_name"],
            target=row["target"],
        )
    real = (results.get("real") or {}).get("data") or {}
    for label, row in real.items():
        record_figure(
            MODULE,
            f"held-out loss after LoRA, {label.split(' (')[0]}",
            row["adapter_loss"],
            "",
            reference=row["base_loss"],
            reference_name="base model",
        )


# report


def render(results: dict[str, Any]) -> str:
    lines = [
        "## Adapters and training",
        "",
        "Measured with `python -m benchmarks.adapters` (or `benchmarks.run`); each part below names its "
        "date, the machine's load average when it started and its thread count. fp32 weights, greedy "
        "decoding, the embedded SmolLM2-135M base and the demo adapters in `adapters/`.",
        "",
    ]
    rows = headline(results)
    if rows:
        lines += ["| figure | measured | reference | ratio | target | met? |", "|---|---|---|---|---|---|"]
        for row in rows:
            reference = (
                f"{row['reference']:.3g} {row['unit']} ({row['reference_name']})" if row["reference"] else "—"
            )
            ratio = f"{row['ratio']:.2f}×" if row["ratio"] is not None else "—"
            subject, operator, bound = row["target"].split()
            unit = "×" if subject == "ratio" else " " + row["unit"]
            target = f"{'≤' if operator == '<=' else '≥'} {bound}{unit}"
            lines.append(
                f"| {row['name']} | {row['value']:.3g} {row['unit']} | {reference} | {ratio} | {target} | "
                f"{'yes' if row['met'] else '**no**'} |"
            )
        lines.append("")
    for part, renderer in (
        ("serving", render_serving),
        ("training", render_training),
        ("routing", render_routing),
        ("real", render_real),
    ):
        if results.get(part):
            lines += renderer(results[part]["data"], describe_run(results[part]["run"]))
        elif part == "real":
            lines += ["### Adapters trained on real data", "",
                      "Not measured on this machine yet. `python -m benchmarks.adapters --only real` trains "
                      "LoRA adapters on MedQuAD and PubMedQA and scores them on held-out questions (about 10 "
                      "minutes on two idle cores); `make bench` leaves this part out to stay within 30 "
                      "minutes.", ""]
    return "\n".join(lines)


def describe_run(run: dict[str, Any]) -> str:
    quick = ", quick preset" if run.get("quick") else ""
    return (
        f"Measured on {run['date']}{quick} by `{run['command']}`: {run['machine']}; load average "
        f"{run['load_average']} at the start, {run['threads']} torch thread(s)."
    )


def render_load_profile(profile: dict[str, float] | None, reused_slot: bool | None) -> list[str]:
    if not profile:
        return []
    kind = "into a free slot" if reused_slot else "that injected new LoRA layers"
    lines = [f"One adapter load {kind} under cProfile ({profile['total']:.0f} ms in all; the profiler slows "
             "Python code, so read the shares).", "",
             "| inside one adapter load | cumulative ms | share |", "|---|---|---|"]
    for label, _ in LOAD_PROFILE_CALLS:
        if label in profile:
            lines.append(f"| {label} | {profile[label]:.1f} | {profile[label] / profile['total']:.0%} |")
    return lines + [""]


def render_load_rows(serving: dict[str, Any]) -> list[str]:
    """Rows of the loading table for one more adapter beside the loaded ones, into a slot and injected."""
    beside = f"beside {serving['adapters_loaded']} loaded ones"
    if "adapter_inject_load_s" not in serving:
        # results saved before adapter slots existed measured PEFT's load only
        return [f"| load one more adapter {beside} (checks + PEFT load) | {1e3 * serving['adapter_load_s']:.0f} ms |"]
    return [
        f"| load one more adapter {beside} into a free slot (checks + copy of the weights) | "
        f"{1e3 * serving['adapter_load_s']:.1f} ms |",
        f"| load one more adapter {beside}, injecting new LoRA layers (checks + PEFT load) | "
        f"{1e3 * serving['adapter_inject_load_s']:.0f} ms |",
    ]


def render_load_ratio(serving: dict[str, Any]) -> str:
    base = serving["base_load_s"]
    if "adapter_inject_load_s" not in serving:
        return (f"Loading an adapter takes {serving['adapter_load_s'] / base:.2f}× the time of reloading the base "
                f"(target ≤ {TARGETS['load_ratio']}). ")
    return (
        f"Loading an adapter into a free slot takes {serving['adapter_load_s'] / base:.3f}× the time of "
        f"reloading the base (target ≤ {TARGETS['load_ratio']}), and one that injects new LoRA layers "
        f"{serving['adapter_inject_load_s'] / base:.2f}×. "
        "Unloading an adapter while others stay loaded keeps its LoRA layers as a free slot (at most "
        f"{serving.get('max_free_adapter_slots', 2)}), and the next adapter with the same LoRA shape "
        "(rank, alpha, target modules and the other shape fields of adapter_config.json) is copied into "
        "that slot's parameters instead of PEFT building new layers. The slot figure is "
        "the steady state of a server that loads and unloads adapters of one shape; the first adapter of "
        "a new shape still goes through PEFT's injection. "
    )


def render_serving(serving: dict[str, Any], run: str) -> list[str]:
    lines = [
        "### Loading and switching",
        "",
        run,
        "",
        "| operation | median |",
        "|---|---|",
        f"| reload the base model (tokenizer and weights from the safetensors cache) | "
        f"{1e3 * serving['base_load_s']:.0f} ms |",
        f"| of which the weights alone | {1e3 * serving['base_weights_load_s']:.0f} ms |",
        f"| load the first adapter (checks + PEFT load, wrapping the base) | "
        f"{1e3 * serving['first_adapter_load_s']:.0f} ms |",
        *render_load_rows(serving),
        "| of which bedside's checks (fingerprint, file hashes, target modules) | "
        f"{serving['checks_ms']:.1f} ms |",
        "| switch between loaded adapters: a request's adapter layers on and off | "
        f"{serving['switch_ms']:.3f} ms |",
        f"| PEFT `set_adapter` between two loaded adapters (not used when serving) | "
        f"{serving['set_adapter_ms']:.1f} ms |",
        "| 1-token request, same adapter as the previous request | "
        f"{serving['request_same_adapter_ms']:.0f} ms |",
        f"| 1-token request, other adapter than the previous request | "
        f"{serving['request_alternating_ms']:.0f} ms |",
        "",
        "Each request names its adapter per row (PEFT's `adapter_names`), so a switch changes no global "
        "state: the 1-token rows differ only by noise, and the per-request cost is flipping the "
        "adapter layers' enable flag around the generate call.",
        "",
        render_load_ratio(serving)
        + "The base is small (135M parameters, 540 MB in fp32) and its safetensors file is memory-mapped "
        "from the page cache, so a reload copies little. PEFT's injection does not depend on the base's "
        f"size: it walks the module tree ({serving['model_modules']:,} modules with "
        f"{serving['adapters_loaded']} adapters loaded) several times in Python to match target modules, "
        "build the LoRA layers, load the state dict and set trainability. A load into a slot reads and "
        "copies only the adapter's own tensors; the profile below shows where its time goes. For a base "
        "of several GB the reload grows with its size and the adapter load does not, but no such base "
        "was measured here.",
        "",
        *render_load_profile(serving.get("load_profile"), serving.get("load_profile_reused_slot")),
        "### Batch of 8 requests, 32 new tokens",
        "",
        "| rows use | seconds | CPU seconds | generated tokens | tokens/s | tokens per CPU second |",
        "|---|---|---|---|---|---|",
    ]
    for label, row in serving["batch"].items():
        lines.append(
            f"| {label} | {row['seconds']:.2f} | {row['cpu_seconds']:.2f} | {row['tokens']:.0f} | "
            f"{row['tokens_per_s']:.1f} | {row['tokens_per_cpu_s']:.1f} |"
        )
    rounds = next(iter(serving["batch"].values()))["rounds"]
    lines += [
        "",
        f"Medians of {rounds} rounds; the three layouts take turns within each round. CPU seconds are "
        "this process's CPU time, which other jobs on a shared machine change far less than wall time, "
        "so the target compares tokens per CPU second. Every row passes its adapter by name, so one "
        "adapter and three mixed run the same PEFT code path, and mixing adds one masked LoRA product "
        "per adapter present in the batch, per adapted layer.",
        "",
    ]
    return lines


def render_training(training: dict[str, Any], run: str) -> list[str]:
    lines = [
        "### LoRA vs full fine-tuning: sequence 256, batch 4, AdamW",
        "",
        run,
        "",
        "| method | trainable parameters | median s/step | median CPU s/step | profiled step: matrix "
        "products / other (CPU s) | peak RSS | peak RSS, freed memory returned | saved activations | "
        "artifact |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for label, row in training.items():
        lines.append(
            f"| {label} | {row['trainable_parameters']:,} | {row['median_step_seconds']:.2f} | "
            f"{row['median_step_cpu_seconds']:.2f} | "
            f"{row['matmul_s']:.1f} / {row['profiled_step_s'] - row['matmul_s']:.1f} | "
            f"{row['peak_rss_mb'] / 1024:.2f} GB | {row['live_peak_rss_mb'] / 1024:.2f} GB | "
            f"{row['saved_activations_mb'] / 1024:.2f} GB | {row['artifact_bytes'] / 2**20:.1f} MB |"
        )
    full = training.get(FULL_RUN)
    lora = training.get(DEFAULT_LORA_RUN)
    lines += [
        "",
        f"Each method trained {full['steps'] if full else '?'} steps in its own process; the first step "
        "is left out of the medians, and the step-time target compares CPU seconds (see the batch "
        "table above for why). Peak RSS is the training process's own high-water mark (VmHWM) right "
        "after the last step, model loading included. It is not `ru_maxrss`, which Linux carries over "
        'from the parent into a spawned process. The "freed memory returned" column repeats each '
        f"run for {next(iter(training.values())).get('memory_steps', 2)} steps with glibc's mmap "
        "threshold fixed at 64 KiB, so memory PyTorch has freed and glibc kept is not counted, and the "
        "memory target uses it. The profiled step and the saved activations (the tensors autograd "
        "keeps from the forward pass for the backward pass) come from one extra step per method under "
        "torch.profiler, in the benchmark's own process.",
        "",
    ]
    if full and lora:
        step_ratio = lora["median_step_cpu_seconds"] / full["median_step_cpu_seconds"]
        memory_ratio = lora["live_peak_rss_mb"] / full["live_peak_rss_mb"]
        optimizer_gb = 3 * 4 * full["trainable_parameters"] / 2**30
        matmul_ratio = lora["matmul_s"] / full["matmul_s"]
        other_ratio = (lora["profiled_step_s"] - lora["matmul_s"]) / (
            full["profiled_step_s"] - full["matmul_s"]
        )
        other_share = 1 - full["matmul_s"] / full["profiled_step_s"]
        lines += [
            f"The default LoRA recipe takes {step_ratio:.2f}× the CPU time per step of full fine-tuning "
            f"(target ≤ {TARGETS['step_ratio']}) and {memory_ratio:.2f}× its peak memory (target ≤ "
            f"{TARGETS['memory_ratio']}). LoRA skips the frozen layers' weight gradients and the optimizer "
            "update of 135M parameters, but it still runs the whole forward pass and back-propagates "
            "activation gradients through every layer. Counting matrix products (forward once, backward "
            "twice for full fine-tuning and once for LoRA) estimates its matrix work at about two thirds; "
            f"the profiled step measured {matmul_ratio:.2f}×. The rest of a step, {other_share:.0%} of full "
            "fine-tuning's (the log-softmax over the 49,152-word vocabulary, attention, element-wise "
            f"operations), costs LoRA {other_ratio:.2f}× as much"
            + (", because LoRA adds its own dropout masks and element-wise work" if other_ratio > 1 else
               ": it saves little there, because that work does not depend on which weights train")
            + ". So a step ratio of 0.5 is out of reach on this model. The profiler times each operator on "
            "the thread that calls it, while the CPU seconds above add up every thread's time, so with "
            "two threads the two ratios can differ. For memory, "
            "full fine-tuning adds gradients and two AdamW moments, 3 × 4 bytes per parameter "
            f"({optimizer_gb:.1f} GB), while autograd keeps {full['saved_activations_mb'] / 1024:.1f} GB of "
            f"activations for full fine-tuning and {lora['saved_activations_mb'] / 1024:.1f} GB for the "
            "default LoRA recipe in one forward pass. Dropout on the LoRA input stores a copy of each "
            "adapted projection's input ("
            + ("which the dropout-0 row avoids" if NO_DROPOUT_LORA_RUN in training
               else "`python -m benchmarks.adapters --only training --all-variants` adds a row without it")
            + "), and the 49,152-word vocabulary makes 0.2 GB per copy of the logits. Parameter-bound memory "
            "only dominates on larger bases, where the optimizer state alone is several times the "
            "activations.",
            "",
        ]
        no_dropout = training.get(NO_DROPOUT_LORA_RUN)
        if no_dropout:
            time_ratio = no_dropout["median_step_cpu_seconds"] / full["median_step_cpu_seconds"]
            peak_ratio = no_dropout["live_peak_rss_mb"] / full["live_peak_rss_mb"]
            lines += [
                f"Without LoRA dropout the same adapter takes {time_ratio:.2f}× the CPU time and "
                f"{peak_ratio:.2f}× the peak memory of full fine-tuning. PEFT 0.21's `LoraConfig` defaults "
                "to no dropout. bedside's recipe keeps 0.05, which the demo adapters and the FT-vs-PEFT "
                "comparison in docs/ft-vs-peft were trained with, and `--lora-dropout 0` selects the "
                "cheaper setting.",
                "",
            ]
    return lines


def render_routing(routing: dict[str, Any], run: str) -> list[str]:
    lines = [
        "### Routing on corpora/questions/demo_questions.jsonl",
        "",
        run,
        "",
        f"Adapters: {', '.join(routing['adapters'])}. A question whose specialty has an adapter should "
        "go to it (in scope); every other question (other specialties, not in the corpus) should go to "
        "the base model.",
        "",
        "| scoring | threshold | margin | in scope correct | out of scope to base | overall |",
        "|---|---|---|---|---|---|",
    ]
    default_key = tuple(routing["default"])
    for method in ("centroid", "nearest_question"):
        for row in routing[method]:
            is_default = method == "centroid" and (row["threshold"], row["margin"]) == default_key
            lines.append(
                f"| {method.replace('_', ' ')} | {row['threshold']:.2f} | {row['margin']:.2f}"
                f"{' (default)' if is_default else ''} | {row['in_scope'][0]}/{row['in_scope'][1]} | "
                f"{row['out_of_scope'][0]}/{row['out_of_scope'][1]} | {row['overall']:.2f} |"
            )
    default = next(r for r in routing["centroid"] if (r["threshold"], r["margin"]) == default_key)
    lines += [
        "",
        "The router scores centroids, one stored vector per adapter. Scoring the nearest training "
        "question instead is shown for comparison. The default threshold and margin were chosen on "
        "these same 30 questions, so their accuracy is optimistic.",
        "",
        f"In-scope questions score {routing['own_centroid_similarity'][0]:.2f}–"
        f"{routing['own_centroid_similarity'][1]:.2f} against their own adapter's centroid; "
        f"the others' best score is {routing['unrouted_best_similarity'][0]:.2f}–"
        f"{routing['unrouted_best_similarity'][1]:.2f}.",
    ]
    if default["misrouted"]:
        lines += [
            "Misrouted at the default threshold: "
            + "; ".join(
                f"“{q}…” → {p or 'base'} (expected {e or 'base'})" for q, p, e in default["misrouted"]
            )
            + "."
        ]
    lines.append("")
    return lines


def render_real(real: dict[str, Any], run: str) -> list[str]:
    lines = [
        "### Adapters trained on real data",
        "",
        run,
        "",
        "LoRA r=8 on the q, k, v and o projections, learning rate 1e-3, batch 4; held-out answer-token "
        "loss (lower is better). MedQuAD (Ben Abacha & Demner-Fushman, 2019, CC BY 4.0): one source "
        "folder each, held-out split by the recipe (10%). PubMedQA (Jin et al., 2019, MIT): trained on "
        "the 500 non-test questions with their abstracts, scored on an even spread of the test half. "
        "An example whose prompt alone fills the token limit has no answer token left, so the recipe "
        "drops it from training and scoring; the table counts what was used.",
        "",
        "| data | examples (training ones used) | steps | max tokens | held-out examples scored | base loss "
        "| adapter loss | s/step |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for label, row in real.items():
        lines.append(
            f"| {label} | {row['examples']} ({row['train_examples_used']}) | {row['steps']} | "
            f"{row['max_seq_length']} | {row['heldout_examples']} of {row['heldout_candidates']} | "
            f"{row['base_loss']:.3f} | {row['adapter_loss']:.3f} | {row['seconds_per_step']:.1f} |"
        )
    pubmedqa = next((row for label, row in real.items() if label.startswith("pubmedqa")), None)
    if pubmedqa and pubmedqa["heldout_examples"] < pubmedqa["heldout_candidates"]:
        lines += [
            "",
            f"PubMedQA prompts (question and abstract) often exceed {pubmedqa['max_seq_length']} tokens, so "
            "its adapter trained on the shorter abstracts and was scored on the shorter test questions. "
            "Its scores compare the base and the adapter on the same examples, but they do not describe "
            "long abstracts.",
        ]
    lines.append("")
    return lines


# running


def run_metadata(quick: bool) -> dict[str, Any]:
    import torch

    return {
        "date": today(),
        "quick": quick,
        "command": command_line() + (" --quick" if quick else ""),
        "machine": machine(),
        "load_average": load_average(),
        "threads": torch.get_num_threads(),
    }


def measure(parts: list[str], preset: Preset, save: bool = True) -> dict[str, Any]:
    """Measure `parts`, merge them into the saved results of the last runs and return them all.

    With `save` the merged results replace the saved ones after each part, so a failure later keeps
    the parts already measured.
    """
    from assistant.fileio import atomic_write_json

    results: dict[str, Any] = {}
    if RESULTS.is_file():
        results = json.loads(RESULTS.read_text(encoding="utf-8"))
    for part in parts:
        started = run_metadata(preset.quick)
        if part == "serving":
            data = bench_serving(preset.repeats)
        elif part == "training":
            data = bench_training(preset.train_steps, preset.memory_steps, preset.training_runs)
            for row in data.values():
                row["memory_steps"] = preset.memory_steps
        elif part == "routing":
            data = bench_routing()
        else:
            data = bench_real(preset.real_steps, preset.real_heldout)
        results[part] = {"run": started, "data": data}
        if save:
            atomic_write_json(RESULTS, results)
    return results


def write(results: dict[str, Any]) -> None:
    write_section(MODULE, render(results))
    record_figures(results)


# `make bench` must finish in 30 minutes, and training on real data takes about 10 of them on two
# idle cores. So the suite leaves that part to `python -m benchmarks.adapters --only real`.
SUITE_PARTS = ["serving", "training", "routing"]


def run(quick: bool) -> None:
    """Measure and write the "adapters" section of docs/benchmarks.md (the entry point of benchmarks.run).

    The suite skips the real-data training (see SUITE_PARTS); its last results stay in the section.
    """
    write(measure(SUITE_PARTS, QUICK if quick else FULL))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--quick",
        action="store_true",
        help="fewer repeats and steps, two training methods, no real-data training",
    )
    parser.add_argument(
        "--only",
        nargs="+",
        choices=PARTS,
        help="measure only these parts (default: all; with --quick: all but real)",
    )
    parser.add_argument("--repeats", type=int, help="timed repeats per serving figure (default: 5, quick 3)")
    parser.add_argument(
        "--train-steps", type=int, help="steps per method in the training part (default: 4, quick 3)"
    )
    parser.add_argument(
        "--all-variants",
        action="store_true",
        help=f"train every LoRA variant, not only the suite's ({', '.join(SUITE_TRAINING_RUNS)})",
    )
    parser.add_argument("--real-steps", type=int, help="steps per real-data adapter (default: 40)")
    parser.add_argument("--real-heldout", type=int, help="PubMedQA test questions scored (default: 100)")
    parser.add_argument(
        "--no-write",
        action="store_true",
        help="print the section only; leave docs/benchmarks.md, the summary figures and saved results alone",
    )
    parser.add_argument(
        "--report-only",
        action="store_true",
        help="measure nothing; render the section from the saved results",
    )
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    for noisy in ("transformers", "peft", "sentence_transformers"):
        logging.getLogger(noisy).setLevel(logging.WARNING)

    preset = copy.deepcopy(QUICK if args.quick else FULL)
    for name in ("repeats", "train_steps", "real_steps", "real_heldout"):
        if getattr(args, name) is not None:
            setattr(preset, name, getattr(args, name))
    if args.all_variants:
        preset.training_runs = list(TRAINING_RUNS)
    parts = args.only or (SUITE_PARTS if args.quick else list(PARTS))
    if args.report_only:
        if not RESULTS.is_file():
            raise SystemExit(f"no saved results in {RESULTS}; run without --report-only first")
        results = json.loads(RESULTS.read_text(encoding="utf-8"))
    else:
        results = measure(parts, preset, save=not args.no_write)
    if args.no_write:
        print(render(results))
    else:
        write(results)
        print(f"wrote the {MODULE} section of docs/benchmarks.md")


if __name__ == "__main__":
    main()
