"""The adapter registry: `adapters/registry.json`, one record per trained adapter.

Each record names the adapter, its specialty and method, the base model fingerprint it was trained
on, the training data hash, held-out metrics, file hashes, the router centroid, and its status:

- `candidate`: trained and registered, not served;
- `active`: served for its specialty (at most one per specialty);
- `retired`: served before, or rolled back.

Every change is appended to `events` with its evidence (promotion scores), and the file is rewritten
atomically under an advisory lock, so two processes cannot interleave their edits.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
import json
import logging
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from assistant.errors import BedsideError
from assistant.fileio import atomic_write_json, exclusive_lock

logger = logging.getLogger(__name__)

REGISTRY_FILE = "registry.json"
FORMAT_VERSION = 1
STATUSES = ("candidate", "active", "retired")
ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
TRAINING_RECORD = "training.json"


def now_iso() -> str:
    return dt.datetime.now(dt.timezone.utc).replace(microsecond=0).isoformat()


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with Path(path).open("rb") as handle:
        while block := handle.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def folder_file_hashes(folder: Path) -> dict[str, str]:
    """sha256 of every file in an adapter folder, keyed by its path relative to the folder."""
    return {str(p.relative_to(folder)): sha256_file(p) for p in sorted(Path(folder).rglob("*")) if p.is_file()}


class AdapterRegistry:
    """Read and change `registry.json` in an adapters folder."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.path = self.root / REGISTRY_FILE
        self.lock_path = self.root / ".registry.lock"

    # reading

    def read(self) -> dict[str, Any]:
        if not self.path.is_file():
            return {"format": FORMAT_VERSION, "router": {}, "adapters": [], "events": []}
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise BedsideError(f"adapter registry {str(self.path)!r} is not valid JSON ({err}); restore it from "
                               "version control or delete it and re-register the adapters") from err
        if not isinstance(data, dict) or not isinstance(data.get("adapters"), list):
            raise BedsideError(f"adapter registry {str(self.path)!r} has no `adapters` list; restore it from "
                               "version control")
        if data.get("format", FORMAT_VERSION) > FORMAT_VERSION:
            raise BedsideError(f"adapter registry {str(self.path)!r} has format {data['format']}, newer than this "
                               f"bedside reads ({FORMAT_VERSION}); upgrade bedside")
        data.setdefault("router", {})
        data.setdefault("events", [])
        return data

    def entries(self) -> list[dict[str, Any]]:
        return self.read()["adapters"]

    def get(self, name: str) -> dict[str, Any]:
        return _find(self.read(), name, self.path)

    def active(self, specialty: str) -> dict[str, Any] | None:
        return next((e for e in self.entries() if e["specialty"] == specialty and e["status"] == "active"), None)

    def active_entries(self) -> list[dict[str, Any]]:
        return [e for e in self.entries() if e["status"] == "active"]

    def folder(self, entry: dict[str, Any]) -> Path:
        """The adapter's folder: `path` is stored relative to the registry so the folder can move whole."""
        path = Path(entry["path"])
        return path if path.is_absolute() else self.root / path

    def next_version(self, specialty: str) -> int:
        versions = [e.get("version", 0) for e in self.entries() if e["specialty"] == specialty]
        return max(versions, default=0) + 1

    def next_name(self, specialty: str, method: str) -> str:
        taken = {e["name"] for e in self.entries()}
        version = self.next_version(specialty)
        while f"{specialty}-{method}-v{version}" in taken or (self.root / f"{specialty}-{method}-v{version}").exists():
            version += 1
        return f"{specialty}-{method}-v{version}"

    def router_settings(self) -> dict[str, Any]:
        return dict(self.read().get("router", {}))

    # changing

    @contextlib.contextmanager
    def transaction(self) -> Iterator[dict[str, Any]]:
        """Yield the registry's contents under the lock; they are written back atomically on success."""
        self.root.mkdir(parents=True, exist_ok=True)
        with exclusive_lock(self.lock_path):
            data = self.read()
            yield data
            atomic_write_json(self.path, data)

    def register(self, entry: dict[str, Any]) -> dict[str, Any]:
        """Add a new record as a candidate; its name must be new."""
        with self.transaction() as data:
            if any(e["name"] == entry["name"] for e in data["adapters"]):
                raise BedsideError(f"adapter {entry['name']!r} is already registered; pick another --name or "
                                   f"`bedside adapters remove {entry['name']}` first")
            entry = {**entry, "status": "candidate"}
            entry.setdefault("created_at", now_iso())
            entry.setdefault("version", _next_version(data, entry["specialty"]))
            data["adapters"].append(entry)
            _event(data, "register", entry["name"], entry["specialty"])
        logger.info("registered adapter %s (%s) as a candidate", entry["name"], entry["specialty"])
        return entry

    def activate(self, name: str, evidence: dict[str, Any]) -> dict[str, Any] | None:
        """Make `name` the active adapter of its specialty; the previous one is retired. Returns it."""
        with self.transaction() as data:
            entry = _find(data, name, self.path)
            if entry["status"] == "active":
                raise BedsideError(f"adapter {name!r} is already active for {entry['specialty']!r}")
            previous = next((e for e in data["adapters"] if e["specialty"] == entry["specialty"]
                             and e["status"] == "active"), None)
            if previous is not None:
                previous["status"] = "retired"
                previous["retired_at"] = now_iso()
            entry["status"] = "active"
            entry["activated_at"] = now_iso()
            entry["previous_active"] = previous["name"] if previous else None
            entry.setdefault("promotions", []).append({"at": now_iso(), **evidence})
            _event(data, "promote", name, entry["specialty"], replaced=entry["previous_active"], **evidence)
        return previous

    def rollback(self, specialty: str) -> tuple[dict[str, Any], dict[str, Any]]:
        """Retire the active adapter of `specialty` and reactivate the one it replaced; return (old, new)."""
        with self.transaction() as data:
            current = next((e for e in data["adapters"] if e["specialty"] == specialty and e["status"] == "active"),
                           None)
            if current is None:
                raise BedsideError(f"no active adapter for specialty {specialty!r}; "
                                   "`bedside adapters list` shows what is registered")
            previous_name = current.get("previous_active")
            previous = next((e for e in data["adapters"] if e["name"] == previous_name), None)
            if previous is None:
                raise BedsideError(
                    f"adapter {current['name']!r} replaced no earlier adapter for {specialty!r} that is still "
                    f"registered, so there is nothing to roll back to; promote another candidate instead"
                )
            current["status"] = "retired"
            current["retired_at"] = now_iso()
            current["rolled_back"] = True
            previous["status"] = "active"
            previous["activated_at"] = now_iso()
            _event(data, "rollback", previous["name"], specialty, replaced=current["name"])
        return current, previous

    def remove(self, name: str, delete_files: bool = True) -> dict[str, Any]:
        """Drop a non-active record; its folder is deleted when it lies inside the registry folder."""
        with self.transaction() as data:
            entry = _find(data, name, self.path)
            if entry["status"] == "active":
                raise BedsideError(f"adapter {name!r} is active for {entry['specialty']!r}; run `bedside adapters "
                                   f"rollback {entry['specialty']}` or promote another adapter first")
            data["adapters"] = [e for e in data["adapters"] if e["name"] != name]
            for other in data["adapters"]:
                if other.get("previous_active") == name:
                    other["previous_active"] = None
            _event(data, "remove", name, entry["specialty"])
        folder = self.folder(entry).resolve()
        if delete_files and folder.is_dir() and self.root.resolve() in folder.parents:
            shutil.rmtree(folder)
        return entry

    def set_router(self, **values: Any) -> None:
        with self.transaction() as data:
            data.setdefault("router", {}).update(values)


def _find(data: dict[str, Any], name: str, path: Path) -> dict[str, Any]:
    for entry in data["adapters"]:
        if entry["name"] == name:
            return entry
    names = ", ".join(e["name"] for e in data["adapters"]) or "none"
    raise BedsideError(f"adapter {name!r} is not in {str(path)!r}; registered: {names}")


def _next_version(data: dict[str, Any], specialty: str) -> int:
    return max((e.get("version", 0) for e in data["adapters"] if e["specialty"] == specialty), default=0) + 1


def _event(data: dict[str, Any], action: str, name: str, specialty: str, **details: Any) -> None:
    data["events"].append({"at": now_iso(), "action": action, "adapter": name, "specialty": specialty, **details})
