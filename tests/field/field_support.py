"""Fixtures of the field-failure tests: an isolated working folder for in-process CLI runs and the
demo adapters loaded on a private copy of the base model.

Loaded with `pytest_plugins = ["field_support"]` by the modules that use them, so the session
fixtures are built once however many modules need them.
"""

from __future__ import annotations

import copy
import os
from pathlib import Path

import pytest
from field_helpers import DEMO_ADAPTERS, TWO_SPECIALTIES


@pytest.fixture
def isolated(tmp_path, monkeypatch) -> Path:
    """An empty working folder with no BEDSIDE_* settings inherited and the audit log inside it."""
    for name in list(os.environ):
        if name.startswith("BEDSIDE_") and name not in {"BEDSIDE_SHARED_DATA", "BEDSIDE_REQUIRE_SHARED_DATA"}:
            monkeypatch.delenv(name)
    monkeypatch.setenv("BEDSIDE_AUDIT_DB", str(tmp_path / "audit.db"))
    monkeypatch.setenv("BEDSIDE_ADAPTERS_DIR", str(tmp_path / "no-adapters"))
    monkeypatch.chdir(tmp_path)
    return tmp_path



@pytest.fixture(scope="session")
def demo_adapter_generator(base_model, model_spec, embedder):
    """(generator, router): a private copy of the fp32 base with the active demo adapters loaded.

    PEFT injects adapter layers into the model object in place, so the shared base stays untouched.
    """
    from assistant import models
    from assistant.answer.generation import LocalGenerator
    from assistant.config import Settings
    from assistant.tuning.routing import build_router

    model, tokenizer = base_model
    generator = LocalGenerator(copy.deepcopy(model), tokenizer, model_spec.display_name,
                               models.model_fingerprint(model_spec))
    router = build_router(Settings(adapters_dir=DEMO_ADAPTERS), generator, embedder)
    for specialty in TWO_SPECIALTIES:
        assert router.choose("anything", specialty).name, f"no active demo adapter for {specialty}"
    return generator, router
