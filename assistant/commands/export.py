"""`bedside export vllm --out DIR`: the base model and active adapters for vLLM, and its launch command.

Layout written under DIR:
    base/                  the base model as a safetensors folder with its tokenizer
    adapters/<name>/       each active adapter (PEFT safetensors), served under its registry name
    bedside_export.json    fingerprints, adapters and the launch command
    serve.sh               the launch command as a script
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shlex
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from assistant.commands import settings_from_args
from assistant.errors import BedsideError

logger = logging.getLogger(__name__)

# vLLM accepts only these LoRA ranks for --max-lora-rank (MaxLoRARanks in vllm/config/lora.py, vLLM 0.32).
VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
# Files of a model folder that vLLM reads; anything else (training state, caches) stays behind.
MODEL_SUFFIXES = {".safetensors", ".json", ".jinja", ".txt", ".model", ".tiktoken"}
DEFAULT_VLLM_PYTHON = ".venv-vllm/bin/python"


@dataclass
class ExportedAdapter:
    name: str
    path: Path
    rank: int
    sha256: str | None
    specialty: str | None


def register(subparsers: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    export = subparsers.add_parser("export", help="write the model in the layout a serving engine loads")
    engines = export.add_subparsers(dest="engine", metavar="ENGINE", required=True)
    vllm = engines.add_parser(
        "vllm",
        parents=[common],
        help="base model as safetensors + active adapters for vLLM, and the launch command",
    )
    vllm.add_argument(
        "--out", type=Path, required=True, metavar="DIR", help="folder to write (created if missing)"
    )
    vllm.add_argument(
        "--host", default="127.0.0.1", help="address the server listens on (default: 127.0.0.1)"
    )
    vllm.add_argument("--port", type=int, default=8000, help="port the server listens on (default: 8000)")
    vllm.add_argument(
        "--python",
        default=DEFAULT_VLLM_PYTHON,
        metavar="PATH",
        help=f"Python of the environment with vLLM installed (default: {DEFAULT_VLLM_PYTHON})",
    )
    vllm.add_argument(
        "--served-dtype",
        choices=["bfloat16", "float32", "float16"],
        help="dtype vLLM runs the weights in (default: the dtype setting; auto means bfloat16)",
    )
    vllm.add_argument(
        "--max-model-len",
        type=int,
        metavar="TOKENS",
        help="context length the server accepts (default: the model's own)",
    )
    vllm.add_argument(
        "--max-loras",
        type=int,
        metavar="N",
        help="adapters in one batch (default: exported adapters + 2, at least 4)",
    )
    vllm.add_argument(
        "--max-lora-rank",
        type=int,
        choices=VLLM_LORA_RANKS,
        metavar="R",
        help="largest LoRA rank the server accepts (default: the largest exported rank, at least 16)",
    )
    vllm.add_argument(
        "--kv-cache-gib",
        type=int,
        default=1,
        metavar="GIB",
        help="CPU only: memory for the KV cache in GiB (VLLM_CPU_KVCACHE_SPACE; default: 1)",
    )
    vllm.add_argument("--no-adapters", action="store_true", help="export the base model only")
    vllm.set_defaults(func=run_export_vllm)


def run_export_vllm(args: argparse.Namespace) -> int:
    from assistant import models
    from assistant.fileio import atomic_write_json, atomic_write_text

    settings = settings_from_args(args)
    out = args.out.resolve()
    if out.exists() and not out.is_dir():
        raise BedsideError(f"--out {str(args.out)!r} is a file; pass a folder")

    # base model: a GGUF model is rebuilt as plain safetensors first
    spec = models.resolve_model(settings.model)
    fingerprint = models.model_fingerprint(spec)
    base = export_base(spec, fingerprint, out / "base")

    # adapters: the registry's active ones, each under its registry name
    adapters = [] if args.no_adapters else export_adapters(settings, fingerprint, out / "adapters")

    # launch command
    config = json.loads((base / "config.json").read_text(encoding="utf-8"))
    max_model_len = args.max_model_len or int(config.get("max_position_embeddings") or 2048)
    served_dtype = args.served_dtype or ("bfloat16" if settings.dtype == "auto" else settings.dtype)
    max_rank = args.max_lora_rank or lora_rank_ceiling(max([a.rank for a in adapters] + [16]))
    max_loras = args.max_loras or max(4, len(adapters) + 2)
    python = args.python
    if "/" in python and Path(python).exists():
        # absolute, so the printed command and serve.sh work from any folder
        python = str(Path(python).absolute())
    environment, argv = launch_command(
        python=python,
        base=base,
        served_name=spec.name,
        host=args.host,
        port=args.port,
        dtype=served_dtype,
        max_model_len=max_model_len,
        adapters=adapters,
        max_loras=max_loras,
        max_lora_rank=max_rank,
        kv_cache_gib=args.kv_cache_gib,
        cpu=models.choose_device(settings.device) == "cpu",
    )
    command = " ".join(
        [
            *(f"{key}={shlex.quote(value)}" for key, value in environment.items()),
            *(shlex.quote(part) for part in argv),
        ]
    )

    # manifest and script
    manifest = {
        "engine": "vllm",
        "served_model_name": spec.name,
        "base_folder": str(base),
        "base_fingerprint": fingerprint,
        "dtype": served_dtype,
        "max_model_len": max_model_len,
        "adapters": [
            {
                "name": a.name,
                "path": str(a.path),
                "rank": a.rank,
                "sha256": a.sha256,
                "specialty": a.specialty,
            }
            for a in adapters
        ],
        "url": f"http://{args.host}:{args.port}/v1",
        "launch_command": command,
        "settings": settings.to_dict(),
    }
    atomic_write_json(out / "bedside_export.json", manifest)
    lines = ["#!/bin/sh", "# Written by `bedside export vllm`; rerun the export to change it.", "set -e"]
    lines += [f"export {key}={shlex.quote(value)}" for key, value in environment.items()]
    lines.append("exec " + " ".join(shlex.quote(part) for part in argv) + ' "$@"')
    script = out / "serve.sh"
    atomic_write_text(script, "\n".join(lines) + "\n")
    script.chmod(0o755)

    print(f"exported {spec.display_name} ({fingerprint[:19]}) and {len(adapters)} adapter(s) to {out}")
    for adapter in adapters:
        print(f"  adapter {adapter.name}: rank {adapter.rank}, {adapter.path}")
    print("start vLLM with (or run serve.sh in that folder):")
    print(command)
    print(f'then answer through it with: BEDSIDE_VLLM_URL={manifest["url"]} bedside ask --backend vllm "..."')
    return 0


def lora_rank_ceiling(rank: int) -> int:
    """Return the smallest rank vLLM accepts for --max-lora-rank that is at least `rank`."""
    for allowed in VLLM_LORA_RANKS:
        if allowed >= rank:
            return allowed
    raise BedsideError(
        f"LoRA rank {rank} is above vLLM's maximum ({VLLM_LORA_RANKS[-1]}); retrain with a lower r"
    )


def launch_command(
    *,
    python: str,
    base: Path,
    served_name: str,
    host: str,
    port: int,
    dtype: str,
    max_model_len: int,
    adapters: list[ExportedAdapter],
    max_loras: int,
    max_lora_rank: int,
    kv_cache_gib: int,
    cpu: bool,
) -> tuple[dict[str, str], list[str]]:
    """Return the environment and argv that start vLLM's OpenAI-compatible server on this export.

    The server is started as a module because the `vllm` console script of vllm-cpu 0.32.0 fails on a
    package-metadata lookup. VLLM_ALLOW_RUNTIME_LORA_UPDATING enables the load and unload endpoints
    that let a promoted adapter reach the running server.
    """
    environment = {"VLLM_ALLOW_RUNTIME_LORA_UPDATING": "True"}
    if cpu:
        environment["VLLM_CPU_KVCACHE_SPACE"] = str(kv_cache_gib)
    argv = [
        python,
        "-m",
        "vllm.entrypoints.openai.api_server",
        "--model",
        str(base),
        "--served-model-name",
        served_name,
        "--host",
        host,
        "--port",
        str(port),
        "--dtype",
        dtype,
        "--max-model-len",
        str(max_model_len),
        "--enable-lora",
        "--max-loras",
        str(max_loras),
        "--max-lora-rank",
        str(max_lora_rank),
    ]
    if adapters:
        argv += ["--lora-modules", *(f"{a.name}={a.path}" for a in adapters)]
    return environment, argv


# exporting the base model


def export_base(spec: Any, fingerprint: str, target: Path) -> Path:
    """Write the base model as a safetensors folder at `target`, reusing it when the fingerprint matches."""
    from assistant import models
    from assistant.fileio import atomic_write_json

    existing = _read_json(target / "bedside_source.json")
    if existing and existing.get("source_fingerprint") == fingerprint and (target / "config.json").is_file():
        logger.info("base model already exported at %s", target)
        return target

    if spec.gguf_file:
        source = models.dequantized_gguf_folder(spec)
    elif Path(spec.path).is_dir():
        source = Path(spec.path)
        models.refuse_pickled_weights(source)
    else:
        source = _hub_snapshot(spec.path)

    tmp = target.with_name(target.name + f".tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    copied = 0
    for path in sorted(source.iterdir()):
        if path.is_file() and path.suffix in MODEL_SUFFIXES and path.name != "bedside_source.json":
            _link_or_copy(path, tmp / path.name)
            copied += 1
    if not any(p.suffix == ".safetensors" for p in tmp.iterdir()):
        shutil.rmtree(tmp, ignore_errors=True)
        raise BedsideError(
            f"base model {spec.display_name!r} has no safetensors weights in {str(source)!r}; "
            "convert it with `save_pretrained(safe_serialization=True)`"
        )
    # the served folder's identity is its source's: adapters are matched against this fingerprint
    atomic_write_json(
        tmp / "bedside_source.json", {"source": spec.display_name, "source_fingerprint": fingerprint}
    )
    shutil.rmtree(target, ignore_errors=True)
    os.replace(tmp, target)
    logger.info("exported base model %s to %s (%d files)", spec.display_name, target, copied)
    return target


def _hub_snapshot(repo_id: str) -> Path:
    from huggingface_hub import snapshot_download

    try:
        return Path(
            snapshot_download(
                repo_id, allow_patterns=["*.safetensors", "*.json", "*.jinja", "*.txt", "*.model"]
            )
        )
    except Exception as err:  # huggingface_hub raises several unrelated types for offline and missing repos
        raise BedsideError(
            f"base model {repo_id!r} could not be fetched ({err}); pass a local folder with "
            "--model, or unset HF_HUB_OFFLINE to download it"
        ) from err


def _link_or_copy(source: Path, target: Path) -> None:
    # a hard link costs no space, and weight files in the conversion cache are never rewritten in place
    try:
        os.link(source, target)
    except OSError:
        shutil.copy2(source, target)


# exporting adapters


def export_adapters(settings: Any, fingerprint: str, target: Path) -> list[ExportedAdapter]:
    """Copy each active adapter to `target/<name>`, checking its base fingerprint and its weights' hash."""
    from assistant.tuning.registry import sha256_file

    records = active_adapter_records(settings)
    exported: list[ExportedAdapter] = []
    target.mkdir(parents=True, exist_ok=True)
    for record in records:
        name, source = record["name"], Path(record["path"])
        if not (source / "adapter_config.json").is_file():
            raise BedsideError(
                f"active adapter {name!r} has no adapter_config.json in {str(source)!r}; "
                "retrain it or roll the registry back"
            )
        base_fingerprint = record.get("base_fingerprint")
        if base_fingerprint and base_fingerprint != fingerprint:
            raise BedsideError(
                f"active adapter {name!r} was trained on base {base_fingerprint[:19]}, not the "
                f"configured base {fingerprint[:19]}; set --model to its base or retrain it"
            )
        config = json.loads((source / "adapter_config.json").read_text(encoding="utf-8"))

        destination = target / name
        tmp = destination.with_name(destination.name + f".tmp-{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        for path in sorted(source.iterdir()):
            if path.is_file() and path.suffix in {".safetensors", ".json"}:
                shutil.copy2(path, tmp / path.name)
        weights = tmp / "adapter_model.safetensors"
        if not weights.is_file():
            shutil.rmtree(tmp, ignore_errors=True)
            raise BedsideError(
                f"active adapter {name!r} has no adapter_model.safetensors in {str(source)!r}; "
                "bedside serves safetensors adapters only"
            )
        if record.get("sha256") and sha256_file(weights) != record["sha256"]:
            shutil.rmtree(tmp, ignore_errors=True)
            raise BedsideError(
                f"the weights of active adapter {name!r} in {str(source)!r} changed after "
                "registration (sha256 differs); retrain it or restore the file"
            )
        shutil.rmtree(destination, ignore_errors=True)
        os.replace(tmp, destination)
        exported.append(
            ExportedAdapter(
                name=name,
                path=destination,
                rank=int(config.get("r", 8)),
                sha256=record.get("sha256"),
                specialty=record.get("specialty"),
            )
        )

    # an adapter that is no longer active must not stay servable from an earlier export
    names = {a.name for a in exported}
    for stale in target.iterdir():
        if stale.is_dir() and stale.name not in names:
            shutil.rmtree(stale, ignore_errors=True)
    return exported


def active_adapter_records(settings: Any) -> list[dict[str, Any]]:
    """Return the registry's active adapters: name, folder, weights sha256, specialty and base fingerprint."""
    from assistant.tuning.registry import ADAPTER_WEIGHTS, AdapterRegistry

    registry = AdapterRegistry(Path(settings.adapters_dir))
    if not registry.path.is_file():
        logger.info("no adapter registry at %s; exporting the base model only", registry.path)
        return []
    return [
        {
            "name": entry["name"],
            "path": registry.folder(entry),
            "sha256": entry.get("files", {}).get(ADAPTER_WEIGHTS),
            "specialty": entry.get("specialty"),
            "base_fingerprint": entry.get("base", {}).get("fingerprint"),
        }
        for entry in registry.active_entries()
    ]


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
