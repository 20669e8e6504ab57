"""Full fine-tuning vs parameter-efficient tuning on one data set, one seed and one token budget.

`run_compare` reads top to bottom. It validates the settings, prepares the training file (with
canaries) and scores the untrained base. Then it trains each method with the `bedside train`
recipe in a fresh process and scores its artifact, and finally it writes the report. Training runs in a
child process so its peak resident memory (VmHWM, see `assistant.tuning.recipes.peak_rss_mb`) belongs to
that method alone rather than to whatever ran before it.

Every method gets the same examples in the same seeded order, the same number of optimizer steps,
the same batch size and the same maximum sequence length, so each sees the same tokens; only the
learning rate differs, set to each method's usual default unless overridden.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import multiprocessing
import os
import platform
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from assistant import __version__, models
from assistant.config import Settings
from assistant.errors import BedsideError
from assistant.evaluation import canaries as canary_lib
from assistant.evaluation.datasets import spread
from assistant.evaluation.scoring import (
    decision_heldout,
    detect_task,
    heldout_quality,
    load_chat_examples,
    load_text_lines,
    task_quality,
    text_perplexity,
)
from assistant.fileio import atomic_write_text
from assistant.jsonl import jsonl_lines

logger = logging.getLogger(__name__)

COMPARE_METHODS = ("full", "lora", "qlora")
REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_GENERAL_TEXT = REPO_ROOT / "corpora" / "general" / "general_english.txt"


@dataclass
class CompareConfig:
    """Settings of one comparison; saved in report.json."""

    data: str = field(metadata={"help": "training JSONL (chat or instruction records)"})
    eval: str = field(metadata={"help": "held-out JSONL in the same format"})
    out: str = field(metadata={"help": "output folder for data, artifacts, report and plots"})
    methods: list[str] = field(default_factory=lambda: ["full", "lora"])
    base: str = ""
    max_steps: int = 60
    seed: int = 42
    batch_size: int = 4
    max_seq_length: int = 512
    learning_rates: dict[str, float] = field(default_factory=dict)
    lora_r: int = 16
    lora_alpha: int = 32
    eval_limit: int = 0
    general_text: str = str(DEFAULT_GENERAL_TEXT)
    canary_repeats: int = 10
    canary_candidates: int = 1000
    max_new_tokens: int = 96
    specialty: str = "compare"
    command: str = ""

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def validate_compare_config(config: CompareConfig) -> None:
    """Reject impossible settings before any model loads, naming the value and a valid alternative."""
    import torch

    unknown = [m for m in config.methods if m not in COMPARE_METHODS]
    if unknown or not config.methods:
        raise BedsideError(f"--methods {','.join(config.methods)!r} is invalid; use a comma-separated list of "
                           f"{', '.join(COMPARE_METHODS)}, e.g. full,lora")
    if len(set(config.methods)) != len(config.methods):
        raise BedsideError(f"--methods {','.join(config.methods)!r} names a method twice; list each once")
    if "qlora" in config.methods and not torch.cuda.is_available():
        raise BedsideError("--methods includes qlora, which needs a CUDA GPU, and none is visible; "
                           "compare full,lora on this machine")
    for name, path in (("--data", config.data), ("--eval", config.eval), ("--general-text", config.general_text)):
        if not Path(path).is_file():
            raise BedsideError(f"{name} file {path!r} not found; pass an existing file")
    checks = [
        ("--max-steps", config.max_steps >= 1), ("--batch-size", config.batch_size >= 1),
        ("--max-seq-length", config.max_seq_length >= 16), ("--canary-repeats", config.canary_repeats >= 0),
        ("--canary-candidates", config.canary_candidates >= 2), ("--eval-limit", config.eval_limit >= 0),
        ("--max-new-tokens", config.max_new_tokens >= 1),
    ]
    for flag, ok in checks:
        if not ok:
            raise BedsideError(f"{flag} has an invalid value; see `bedside compare --help` for the allowed range")
    for method, rate in config.learning_rates.items():
        if method not in COMPARE_METHODS or rate <= 0:
            raise BedsideError(f"learning rate {method}={rate} is invalid; use METHOD=RATE with a positive rate")


# data preparation

def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with Path(path).open("rb") as handle:
        while block := handle.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def prepare_training_file(config: CompareConfig, out: Path) -> tuple[Path, list[canary_lib.Canary]]:
    """Copy the training lines with the canaries inserted; the original file is not changed."""
    lines = [_ascii_line(line) for line in jsonl_lines(Path(config.data).read_text(encoding="utf-8"))
             if line.strip()]
    canaries = canary_lib.make_canaries(config.seed) if config.canary_repeats else []
    mixed = canary_lib.insert_canaries(lines, canaries, config.canary_repeats, config.seed)
    path = out / "data" / "train_with_canaries.jsonl"
    atomic_write_text(path, "\n".join(mixed) + "\n")
    return path, canaries


def _ascii_line(line: str) -> str:
    """Re-serialise a JSON line with ASCII escapes; an invalid line is kept for the recipe to report."""
    try:
        return json.dumps(json.loads(line), ensure_ascii=True)
    except json.JSONDecodeError:
        return line


# training in a child process

def train_config_overrides(config: CompareConfig, method: str, data: Path, artifact: Path) -> dict[str, Any]:
    """The `bedside train` settings of one method: shared budget, the method's own learning rate."""
    return {
        "specialty": config.specialty, "data": str(data), "method": method, "base": config.base,
        "out": str(artifact), "name": f"{config.specialty}-{method}", "seed": config.seed,
        "max_steps": config.max_steps, "batch_size": config.batch_size, "grad_accum": 1,
        "max_seq_length": config.max_seq_length, "lr": config.learning_rates.get(method, 0.0),
        "lora_r": config.lora_r, "lora_alpha": config.lora_alpha,
        # the held-out set is the --eval file, scored after training for every method alike
        "eval_fraction": 0.0, "logging_steps": 1, "register": False,
    }


def _train_child(overrides: dict[str, Any], settings: dict[str, Any], result_path: str, log_level: int) -> None:
    """Entry point of the training process: run the recipe, write metrics (or the error) as JSON."""
    logging.basicConfig(level=log_level, format="%(levelname)s %(name)s: %(message)s")
    for noisy in ("transformers", "peft", "sentence_transformers", "httpx"):
        logging.getLogger(noisy).setLevel(max(log_level, logging.WARNING))
    started = time.perf_counter()
    try:
        import torch

        from assistant.config import load_settings
        from assistant.tuning.config import load_train_config
        from assistant.tuning.recipes import peak_rss_mb, train

        resolved = load_settings(None, settings)
        config = load_train_config(None, overrides)
        result = train(config, resolved, progress=False)
        metrics = dict(result.metrics)
        metrics["process_seconds"] = round(time.perf_counter() - started, 2)
        metrics["peak_rss_mb"] = peak_rss_mb()
        metrics["peak_cuda_mb"] = (round(torch.cuda.max_memory_allocated() / 2**20, 1)
                                   if torch.cuda.is_available() and torch.cuda.max_memory_allocated() else None)
        metrics["learning_rate"] = config.learning_rate
        payload = {"ok": True, "output": str(result.output), "metrics": metrics}
    except BedsideError as err:
        payload = {"ok": False, "error": str(err)}
    except Exception as err:  # reported to the parent, which raises it with the method named
        logging.getLogger(__name__).exception("training failed")
        payload = {"ok": False, "error": f"{type(err).__name__}: {err}"}
    Path(result_path).write_text(json.dumps(payload), encoding="utf-8")


def train_method(config: CompareConfig, settings: Settings, method: str, data: Path, artifact: Path) -> dict[str, Any]:
    """Train one method in a spawned process and return its metrics (with wall time and peak RSS)."""
    result_path = artifact.parent / f"{method}-train-result.json"
    result_path.parent.mkdir(parents=True, exist_ok=True)
    result_path.unlink(missing_ok=True)
    context = multiprocessing.get_context("spawn")
    process = context.Process(
        target=_train_child, name=f"bedside-train-{method}",
        args=(train_config_overrides(config, method, data, artifact), settings.to_dict(), str(result_path),
              logging.getLogger().getEffectiveLevel()),
    )
    start = time.perf_counter()
    process.start()
    process.join()
    wall = time.perf_counter() - start
    if not result_path.is_file():
        raise BedsideError(f"training {method} ended with exit code {process.exitcode} and no result (killed, "
                           "perhaps for memory); lower --batch-size or --max-seq-length and rerun")
    payload = json.loads(result_path.read_text(encoding="utf-8"))
    if not payload["ok"]:
        raise BedsideError(f"training {method} failed: {payload['error']}")
    metrics = payload["metrics"]
    metrics["wall_seconds"] = round(wall, 2)
    return metrics


# scoring one model

def load_base_copy(spec: models.ModelSpec, device: str) -> tuple[Any, Any]:
    """Load a private fp32 copy of the base model (not the process-wide shared one)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = models.dequantized_gguf_folder(spec) if spec.gguf_file else Path(spec.path)
    load_from = str(folder) if folder.exists() else spec.path
    tokenizer = AutoTokenizer.from_pretrained(load_from)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(load_from, dtype=torch.float32, use_safetensors=True).to(device)
    model.eval()
    return model, tokenizer


def load_artifact(method: str, artifact: Path, spec: models.ModelSpec, device: str) -> tuple[Any, Any, float]:
    """Load a trained artifact the way serving would; returns (model, tokenizer, load seconds).

    The seconds measure what a rollback costs: attaching an adapter to a base already in memory,
    or loading a whole model folder.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if method == "full":
        start = time.perf_counter()
        tokenizer = AutoTokenizer.from_pretrained(str(artifact))
        model = AutoModelForCausalLM.from_pretrained(str(artifact), dtype=torch.float32, use_safetensors=True)
        model.to(device).eval()
        seconds = time.perf_counter() - start
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        return model, tokenizer, seconds
    from peft import PeftModel

    base, tokenizer = load_base_copy(spec, device)
    start = time.perf_counter()
    model = PeftModel.from_pretrained(base, str(artifact), is_trainable=False)
    model.eval()
    return model, tokenizer, time.perf_counter() - start


def score_model(model: Any, tokenizer: Any, config: CompareConfig, eval_examples: list[Any], task: str,
                general_lines: list[str], canaries: list[canary_lib.Canary]) -> dict[str, Any]:
    """Held-out loss and task metric, general-text perplexity and canary memorization of one model."""
    scores: dict[str, Any] = {"eval_seconds": {}}

    def timed(name: str, step: Any) -> Any:
        start = time.perf_counter()
        value = step()
        scores["eval_seconds"][name] = round(time.perf_counter() - start, 2)
        logger.info("scored %s in %.1f s", name, scores["eval_seconds"][name])
        return value

    if task == "decision":
        scores["heldout"], scores["task"] = timed("heldout_and_task", lambda: decision_heldout(
            model, tokenizer, eval_examples, config.max_seq_length))
    else:
        scores["heldout"] = timed("heldout", lambda: heldout_quality(model, tokenizer, eval_examples,
                                                                     config.max_seq_length))
        scores["task"] = timed("task", lambda: task_quality(model, tokenizer, eval_examples, task,
                                                            config.max_new_tokens))
    scores["general_text"] = timed("general_text", lambda: text_perplexity(model, tokenizer, general_lines))
    scores["memorization"] = timed("memorization", lambda: canary_lib.memorization(
        model, tokenizer, canaries, config.canary_candidates, config.seed)) if canaries else None
    return scores


def artifact_summary(folder: Path) -> dict[str, Any]:
    """Size on disk and sha256 of every file, plus one digest over the (name, hash) pairs."""
    files = {str(p.relative_to(folder)): sha256_file(p) for p in sorted(folder.rglob("*")) if p.is_file()}
    size = sum((folder / name).stat().st_size for name in files)
    digest = hashlib.sha256("".join(f"{name}\x00{h}\n" for name, h in files.items()).encode()).hexdigest()
    return {"path": str(folder), "bytes": size, "sha256": digest, "files": files}


# the comparison

def run_compare(config: CompareConfig, settings: Settings) -> dict[str, Any]:
    """Train and score each method; write report.json, report.md and plots into `config.out`."""
    from assistant.evaluation.report import write_report

    # settings and inputs: everything that needs no model is checked first
    validate_compare_config(config)
    out = Path(config.out)
    artifacts = out / "artifacts"
    for method in config.methods:
        if (artifacts / method).exists():
            raise BedsideError(f"{str(artifacts / method)!r} already exists from an earlier run; pass another "
                               "--out or remove that folder")
    eval_examples = load_chat_examples(Path(config.eval))
    eval_examples = [eval_examples[i] for i in spread(list(range(len(eval_examples))), config.eval_limit)]
    task = detect_task(eval_examples)
    general_lines = load_text_lines(Path(config.general_text))
    train_data, canaries = prepare_training_file(config, out)
    train_examples = load_chat_examples(train_data)
    spec = models.resolve_model(config.base or settings.model)
    device = models.choose_device(settings.device)
    logger.info("comparing %s on %s: %d training examples (%d canary copies), %d held-out (%s task)",
                ",".join(config.methods), spec.display_name, len(train_examples),
                config.canary_repeats * len(canaries), len(eval_examples), task)

    # the untrained base: the reference for quality, forgetting and exposure
    started = time.perf_counter()
    base_model, tokenizer = load_base_copy(spec, device)
    rows: dict[str, Any] = {"base": {"method": "base", **score_model(base_model, tokenizer, config, eval_examples,
                                                                      task, general_lines, canaries)}}
    train_tokens = token_count(tokenizer, train_examples, config.max_seq_length)
    del base_model

    # each method: train in a fresh process, then score the saved artifact
    for method in config.methods:
        logger.info("training %s for %d steps", method, config.max_steps)
        metrics = train_method(config, settings, method, train_data, artifacts / method)
        model, tokenizer, load_seconds = load_artifact(method, artifacts / method, spec, device)
        row = {"method": method, "training": metrics, "load_seconds": round(load_seconds, 3),
               "artifact": artifact_summary(artifacts / method)}
        row.update(score_model(model, tokenizer, config, eval_examples, task, general_lines, canaries))
        rows[method] = row
        del model

    # report
    report = {
        "bedside_version": __version__,
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "config": config.to_dict(),
        "settings": settings.to_dict(),
        "base": {"name": spec.display_name, "fingerprint": models.model_fingerprint(spec)},
        "data": {
            "train": {"path": config.data, "sha256": sha256_file(Path(config.data)),
                      "examples": len(train_examples) - config.canary_repeats * len(canaries)},
            "train_with_canaries": {"path": str(train_data), "sha256": sha256_file(train_data),
                                    "examples": len(train_examples), "tokens": train_tokens},
            "eval": {"path": config.eval, "sha256": sha256_file(Path(config.eval)),
                     "examples_scored": len(eval_examples), "task": task},
            "general_text": {"path": display_path(config.general_text),
                             "sha256": sha256_file(Path(config.general_text)),
                             "lines": len(general_lines)},
        },
        "budget": {"max_steps": config.max_steps, "batch_size": config.batch_size,
                   "max_seq_length": config.max_seq_length, "seed": config.seed,
                   "examples_seen": config.max_steps * config.batch_size,
                   "epochs": round(config.max_steps * config.batch_size / len(train_examples), 3)},
        "canaries": {"planted": [c.to_dict() for c in canaries], "repeats": config.canary_repeats,
                     "candidates": config.canary_candidates,
                     "expected_copies_seen": round(config.canary_repeats * min(
                         1.0, config.max_steps * config.batch_size / len(train_examples)), 2)},
        "machine": machine_summary(device),
        "results": rows,
        "total_seconds": round(time.perf_counter() - started, 1),
    }
    write_report(report, out)
    return report


def token_count(tokenizer: Any, examples: list[Any], max_seq_length: int) -> dict[str, int]:
    """Tokens of the training file as the recipe tokenizes it: all tokens and answer (loss) tokens."""
    from assistant.tuning.data import IGNORE_INDEX, tokenize_examples

    rows = tokenize_examples(tokenizer, examples, max_seq_length)
    return {"all": sum(len(r["input_ids"]) for r in rows),
            "answer": sum(sum(label != IGNORE_INDEX for label in r["labels"]) for r in rows)}


def display_path(path: str) -> str:
    """A path inside this checkout relative to its root (stable across machines), others unchanged."""
    try:
        return str(Path(path).resolve().relative_to(REPO_ROOT))
    except ValueError:
        return path


def machine_summary(device: str) -> dict[str, Any]:
    import torch

    info = {"platform": platform.platform(), "python": platform.python_version(), "torch": torch.__version__,
            "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(), "device": device}
    if device == "cuda":
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def remove_artifacts(out: Path, methods: list[str]) -> None:
    """Delete earlier artifacts of these methods under `out/artifacts` (for `--overwrite`)."""
    for method in methods:
        shutil.rmtree(Path(out) / "artifacts" / method, ignore_errors=True)
