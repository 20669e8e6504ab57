"""Adapters and training: load and switch times, mixed-adapter batches, LoRA vs full steps, routing,
and adapters trained on real data (MedQuAD folders, the PubMedQA training half).

Run as `python -m benchmarks.adapters` from the repository root after the demo adapters exist
(`adapters/README.md`). `--only` picks sections; the results replace the "adapters" section of
docs/benchmarks.md unless `--no-write` is given. The real-data section needs ../shared/data.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import multiprocessing
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks.common import REPO, SHARED_DATA, command_line, load_average, machine, today, write_section

logger = logging.getLogger(__name__)

SECTIONS = ("serving", "training", "routing", "real")
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


# serving: load, switch, batch

def demo_generator() -> tuple[Any, Any, list[dict[str, Any]]]:
    """A generator on a private fp32 copy of the embedded base, and the active demo registry entries."""
    from assistant import models
    from assistant.answer.generation import LocalGenerator
    from assistant.tuning.registry import AdapterRegistry

    spec = models.resolve_model("")
    model, tokenizer = models.load_base_model(spec, "float32", "cpu")
    generator = LocalGenerator(copy.deepcopy(model), tokenizer, spec.display_name, models.model_fingerprint(spec))
    registry = AdapterRegistry(ADAPTERS_DIR)
    entries = registry.active_entries()
    if len(entries) < 3:
        raise SystemExit(f"{ADAPTERS_DIR}/registry.json has {len(entries)} active adapters; build the demo adapters "
                         "first (adapters/README.md)")
    return generator, registry, entries


def bench_serving(repeats: int) -> dict[str, Any]:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from assistant import models
    from assistant.answer.generation import GenerationSettings
    from assistant.tuning.loading import (
        check_adapter_files,
        check_base_fingerprint,
        check_file_hashes,
        check_target_modules,
        load_registered_adapter,
    )

    results: dict[str, Any] = {}
    spec = models.resolve_model("")
    folder = models.dequantized_gguf_folder(spec)

    # base load from the safetensors cache, as every process after the first pays it
    def load_base() -> None:
        AutoTokenizer.from_pretrained(str(folder))
        AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32, use_safetensors=True)

    results["base_load_s"] = median_of(load_base, max(3, repeats // 2))

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
    later = []
    for attempt in range(repeats):
        entry = {**entries[attempt % len(entries)], "name": f"bench-load-{attempt}"}
        start = time.perf_counter()
        load_registered_adapter(generator, registry, entry)
        later.append(time.perf_counter() - start)
        generator.unload_adapter(entry["name"])
    results["adapter_load_s"] = statistics.median(later)

    def checks() -> None:
        folder = registry.folder(entries[0])
        check_adapter_files(folder)
        check_base_fingerprint(entries[0], generator.model_fingerprint)
        check_file_hashes(entries[0], folder)
        check_target_modules(generator.model, folder)

    results["checks_ms"] = 1e3 * median_of(checks, repeats)

    # switching: PEFT's global set_adapter, the per-call layer toggle, and a 1-token request
    peft_model = generator.model
    results["set_adapter_ms"] = 1e3 * median_of(lambda: [peft_model.set_adapter(n) for n in names[:2]],
                                                 repeats * 4) / 2

    def toggle() -> None:
        with generator.adapters_active():
            pass

    results["toggle_ms"] = 1e3 * median_of(toggle, repeats * 4)
    one_token = GenerationSettings(max_new_tokens=1)
    prompt = [{"role": "user", "content": BATCH_QUESTIONS[0]}]
    same = median_of(lambda: [generator.generate(prompt, names[0], one_token) for _ in range(2)], repeats)
    alternating = median_of(lambda: [generator.generate(prompt, n, one_token) for n in names[:2]], repeats)
    results["request_same_adapter_ms"] = 1e3 * same / 2
    results["request_alternating_ms"] = 1e3 * alternating / 2

    # batch of 8: one adapter for all rows, three adapters mixed, and the base route
    settings = GenerationSettings(max_new_tokens=32)
    prompts = [[{"role": "user", "content": q}] for q in BATCH_QUESTIONS]
    layouts = {"base route": [None] * 8, "one adapter": [names[0]] * 8,
               "three adapters mixed": [names[i % 3] for i in range(8)]}
    results["batch"] = {}
    for label, adapters in layouts.items():
        outputs: list[str] = []

        def run(adapters: list[str | None] = adapters, outputs: list[str] = outputs) -> None:
            outputs[:] = generator.generate_batch(prompts, adapters, settings)

        seconds = median_of(run, max(2, repeats // 2))
        tokens = sum(len(generator.tokenizer(text, add_special_tokens=False).input_ids) for text in outputs)
        results["batch"][label] = {"seconds": seconds, "tokens": tokens, "tokens_per_s": tokens / seconds}
    return results


def median_of(function: Any, repeats: int) -> float:
    function()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


# training: LoRA vs full at sequence 256, batch 4

def long_examples(path: Path) -> Path:
    """Write one example per demo guideline: its title as the request, its body (over 256 tokens) as the answer."""
    from assistant.corpus import load_corpus

    documents = load_corpus([DEMO_CORPUS]).documents
    lines = [json.dumps({"instruction": f"Summarise the guideline: {d.title}",
                         "output": "\n\n".join(s.text for s in d.sections)}) for d in documents]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def _train_child(overrides: dict[str, Any], adapters_dir: str, result_path: str) -> None:
    from assistant.config import Settings
    from assistant.tuning.config import load_train_config
    from assistant.tuning.recipes import train

    result = train(load_train_config(None, overrides), Settings(adapters_dir=Path(adapters_dir), device="cpu"))
    size = sum(p.stat().st_size for p in result.output.rglob("*") if p.is_file())
    Path(result_path).write_text(json.dumps({**result.metrics, "artifact_bytes": size}), encoding="utf-8")


def train_in_child(overrides: dict[str, Any], workdir: Path) -> dict[str, Any]:
    """Train in a spawned process so its peak RSS belongs to that method alone."""
    result_path = workdir / f"{overrides['name']}.json"
    process = multiprocessing.get_context("spawn").Process(
        target=_train_child, args=(overrides, str(workdir / "adapters"), str(result_path)))
    process.start()
    process.join()
    if not result_path.is_file():
        raise SystemExit(f"training {overrides['name']} failed (exit code {process.exitcode})")
    return json.loads(result_path.read_text(encoding="utf-8"))


def bench_training(steps: int) -> dict[str, Any]:
    runs = {
        "full fine-tuning": {"method": "full"},
        "LoRA r=8 (q, k, v, o)": {"method": "lora", "lora_r": 8, "lora_alpha": 16,
                                  "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"]},
        "LoRA r=16 (all projections, default)": {"method": "lora"},
    }
    results = {}
    with tempfile.TemporaryDirectory(prefix="bedside-bench-") as tmp:
        workdir = Path(tmp)
        data = long_examples(workdir / "long.jsonl")
        for number, (label, method) in enumerate(runs.items()):
            overrides = {"specialty": "bench", "data": str(data), "max_steps": steps, "batch_size": 4,
                         "max_seq_length": 256, "eval_fraction": 0.0, "register": False, "seed": 0,
                         "name": f"bench-{number}", "out": str(workdir / f"out-{number}"), **method}
            results[label] = train_in_child(overrides, workdir)
    return results


# routing accuracy on the demo questions

def bench_routing() -> dict[str, Any]:
    import numpy as np

    from assistant import models
    from assistant.tuning.data import load_examples
    from assistant.tuning.registry import AdapterRegistry
    from assistant.tuning.routing import DEFAULT_MARGIN, DEFAULT_THRESHOLD

    registry = AdapterRegistry(ADAPTERS_DIR)
    entries = registry.active_entries()
    embedder = models.load_embedder(models.resolve_embedder(""), "cpu")
    questions = [json.loads(line) for line in DEMO_QUESTIONS.read_text(encoding="utf-8").splitlines() if line]
    specialties = [e["specialty"] for e in entries]
    expected = [q["specialty"] if q["specialty"] in specialties else None for q in questions]

    vectors = embedder.encode([q["question"] for q in questions], normalize_embeddings=True,
                              convert_to_numpy=True, show_progress_bar=False)
    centroids = np.array([e["router"]["centroid"] for e in entries], dtype=np.float32)
    centroid_scores = vectors @ centroids.T
    # the alternative: similarity to the single nearest training question of each adapter
    nearest_scores = np.zeros_like(centroid_scores)
    for column, entry in enumerate(entries):
        examples = load_examples(REPO / entry["data"]["path"]).examples
        train_vectors = embedder.encode([e.question for e in examples], normalize_embeddings=True,
                                        convert_to_numpy=True, show_progress_bar=False)
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
        return {"threshold": threshold, "margin": margin,
                "in_scope": (sum(p == e for p, e in in_scope), len(in_scope)),
                "out_of_scope": (sum(p is None for p, _ in out_scope), len(out_scope)),
                "overall": sum(p == e for p, e in pairs) / len(pairs),
                "misrouted": [(questions[i]["question"][:70], picked[i], expected[i])
                              for i, (p, e) in enumerate(pairs) if p != e]}

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


# real data: MedQuAD folders and the PubMedQA training half

MEDQUAD_SETS = {"medquad-nhlbi (heart, lung, blood)": "8_NHLBI_QA_XML", "medquad-cdc (infectious disease)": "9_CDC_QA"}


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
            pubmedqa_training_records(pubmedqa, "train"), scored, 384)

        for number, (label, (records, external, seq)) in enumerate(sets.items()):
            path = workdir / f"set{number}.jsonl"
            path.write_text("\n".join(json.dumps(r) for r in records) + "\n", encoding="utf-8")
            config = load_train_config(None, {
                "specialty": f"real{number}", "data": str(path), "method": "lora", "lora_r": 8, "lora_alpha": 16,
                "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"], "lr": 1e-3, "max_steps": steps,
                "batch_size": 4, "max_seq_length": seq, "eval_fraction": 0.0 if external else 0.1,
                "register": False, "seed": 0, "out": str(workdir / f"adapter{number}"),
            })
            result = train(config, Settings(adapters_dir=workdir / "adapters", device="cpu"))
            row = {"examples": len(records), "steps": result.metrics["steps"],
                   "seconds_per_step": result.metrics["median_step_seconds"], "max_seq_length": seq}
            if external is None:
                record = json.loads((result.output / "training.json").read_text(encoding="utf-8"))
                row.update(heldout_examples=record["data"]["heldout_examples"],
                           base_loss=result.metrics["base_heldout_loss"], adapter_loss=result.metrics["heldout_loss"])
            else:
                tokenizer = _tokenizer()
                rows = tokenize_examples(tokenizer, [Example(record_to_messages(r), n) for n, r in
                                                     enumerate(external, 1)], seq, purpose="evaluation")
                model = result.model
                with model.disable_adapter():
                    base = heldout_loss(model, tokenizer, rows, batch_size=4)
                tuned = heldout_loss(model, tokenizer, rows, batch_size=4)
                row.update(heldout_examples=len(rows), base_loss=base["loss"], adapter_loss=tuned["loss"])
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


# report

def render(results: dict[str, Any], shared_note: str) -> str:
    lines = ["## Adapters and training", "",
             f"`{command_line()}` on {today()}: {machine()}. Load average at the start: {shared_note}. "
             "fp32 weights, greedy decoding, the embedded SmolLM2-135M base and the demo adapters in `adapters/`.",
             ""]
    serving = results.get("serving")
    if serving:
        lines += [
            "### Loading and switching", "",
            "| operation | median |", "|---|---|",
            f"| load the base model (safetensors cache, tokenizer included) | {serving['base_load_s']:.2f} s |",
            f"| load the first adapter (checks + PEFT load, wrapping the base) | "
            f"{1e3 * serving['first_adapter_load_s']:.0f} ms |",
            f"| load one more adapter beside loaded ones (checks + PEFT load) | "
            f"{1e3 * serving['adapter_load_s']:.0f} ms |",
            f"| PEFT `set_adapter` between two loaded adapters | {serving['set_adapter_ms']:.2f} ms |",
            f"| turning adapter layers on and off around a request | {serving['toggle_ms']:.2f} ms |",
            f"| 1-token request, same adapter as the previous request | {serving['request_same_adapter_ms']:.0f} ms |",
            f"| 1-token request, other adapter than the previous request | "
            f"{serving['request_alternating_ms']:.0f} ms |",
            "",
            f"Loading an adapter costs {serving['adapter_load_s'] / serving['base_load_s']:.0%} of loading the base. "
            f"The checks (fingerprint, file hashes, target modules) take {serving['checks_ms']:.0f} ms of it; the "
            "rest is PEFT injecting layers, mostly Python walking the module tree. Requests pick their adapter through "
            "PEFT's `adapter_names`, so switching is no separate step: compare the two 1-token rows.",
            "",
            "### Batch of 8 requests, 32 new tokens", "",
            "| rows use | seconds | generated tokens | tokens/s |", "|---|---|---|---|",
        ]
        for label, row in serving["batch"].items():
            lines.append(f"| {label} | {row['seconds']:.2f} | {row['tokens']} | {row['tokens_per_s']:.1f} |")
        lines.append("")
    training = results.get("training")
    if training:
        lines += ["### LoRA vs full fine-tuning: sequence 256, batch 4, AdamW", "",
                  "| method | trainable parameters | median s/step | peak RSS | artifact |", "|---|---|---|---|---|"]
        for label, row in training.items():
            lines.append(f"| {label} | {row['trainable_parameters']:,} | {row['median_step_seconds']:.2f} | "
                         f"{row['peak_rss_mb'] / 1024:.2f} GB | {row['artifact_bytes'] / 2**20:.1f} MB |")
        lines += ["", "Each method ran in its own process; peak RSS includes loading the model. Steps after the "
                      "first are timed.", ""]
    routing = results.get("routing")
    if routing:
        lines += ["### Routing on corpora/questions/demo_questions.jsonl", "",
                  f"Adapters: {', '.join(routing['adapters'])}. A question whose specialty has an adapter should "
                  "go to it (in scope); every other question (other specialties, not in the corpus) should go to "
                  "the base model.", "",
                  "| scoring | threshold | margin | in scope correct | out of scope to base | overall |",
                  "|---|---|---|---|---|---|"]
        default_key = tuple(routing["default"])
        for method in ("centroid", "nearest_question"):
            for row in routing[method]:
                is_default = method == "centroid" and (row["threshold"], row["margin"]) == default_key
                lines.append(f"| {method.replace('_', ' ')} | {row['threshold']:.2f} | {row['margin']:.2f}"
                             f"{' (default)' if is_default else ''} | {row['in_scope'][0]}/{row['in_scope'][1]} | "
                             f"{row['out_of_scope'][0]}/{row['out_of_scope'][1]} | {row['overall']:.2f} |")
        default = next(r for r in routing["centroid"] if (r["threshold"], r["margin"]) == default_key)
        lines += ["", "The router scores centroids, one stored vector per adapter. Scoring the nearest training "
                      "question instead routes every in-scope question but sends more of the others to an "
                      "adapter. The default threshold and margin were chosen on these same 30 questions, so their "
                      "accuracy is optimistic.",
                  "", f"In-scope questions score {routing['own_centroid_similarity'][0]:.2f}–"
                      f"{routing['own_centroid_similarity'][1]:.2f} against their own adapter's centroid; "
                      f"the others' best score is {routing['unrouted_best_similarity'][0]:.2f}–"
                      f"{routing['unrouted_best_similarity'][1]:.2f}."]
        if default["misrouted"]:
            lines += ["Misrouted at the default threshold: " + "; ".join(
                f"“{q}…” → {p or 'base'} (expected {e or 'base'})" for q, p, e in default["misrouted"]) + "."]
        lines.append("")
    real = results.get("real")
    if real:
        lines += ["### Adapters trained on real data", "",
                  "LoRA r=8 on q, k, v, o projections, learning rate 1e-3, batch 4, held-out answer-token loss "
                  "(lower is better). MedQuAD (Ben Abacha & Demner-Fushman, 2019, CC BY 4.0): one source folder "
                  "each, held-out split by the recipe. PubMedQA (Jin et al., 2019, MIT): trained on the 500 "
                  "non-test questions with their abstracts, scored on an even spread of the test half.", "",
                  "| data | examples | steps | max tokens | held-out examples | base loss | adapter loss | s/step |",
                  "|---|---|---|---|---|---|---|---|"]
        for label, row in real.items():
            lines.append(f"| {label} | {row['examples']} | {row['steps']} | {row['max_seq_length']} | "
                         f"{row['heldout_examples']} | {row['base_loss']:.3f} | {row['adapter_loss']:.3f} | "
                         f"{row['seconds_per_step']:.1f} |")
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", nargs="+", choices=SECTIONS, default=list(SECTIONS))
    parser.add_argument("--repeats", type=int, default=5, help="timed repeats per serving figure")
    parser.add_argument("--train-steps", type=int, default=6, help="steps per method in the training section")
    parser.add_argument("--real-steps", type=int, default=40, help="steps per real-data adapter")
    parser.add_argument("--real-heldout", type=int, default=100, help="PubMedQA test questions scored")
    parser.add_argument("--no-write", action="store_true", help="print only; leave docs/benchmarks.md alone")
    parser.add_argument("--json", type=Path, help="also write the raw results to this file")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    for noisy in ("transformers", "peft", "sentence_transformers"):
        logging.getLogger(noisy).setLevel(logging.WARNING)

    shared_note = load_average()
    results: dict[str, Any] = {}
    if "serving" in args.only:
        results["serving"] = bench_serving(args.repeats)
    if "training" in args.only:
        results["training"] = bench_training(args.train_steps)
    if "routing" in args.only:
        results["routing"] = bench_routing()
    if "real" in args.only:
        if not (SHARED_DATA / "medquad").is_dir():
            raise SystemExit(f"{SHARED_DATA} has no medquad folder; set BEDSIDE_SHARED_DATA")
        results["real"] = bench_real(args.real_steps, args.real_heldout)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2, default=str), encoding="utf-8")
    markdown = render(results, shared_note)
    print(markdown)
    if not args.no_write:
        write_section("adapters", markdown)


if __name__ == "__main__":
    main()
