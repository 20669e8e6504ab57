"""Typed settings: `bedside.toml`, then `BEDSIDE_*` environment variables, then command-line flags.

`Settings` is the single source of truth. Every artifact (index version, adapter, draft, report)
stores `Settings.to_dict()` so an auditor can see which settings produced it.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import tomllib

from assistant.errors import BedsideError

CONFIG_FILENAME = "bedside.toml"
ENV_PREFIX = "BEDSIDE_"


@dataclass
class Settings:
    """Resolved settings for one process. Every field has a help string in its metadata."""

    index_dir: Path = field(default=Path("index"), metadata={"help": "folder holding index versions"})
    corpus: list[Path] = field(
        default_factory=lambda: [Path("corpora/demo")],
        metadata={"help": "files or folders indexed by `bedside index rebuild`"},
    )
    model: str = field(
        default="",
        metadata={"help": "base causal LM: Hugging Face id or local path; empty = embedded SmolLM2-135M"},
    )
    embedder: str = field(
        default="",
        metadata={"help": "sentence-transformers model id or path; empty = embedded all-MiniLM-L6-v2"},
    )
    dtype: str = field(default="auto", metadata={"help": "auto, float32 or bfloat16 for the base model"})
    device: str = field(default="auto", metadata={"help": "auto, cpu or cuda"})
    chunk_tokens: int = field(
        default=200, metadata={"help": "chunk body length in embedder tokens (header excluded)"}
    )
    chunk_overlap: int = field(default=32, metadata={"help": "tokens shared by consecutive chunks"})
    top_k: int = field(default=5, metadata={"help": "chunks retrieved per question"})
    min_relevance: float = field(
        default=0.40,
        metadata={"help": "relevance gate: minimum cosine similarity of the best chunk, else abstain"},
    )
    max_new_tokens: int = field(default=200, metadata={"help": "generation budget per answer, in tokens"})
    adapters_dir: Path = field(default=Path("adapters"), metadata={"help": "adapter folders and registry"})
    audit_db: Path = field(default=Path("audit.db"), metadata={"help": "SQLite audit log"})
    store_text: bool = field(
        default=True, metadata={"help": "store question and answer text in the audit log (else hashes)"}
    )
    users_file: Path = field(
        default=Path("bedside_users.json"), metadata={"help": "salted password hashes for UI login"}
    )
    backend: str = field(default="local", metadata={"help": "generation backend: local or vllm"})
    vllm_url: str = field(
        default="http://127.0.0.1:8000/v1", metadata={"help": "base URL of a vLLM OpenAI-compatible server"}
    )

    def to_dict(self) -> dict[str, Any]:
        """Return the settings as JSON-ready values (paths as strings)."""
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, Path):
                value = str(value)
            elif isinstance(value, list):
                value = [str(v) for v in value]
            out[f.name] = value
        return out


def _coerce(name: str, raw: Any, default: Any) -> Any:
    """Convert a toml or environment value to the type of the field's default."""
    try:
        if isinstance(default, bool):
            if isinstance(raw, bool):
                return raw
            text = str(raw).strip().lower()
            if text in {"1", "true", "yes", "on"}:
                return True
            if text in {"0", "false", "no", "off"}:
                return False
            raise ValueError(text)
        if isinstance(default, int):
            return int(raw)
        if isinstance(default, float):
            return float(raw)
        if isinstance(default, Path):
            return Path(raw)
        if isinstance(default, list):
            items = raw if isinstance(raw, list) else str(raw).split(os.pathsep)
            return [Path(item) for item in items if str(item)]
        return str(raw)
    except (TypeError, ValueError) as err:
        raise BedsideError(
            f"setting {name!r} has invalid value {raw!r}; expected {type(default).__name__}"
        ) from err


def load_settings(config_file: Path | None = None, overrides: dict[str, Any] | None = None) -> Settings:
    """Resolve settings from the config file, then `BEDSIDE_*` variables, then `overrides` (flags).

    `overrides` entries whose value is None are ignored, so argparse defaults of None fall through.
    """
    settings = Settings()
    defaults = {f.name: getattr(settings, f.name) for f in dataclasses.fields(settings)}

    # config file: an explicit one must exist; the working folder's is optional
    path = config_file if config_file is not None else Path(CONFIG_FILENAME)
    if config_file is not None and not path.is_file():
        raise BedsideError(f"config file {str(path)!r} not found; pass an existing TOML file to --config")
    if path.is_file():
        try:
            data = tomllib.loads(path.read_text(encoding="utf-8"))
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as err:
            raise BedsideError(f"config file {str(path)!r} is not valid TOML: {err}") from err
        # allow both a flat file and a [bedside] table
        data = data.get("bedside", data)
        for key, raw in data.items():
            if key not in defaults:
                raise BedsideError(
                    f"unknown setting {key!r} in {str(path)!r}; valid settings: {', '.join(sorted(defaults))}"
                )
            setattr(settings, key, _coerce(key, raw, defaults[key]))

    # environment
    for key, default in defaults.items():
        raw = os.environ.get(ENV_PREFIX + key.upper())
        if raw is not None:
            setattr(settings, key, _coerce(key, raw, default))

    # flags
    for key, raw in (overrides or {}).items():
        if raw is None:
            continue
        if key not in defaults:
            raise BedsideError(f"unknown setting {key!r}")
        setattr(settings, key, _coerce(key, raw, defaults[key]))

    _validate(settings)
    return settings


def _validate(settings: Settings) -> None:
    if settings.dtype not in {"auto", "float32", "bfloat16", "float16"}:
        raise BedsideError(f"dtype {settings.dtype!r} is invalid; use auto, float32, bfloat16 or float16")
    if settings.device not in {"auto", "cpu", "cuda"}:
        raise BedsideError(f"device {settings.device!r} is invalid; use auto, cpu or cuda")
    if settings.backend not in {"local", "vllm"}:
        raise BedsideError(f"backend {settings.backend!r} is invalid; use local or vllm")
    if settings.top_k < 1:
        raise BedsideError(f"top_k {settings.top_k} is invalid; use a whole number of at least 1")
    if settings.max_new_tokens < 1:
        raise BedsideError(f"max_new_tokens {settings.max_new_tokens} is invalid; use a whole number of at least 1")
    # the gate compares a cosine similarity, which lies between -1 and 1
    if not -1.0 <= settings.min_relevance <= 1.0:
        raise BedsideError(f"min_relevance {settings.min_relevance} is invalid; use a similarity between -1 and 1")
    if settings.chunk_tokens < 16:
        raise BedsideError(f"chunk_tokens {settings.chunk_tokens} is too small; use at least 16")
    if not 0 <= settings.chunk_overlap < settings.chunk_tokens:
        raise BedsideError(
            f"chunk_overlap {settings.chunk_overlap} must be at least 0 and below chunk_tokens "
            f"({settings.chunk_tokens})"
        )

