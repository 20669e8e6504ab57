"""Training recipes: LoRA, QLoRA and full fine-tuning through one top-to-bottom function, `train`.

The steps run in dependency order: validate the settings and the data (nothing heavy loaded yet),
load the tokenizer, tokenize, load the base model, wrap it for the method, train with the
transformers Trainer, score the held-out split, save into a temporary folder, check that it contains no
pickled weights, rename it into place, and register it. `train` takes no process-global state
beyond the seed, so it can run under `accelerate launch` unchanged.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import logging
import os
import platform
import resource
import shutil
import statistics
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from assistant import models
from assistant.config import Settings
from assistant.errors import BedsideError
from assistant.fileio import atomic_write_json, fsync_dir
from assistant.tuning.config import DEFAULT_TARGET_MODULES, TrainConfig, validate_train_config
from assistant.tuning.data import (
    PaddingCollator,
    examples_sha256,
    load_examples,
    split_heldout,
    tokenize_examples,
)
from assistant.tuning.heldout import heldout_loss
from assistant.tuning.registry import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    TRAINING_RECORD,
    AdapterRegistry,
    folder_file_hashes,
    now_iso,
)

logger = logging.getLogger(__name__)

LIBRARIES = ("torch", "transformers", "peft", "accelerate", "safetensors", "bitsandbytes")


@dataclass
class TrainResult:
    """Outputs of one training run: the output folder, its metrics, and its registry entry if registered."""

    name: str
    method: str
    specialty: str
    output: Path
    metrics: dict[str, Any]
    problems: list[tuple[int, str]] = field(default_factory=list)
    entry: dict[str, Any] | None = None
    # the trained model in memory (adapter-wrapped for lora and qlora), for callers that use it at once
    model: Any = field(default=None, repr=False)


def train(config: TrainConfig, settings: Settings, progress: bool = False) -> TrainResult:
    """Train one adapter (lora, qlora) or one full model (full) as set by `config`; see the module docstring."""
    import torch
    from transformers import AutoTokenizer, PrinterCallback, Trainer, TrainingArguments, set_seed

    # settings and data: every check that needs no model runs first
    validate_train_config(config)
    device = training_device(config, settings)
    report = load_examples(Path(config.data))
    train_examples, heldout_examples = split_heldout(report.examples, config.eval_fraction)
    spec = models.resolve_model(config.base or settings.model)
    registry = AdapterRegistry(settings.adapters_dir)
    name = config.name or registry.next_name(config.specialty, config.method)
    output = output_folder(config, settings, name)
    logger.info("training %s (%s on %s, %s): %d train / %d held-out examples from %s", name, config.method,
                spec.display_name, device, len(train_examples), len(heldout_examples), config.data)
    logger.info("resolved training config: %s", json.dumps(config.to_dict(), sort_keys=True))

    # tokenizer and tokenized data
    base_folder = models.dequantized_gguf_folder(spec) if spec.gguf_file else Path(spec.path)
    models.refuse_pickled_weights(base_folder)
    load_from = str(base_folder) if base_folder.exists() else spec.path
    tokenizer = AutoTokenizer.from_pretrained(load_from)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    train_rows = tokenize_examples(tokenizer, train_examples, config.max_seq_length)
    heldout_rows = tokenize_examples(tokenizer, heldout_examples, config.max_seq_length, purpose="evaluation")
    if not train_rows:
        raise BedsideError(f"no training example of {config.data!r} fits max_seq_length {config.max_seq_length}; "
                           "raise --max-seq-length")

    # base model, scored before training so the artifact records what training changed
    set_seed(config.seed)
    base_fingerprint = models.model_fingerprint(spec)
    model = load_trainable_model(config, load_from, device)
    base_metrics = heldout_loss(model, tokenizer, heldout_rows)
    model = METHOD_SETUP[config.method](model, config)
    trainable, total = parameter_counts(model)
    logger.info("%s: %s of %s parameters trainable", config.method, f"{trainable:,}", f"{total:,}")

    # train; the Trainer's own folder is temporary, so no checkpoint or optimizer state reaches the output
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bedside-trainer-") as trainer_dir:
        arguments = TrainingArguments(
            output_dir=trainer_dir,
            per_device_train_batch_size=config.batch_size,
            gradient_accumulation_steps=config.grad_accum,
            num_train_epochs=config.epochs,
            max_steps=config.max_steps or -1,
            learning_rate=config.learning_rate,
            lr_scheduler_type=config.lr_scheduler,
            warmup_steps=config.warmup_ratio,  # transformers reads a value below 1 as a fraction of the steps
            weight_decay=config.weight_decay,
            logging_steps=config.logging_steps,
            save_strategy="no",
            eval_strategy="no",
            report_to="none",
            seed=config.seed,
            data_seed=config.seed,
            disable_tqdm=not progress,
            remove_unused_columns=False,
            label_names=["labels"],
            use_cpu=device == "cpu",
            bf16=mixed_precision(config, device),
            activation_checkpointing=config.gradient_checkpointing,
            dataloader_num_workers=0,
        )
        timer = step_timer(log_losses=not progress)
        trainer = Trainer(model=model, args=arguments, train_dataset=train_rows,
                          data_collator=PaddingCollator(tokenizer.pad_token_id), callbacks=[timer])
        if not progress:
            # without a progress bar the Trainer prints each log dict to stdout; the timer logs them instead
            trainer.remove_callback(PrinterCallback)
        outcome = trainer.train()
    train_seconds = time.perf_counter() - start
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]

    # held-out evaluation
    model.eval()
    metrics = {
        "heldout_loss": None, "heldout_perplexity": None, "heldout_tokens": 0,
        "base_heldout_loss": base_metrics["loss"] if base_metrics else None,
        "base_heldout_perplexity": base_metrics["perplexity"] if base_metrics else None,
        "train_loss": round(float(outcome.training_loss), 6),
        "first_logged_loss": losses[0] if losses else None,
        "last_logged_loss": losses[-1] if losses else None,
        "loss_history": [[entry["step"], entry["loss"]] for entry in trainer.state.log_history if "loss" in entry],
        "steps": int(trainer.state.global_step),
        "epochs": round(float(trainer.state.epoch or 0), 4),
        "train_seconds": round(train_seconds, 2),
        "seconds_per_step": round(train_seconds / max(trainer.state.global_step, 1), 4),
        # the first step also pays for allocating optimizer state, so it is left out when there are more
        "median_step_seconds": round(statistics.median(timer.durations[1:] or timer.durations or [0.0]), 4),
        # CPU time of this process: on a shared machine it varies far less than wall time with other load
        "median_step_cpu_seconds": round(statistics.median(timer.cpu_durations[1:] or timer.cpu_durations
                                                           or [0.0]), 4),
        "trainable_parameters": trainable,
        "total_parameters": total,
        "peak_rss_mb": peak_rss_mb(),
    }
    scored = heldout_loss(model, tokenizer, heldout_rows)
    if scored:
        metrics.update(heldout_loss=scored["loss"], heldout_perplexity=scored["perplexity"],
                       heldout_tokens=scored["tokens"])
    else:
        logger.warning("no held-out examples (%d in total): the output has no held-out loss; add examples or "
                       "raise eval_fraction", len(report.examples))
    logger.info("trained %d steps in %.1f s; held-out loss %s (base %s)", metrics["steps"], train_seconds,
                metrics["heldout_loss"], metrics["base_heldout_loss"])

    # save into a temporary sibling folder, then rename it into place
    record = {
        "name": name,
        "specialty": config.specialty,
        "method": config.method,
        "created_at": now_iso(),
        "config": config.to_dict(),
        "seed": config.seed,
        "device": device,
        # CPU kernels split sums across threads, so another thread count can change the weights' last bits
        "torch_threads": torch.get_num_threads(),
        # a GGUF base is identified by file name and hash; its folder is this machine's package path
        "base": {"name": spec.display_name, "path": None if spec.gguf_file else spec.path,
                 "gguf_file": spec.gguf_file, "fingerprint": base_fingerprint},
        "data": {
            "path": str(config.data), "sha256": report.sha256, "examples": len(report.examples),
            "train_examples": len(train_rows), "heldout_examples": len(heldout_rows),
            "heldout_sha256": examples_sha256(heldout_examples), "eval_fraction": config.eval_fraction,
            "skipped_lines": [{"line": n, "reason": r} for n, r in report.problems],
        },
        "metrics": metrics,
        "libraries": library_versions(),
        "settings": settings.to_dict(),
    }
    output.parent.mkdir(parents=True, exist_ok=True)
    staging = output.parent / f".{output.name}.tmp-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    try:
        SAVERS[config.method](model, tokenizer, staging, spec)
        atomic_write_json(staging / TRAINING_RECORD, record)
        check_no_pickled_files(staging)
        os.replace(staging, output)
        fsync_dir(output.parent)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    logger.info("saved %s to %s", name, output)

    # register adapters as candidates; a full model is a new base, selected with --base or --model
    result = TrainResult(name, config.method, config.specialty, output, metrics, report.problems, model=model)
    if config.register and config.method != "full":
        result.entry = registry.register(registry_entry(record, output, registry, settings, train_examples))
    return result


# validation helpers

def training_device(config: TrainConfig, settings: Settings) -> str:
    """Resolve the device; QLoRA without CUDA is rejected here, before any model or tokenizer loads."""
    import torch

    setting = config.device or settings.device
    if config.method == "qlora":
        if setting == "cpu" or not torch.cuda.is_available():
            raise BedsideError(
                "--method qlora needs a CUDA GPU (4-bit bitsandbytes kernels) and none is visible on this "
                "machine; use --method lora, which trains the same adapter format on a full-precision base"
            )
        if importlib.util.find_spec("bitsandbytes") is None:
            raise BedsideError("--method qlora needs the bitsandbytes package; install it with "
                               "`pip install 'bedside[gpu]'` or use --method lora")
    return models.choose_device(setting)


def output_folder(config: TrainConfig, settings: Settings, name: str) -> Path:
    if config.out:
        output = Path(config.out)
    elif config.method == "full":
        output = Path("models") / name
    else:
        output = Path(settings.adapters_dir) / name
    if output.exists():
        raise BedsideError(f"output folder {str(output)!r} already exists; pass another --out or --name, "
                           "or remove it first")
    return output


def mixed_precision(config: TrainConfig, device: str) -> bool:
    """bf16 autocast on CUDA GPUs that support it; CPUs train in the weights' own dtype."""
    import torch

    return device == "cuda" and config.dtype in {"auto", "bfloat16"} and torch.cuda.is_bf16_supported()


# model setup per method

def load_trainable_model(config: TrainConfig, load_from: str, device: str) -> Any:
    """Load a private copy of the base model (training changes it in place), 4-bit for QLoRA."""
    import torch
    from transformers import AutoModelForCausalLM

    kwargs: dict[str, Any] = {"use_safetensors": True}
    if config.method == "qlora":
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16,
        )
        kwargs["device_map"] = {"": torch.cuda.current_device()}
    else:
        # fp32 master weights unless bf16 is asked for; on CUDA the Trainer adds bf16 autocast
        kwargs["dtype"] = torch.float32 if config.dtype == "auto" else getattr(torch, config.dtype)
    try:
        model = AutoModelForCausalLM.from_pretrained(load_from, **kwargs)
    except OSError as err:
        raise BedsideError(f"could not load base model {load_from!r} for training: {err}") from err
    if config.method != "qlora":
        model.to(device)
    model.config.use_cache = False
    return model


def resolve_target_modules(config: TrainConfig, model: Any) -> list[str]:
    if config.target_modules:
        return list(config.target_modules)
    family = getattr(model.config, "model_type", "")
    if family not in DEFAULT_TARGET_MODULES:
        raise BedsideError(f"no default LoRA target modules for model type {family!r}; pass --target-modules "
                           "with the names of its attention and MLP projection layers")
    return list(DEFAULT_TARGET_MODULES[family])


def setup_lora(model: Any, config: TrainConfig) -> Any:
    from peft import LoraConfig, get_peft_model

    from assistant.tuning.loading import candidate_module_names

    targets = resolve_target_modules(config, model)
    lora_config = LoraConfig(r=config.lora_r, lora_alpha=config.lora_alpha, lora_dropout=config.lora_dropout,
                             target_modules=targets, bias="none", task_type="CAUSAL_LM")
    names = candidate_module_names(model)
    matched = [n for n in names if any(n == t or n.endswith("." + t) for t in targets)]
    if not matched:
        raise BedsideError(f"--target-modules {', '.join(targets)} matched 0 of {len(names)} modules in the base "
                           f"model; module names look like "
                           f"{', '.join(sorted({n.rsplit('.', 1)[-1] for n in names})[:12])}")
    return get_peft_model(model, lora_config)


def setup_qlora(model: Any, config: TrainConfig) -> Any:
    # NOTE: the test suite runs on CPU only, so this path and the 4-bit load above are not covered there
    from peft import prepare_model_for_kbit_training

    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=config.gradient_checkpointing)
    return setup_lora(model, config)


def setup_full(model: Any, config: TrainConfig) -> Any:
    for parameter in model.parameters():
        parameter.requires_grad_(True)
    return model


METHOD_SETUP = {"lora": setup_lora, "qlora": setup_qlora, "full": setup_full}


# saving per method

def base_model_label(spec: models.ModelSpec) -> str:
    """Return the base model name written to adapter_config.json: a name, never this machine's cache path."""
    return spec.name if spec.gguf_file else spec.path


def save_adapter(model: Any, tokenizer: Any, folder: Path, spec: models.ModelSpec) -> None:
    for peft_config in model.peft_config.values():
        peft_config.base_model_name_or_path = base_model_label(spec)
        peft_config.inference_mode = True
    # no LoRA target here is an embedding, so PEFT need not look up the base's vocabulary size
    model.save_pretrained(str(folder), safe_serialization=True, save_embedding_layers=False)
    # PEFT writes a placeholder model card; training.json is the record of this run
    (folder / "README.md").unlink(missing_ok=True)
    for required in (ADAPTER_CONFIG, ADAPTER_WEIGHTS):
        if not (folder / required).is_file():
            raise BedsideError(f"saving the adapter wrote no {required} in {str(folder)!r}")


def save_full_model(model: Any, tokenizer: Any, folder: Path, spec: models.ModelSpec) -> None:
    model.config.use_cache = True
    # transformers 5 writes model.safetensors only; no torch pickle is produced
    model.save_pretrained(str(folder))
    tokenizer.save_pretrained(str(folder))
    if not any(folder.glob("*.safetensors")):
        raise BedsideError(f"saving the model wrote no .safetensors file in {str(folder)!r}")


SAVERS = {"lora": save_adapter, "qlora": save_adapter, "full": save_full_model}


def check_no_pickled_files(folder: Path) -> None:
    pickled = sorted(str(p.relative_to(folder)) for p in folder.rglob("*")
                     if p.suffix in models.PICKLED_WEIGHT_SUFFIXES)
    if pickled:
        raise BedsideError(f"the output folder would contain pickled files ({', '.join(pickled)}); nothing was "
                           "saved. Report this as a bug")


# records

def step_timer(log_losses: bool) -> Any:
    """Return a Trainer callback that records each optimizer step's wall and CPU time and can log the loss."""
    from transformers import TrainerCallback

    class StepTimer(TrainerCallback):
        def __init__(self) -> None:
            self.durations: list[float] = []
            self.cpu_durations: list[float] = []
            self._started = 0.0
            self._cpu_started = 0.0

        def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            self._started = time.perf_counter()
            self._cpu_started = time.process_time()

        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            self.durations.append(time.perf_counter() - self._started)
            self.cpu_durations.append(time.process_time() - self._cpu_started)

        def on_log(self, args: Any, state: Any, control: Any, logs: dict[str, Any] | None = None,
                   **kwargs: Any) -> None:
            if log_losses and logs and "loss" in logs:
                logger.info("step %d/%d: loss %.4f, learning rate %.2e", state.global_step, state.max_steps,
                            float(logs["loss"]), float(logs.get("learning_rate", 0.0)))

    return StepTimer()


def parameter_counts(model: Any) -> tuple[int, int]:
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return trainable, total


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far, in MB.

    On Linux this is VmHWM of /proc/self/status. Linux carries ru_maxrss over an exec, so in a
    process started by fork and exec (multiprocessing's spawn, subprocess) ru_maxrss starts at the
    parent's peak, while VmHWM belongs to the new program's memory alone.
    """
    try:
        for line in Path("/proc/self/status").read_text(encoding="ascii").splitlines():
            if line.startswith("VmHWM:"):
                return round(int(line.split()[1]) / 1024, 1)  # reported in kB
    except OSError:
        pass
    scale = 1 if platform.system() == "Darwin" else 1024  # ru_maxrss is in bytes on macOS, KiB elsewhere
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale / 2**20, 1)


def library_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for library in LIBRARIES:
        try:
            versions[library] = importlib.metadata.version(library)
        except importlib.metadata.PackageNotFoundError:
            continue
    return versions


def registry_entry(record: dict[str, Any], output: Path, registry: AdapterRegistry, settings: Settings,
                   train_examples: list[Any]) -> dict[str, Any]:
    """Build the registry record of a saved adapter, with file hashes and its routing centroid."""
    from assistant.tuning.routing import question_centroid

    embedder_name = models.resolve_embedder(settings.embedder)
    embedder = models.load_embedder(embedder_name, settings.device)
    questions = [example.question for example in train_examples]
    try:
        path = output.resolve().relative_to(registry.root.resolve())
    except ValueError:
        path = output.resolve()
    return {
        "name": record["name"],
        "specialty": record["specialty"],
        "method": record["method"],
        "path": str(path),
        "created_at": record["created_at"],
        "base": {"name": record["base"]["name"], "fingerprint": record["base"]["fingerprint"]},
        "data": {key: record["data"][key] for key in ("path", "sha256", "examples", "train_examples",
                                                      "heldout_examples", "heldout_sha256", "eval_fraction")},
        "seed": record["seed"],
        "lora": {key: record["config"][key] for key in ("lora_r", "lora_alpha", "lora_dropout")},
        "metrics": record["metrics"],
        "files": folder_file_hashes(output),
        "router": {"embedder": settings.embedder or "all-MiniLM-L6-v2 (embedded)",
                   "embedder_fingerprint": models.embedder_fingerprint(embedder_name),
                   "questions": len(questions), "centroid": question_centroid(embedder, questions)},
    }
