"""Checks that run before an adapter is loaded, so a mismatched adapter fails loudly.

PEFT would load an adapter trained for other weights without complaint, and a typo in
`target_modules` would leave the bare base model answering under the adapter's name. These checks
reject both, and reject adapter folders whose weights are pickled.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from assistant.errors import ModelError
from assistant.models import PICKLED_WEIGHT_SUFFIXES
from assistant.tuning.registry import ADAPTER_CONFIG, ADAPTER_WEIGHTS, AdapterRegistry, sha256_file

logger = logging.getLogger(__name__)


def check_adapter_files(folder: Path) -> None:
    """Require adapter_config.json and adapter_model.safetensors; reject pickled weight files."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ModelError(f"adapter folder {str(folder)!r} not found; retrain it or remove its registry entry")
    pickled = sorted(p.name for p in folder.iterdir() if p.suffix in PICKLED_WEIGHT_SUFFIXES)
    if pickled:
        # PEFT falls back to torch.load on adapter_model.bin when no safetensors file exists
        raise ModelError(
            f"adapter folder {str(folder)!r} contains pickled weights ({', '.join(pickled)}); bedside loads "
            "safetensors only: re-save the adapter with `save_pretrained(safe_serialization=True)` and delete them"
        )
    for required in (ADAPTER_CONFIG, ADAPTER_WEIGHTS):
        if not (folder / required).is_file():
            raise ModelError(f"adapter folder {str(folder)!r} has no {required}; it is not a PEFT adapter folder")


def candidate_module_names(model: Any) -> list[str]:
    """Names of the layers an adapter could wrap (linear, embedding, conv), as PEFT matches them."""
    import torch
    from peft import PeftModel
    from peft.tuners.tuners_utils import BaseTunerLayer

    inner = model.get_base_model() if isinstance(model, PeftModel) else model
    kinds: tuple[type, ...] = (torch.nn.Linear, torch.nn.Embedding, torch.nn.Conv1d, torch.nn.Conv2d, BaseTunerLayer)
    try:
        from transformers.pytorch_utils import Conv1D

        kinds += (Conv1D,)
    except ImportError:
        pass
    names = []
    for name, module in inner.named_modules():
        parts = name.split(".")
        # skip the pieces PEFT injects inside a wrapped layer (base_layer, lora_A, lora_dropout, ...)
        if any(part == "base_layer" or part.startswith("lora_") for part in parts):
            continue
        if name and isinstance(module, kinds):
            names.append(name)
    return names


def read_adapter_config(folder: Path) -> Any:
    """Read the folder's adapter_config.json as PEFT's config class for its `peft_type`."""
    from peft import PeftConfig

    try:
        return PeftConfig.from_pretrained(str(folder))
    except (OSError, ValueError, TypeError, json.JSONDecodeError) as err:
        raise ModelError(f"adapter config in {str(folder)!r} is unreadable: {err}") from err


def check_target_modules(model: Any, folder: Path, config: Any = None, candidates: list[str] | None = None) -> int:
    """Count the modules the adapter's target_modules match in `model`; raise when none match.

    A caller may pass the folder's `config` (as `read_adapter_config` returns it) and `candidates`
    (the `candidate_module_names` of `model` from an earlier call, still valid because LoRA wraps each
    layer in place under its own name). Both spare rereading the file and walking the module tree.
    """
    from peft.tuners.tuners_utils import _ExcludedModule, check_target_module_exists

    if config is None:
        config = read_adapter_config(folder)
    if candidates is None:
        candidates = candidate_module_names(model)
    matched = [
        name for name in candidates
        if (hit := check_target_module_exists(config, name)) and not isinstance(hit, _ExcludedModule)
    ]
    if not matched:
        targets = config.target_modules
        shown = repr(targets) if isinstance(targets, str) else ", ".join(sorted(targets or []))
        raise ModelError(
            f"adapter {str(folder)!r} targets modules {shown} but matched 0 of {len(candidates)} modules in the "
            "base model; it was trained for another architecture: retrain it on this base model"
        )
    return len(matched)


def check_base_fingerprint(entry: dict[str, Any], running_fingerprint: str) -> None:
    expected = entry.get("base", {}).get("fingerprint")
    if expected != running_fingerprint:
        raise ModelError(
            f"adapter {entry['name']!r} was trained on base model {entry.get('base', {}).get('name')!r} "
            f"(fingerprint {str(expected)[:23]}…) but the running base has fingerprint {running_fingerprint[:23]}…; "
            "run with the base it was trained on (--model) or retrain the adapter on this base"
        )


def check_file_hashes(entry: dict[str, Any], folder: Path) -> None:
    """Compare the weight and config files with the hashes recorded at registration."""
    recorded = entry.get("files", {})
    for name in (ADAPTER_CONFIG, ADAPTER_WEIGHTS):
        if name not in recorded:
            raise ModelError(f"registry entry {entry['name']!r} records no hash for {name}; re-register it")
        actual = sha256_file(folder / name)
        if actual != recorded[name]:
            raise ModelError(
                f"{name} of adapter {entry['name']!r} has sha256 {actual[:12]}…, not the registered "
                f"{recorded[name][:12]}…; the file changed after registration: retrain or restore it"
            )


def load_registered_adapter(generator: Any, registry: AdapterRegistry, entry: dict[str, Any]) -> None:
    """Verify a registry entry against the running base and the files on disk, then load it."""
    folder = registry.folder(entry)
    check_adapter_files(folder)
    check_base_fingerprint(entry, generator.model_fingerprint)
    check_file_hashes(entry, folder)
    generator.load_adapter(entry["name"], folder)
