"""One module per `bedside` command group; shared helpers for loading settings from flags."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from assistant.config import Settings, load_settings

SETTING_FLAGS = ("index_dir", "model", "embedder", "device", "dtype")


def settings_from_args(args: argparse.Namespace, **extra: Any) -> Settings:
    """Resolve settings: config file, then environment, then these flags and `extra`."""
    overrides = {name: getattr(args, name, None) for name in SETTING_FLAGS}
    overrides.update(extra)
    config = Path(args.config) if getattr(args, "config", None) else None
    return load_settings(config, overrides)
