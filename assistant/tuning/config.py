"""The training recipe's settings: one dataclass filled from defaults, then a YAML file, then flags.

The resolved object is logged at start and saved with every output (`training.json`), so a run can be
repeated from its artifact alone.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from assistant.errors import BedsideError

METHODS = ("lora", "qlora", "full")
# Learning rates commonly used for each method on small instruction sets: adapters tolerate
# (and need) a rate about ten times higher than updating every weight.
DEFAULT_LEARNING_RATES = {"lora": 2e-4, "qlora": 2e-4, "full": 2e-5}
# LoRA targets per model family: every attention and MLP projection, the usual choice for
# llama-style decoders (SmolLM2, Llama, Mistral, Qwen2). Families not listed need --target-modules.
DEFAULT_TARGET_MODULES = {
    "llama": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "mistral": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "qwen2": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "gpt2": ["c_attn", "c_proj", "c_fc"],
}
NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,79}$")


@dataclass
class TrainConfig:
    """Everything one training run depends on; each field's help is shown by `bedside train --help`."""

    specialty: str = field(default="", metadata={"help": "specialty the output serves, e.g. cardiology"})
    data: str = field(default="", metadata={"help": "JSONL training file (chat or instruction records)"})
    method: str = field(default="lora", metadata={"help": "lora, qlora (CUDA only) or full"})
    base: str = field(default="", metadata={"help": "base model: hub id, folder or .gguf; empty = settings"})
    out: str = field(default="", metadata={"help": "output folder; default adapters/NAME (full: models/NAME)"})
    name: str = field(default="", metadata={"help": "adapter name; default SPECIALTY-METHOD-vN"})
    seed: int = field(default=42, metadata={"help": "seed for initialisation, shuffling and dropout"})
    epochs: float = field(default=3.0, metadata={"help": "passes over the training split"})
    max_steps: int = field(default=0, metadata={"help": "stop after this many optimizer steps; 0 = use epochs"})
    lr: float = field(default=0.0, metadata={"help": "peak learning rate; 0 = 2e-4 for adapters, 2e-5 for full"})
    batch_size: int = field(default=4, metadata={"help": "examples per optimizer step (before accumulation)"})
    grad_accum: int = field(default=1, metadata={"help": "gradient accumulation steps"})
    max_seq_length: int = field(default=512, metadata={"help": "tokens per example; longer ones are cut"})
    warmup_ratio: float = field(default=0.0, metadata={"help": "fraction of steps spent warming up the rate"})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay"})
    lr_scheduler: str = field(default="linear", metadata={"help": "transformers scheduler name"})
    eval_fraction: float = field(default=0.1, metadata={"help": "share of examples held out for evaluation"})
    lora_r: int = field(default=16, metadata={"help": "LoRA rank r"})
    lora_alpha: int = field(default=32, metadata={"help": "LoRA alpha (scaling = alpha / r)"})
    lora_dropout: float = field(default=0.05, metadata={"help": "dropout on the LoRA input"})
    target_modules: list[str] = field(
        default_factory=list, metadata={"help": "module names LoRA wraps; empty = the model family's default"}
    )
    device: str = field(default="", metadata={"help": "auto, cpu or cuda; empty = settings"})
    dtype: str = field(default="auto", metadata={"help": "weights while training: auto (fp32 on CPU), float32, "
                                                          "bfloat16"})
    gradient_checkpointing: bool = field(default=False, metadata={"help": "recompute activations to save memory"})
    logging_steps: int = field(default=5, metadata={"help": "log the training loss every N steps"})
    register: bool = field(default=True, metadata={"help": "add the adapter to the registry as a candidate"})

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @property
    def learning_rate(self) -> float:
        return self.lr or DEFAULT_LEARNING_RATES[self.method]


def _coerce(name: str, value: Any, default: Any) -> Any:
    try:
        if isinstance(default, bool):
            if isinstance(value, bool):
                return value
            raise ValueError(value)
        if isinstance(default, int):
            if isinstance(value, float) and not value.is_integer():
                raise ValueError(value)
            return int(value)
        if isinstance(default, float):
            return float(value)
        if isinstance(default, list):
            if isinstance(value, str):
                value = [part for part in re.split(r"[,\s]+", value) if part]
            if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                raise ValueError(value)
            return list(value)
        if value is None:
            return ""
        return str(value)
    except (TypeError, ValueError) as err:
        raise BedsideError(
            f"training setting {name!r} has invalid value {value!r}; expected {type(default).__name__}"
        ) from err


def load_train_config(yaml_file: Path | None = None, overrides: dict[str, Any] | None = None) -> TrainConfig:
    """Resolve a TrainConfig: defaults, then the YAML file, then `overrides` whose value is not None."""
    config = TrainConfig()
    defaults = {f.name: getattr(config, f.name) for f in dataclasses.fields(config)}
    values: dict[str, Any] = {}

    if yaml_file is not None:
        import yaml

        path = Path(yaml_file)
        if not path.is_file():
            raise BedsideError(f"training config {str(path)!r} not found; pass an existing YAML file to --config")
        try:
            loaded = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        except (yaml.YAMLError, UnicodeDecodeError) as err:
            raise BedsideError(f"training config {str(path)!r} is not valid YAML: {err}") from err
        if not isinstance(loaded, dict):
            raise BedsideError(f"training config {str(path)!r} must be a mapping of setting: value")
        unknown = sorted(set(loaded) - set(defaults))
        if unknown:
            raise BedsideError(f"unknown training setting(s) {', '.join(unknown)} in {str(path)!r}; "
                               f"valid: {', '.join(sorted(defaults))}")
        values.update(loaded)

    values.update({k: v for k, v in (overrides or {}).items() if v is not None})
    for key, value in values.items():
        if key not in defaults:
            raise BedsideError(f"unknown training setting {key!r}")
        setattr(config, key, _coerce(key, value, defaults[key]))
    validate_train_config(config)
    return config


def validate_train_config(config: TrainConfig) -> None:
    """Reject impossible settings before anything heavy loads, naming the setting and a valid value."""
    if not config.specialty:
        raise BedsideError("no specialty given; pass --specialty NAME (e.g. cardiology)")
    if not NAME_PATTERN.match(config.specialty):
        raise BedsideError(f"specialty {config.specialty!r} is invalid; use letters, digits, '_', '-' or '.'")
    if config.name and not NAME_PATTERN.match(config.name):
        raise BedsideError(f"adapter name {config.name!r} is invalid; use letters, digits, '_', '-' or '.'")
    if not config.data:
        raise BedsideError("no training data given; pass --data FILE.jsonl")
    if config.method not in METHODS:
        raise BedsideError(f"method {config.method!r} is invalid; use one of {', '.join(METHODS)}")
    checks = [
        ("epochs", config.epochs > 0 or config.max_steps > 0, "a positive number (or set max_steps)"),
        ("max_steps", config.max_steps >= 0, "0 (use epochs) or a positive whole number"),
        ("lr", config.lr >= 0, "a positive number, or 0 for the method's default"),
        ("batch_size", config.batch_size >= 1, "a whole number of at least 1"),
        ("grad_accum", config.grad_accum >= 1, "a whole number of at least 1"),
        ("max_seq_length", config.max_seq_length >= 16, "at least 16 tokens"),
        ("warmup_ratio", 0 <= config.warmup_ratio < 1, "a fraction in [0, 1)"),
        ("eval_fraction", 0 <= config.eval_fraction < 1, "a fraction in [0, 1)"),
        ("lora_r", config.lora_r >= 1, "a whole number of at least 1"),
        ("lora_alpha", config.lora_alpha >= 1, "a whole number of at least 1"),
        ("lora_dropout", 0 <= config.lora_dropout < 1, "a fraction in [0, 1)"),
        ("logging_steps", config.logging_steps >= 1, "a whole number of at least 1"),
        ("dtype", config.dtype in {"auto", "float32", "bfloat16", "float16"}, "auto, float32, bfloat16 or float16"),
        ("device", config.device in {"", "auto", "cpu", "cuda"}, "auto, cpu or cuda"),
    ]
    for name, ok, expected in checks:
        if not ok:
            raise BedsideError(f"training setting {name} = {getattr(config, name)!r} is invalid; use {expected}")
