"""The demo adapters shipped in adapters/: intact files, the embedded base's fingerprint, promotion
evidence, loading on the real base, and routing of the demo questions."""

from __future__ import annotations

import json
import re
import shlex

import pytest
from conftest import DEMO_QUESTIONS, REPO, run_cli

pytest_plugins = ["tuning_support"]

ADAPTERS = REPO / "adapters"
SPECIALTIES = {"cardiology", "infectious_disease", "endocrinology", "discharge_summary"}


@pytest.fixture(scope="module")
def demo_entries():
    from assistant.tuning.registry import AdapterRegistry

    return AdapterRegistry(ADAPTERS).active_entries()


def test_demo_registry_lists_active_adapters(demo_entries):
    assert {e["specialty"] for e in demo_entries} == SPECIALTIES
    assert all(e["method"] == "lora" for e in demo_entries)


def test_demo_adapter_files_match_registry(demo_entries, model_spec):
    from assistant import models
    from assistant.tuning.loading import check_adapter_files, check_base_fingerprint, check_file_hashes
    from assistant.tuning.registry import AdapterRegistry, folder_file_hashes

    registry = AdapterRegistry(ADAPTERS)
    fingerprint = models.model_fingerprint(model_spec)
    for entry in demo_entries:
        folder = registry.folder(entry)
        check_adapter_files(folder)
        check_base_fingerprint(entry, fingerprint)
        check_file_hashes(entry, folder)
        assert folder_file_hashes(folder) == entry["files"]
        assert (folder / "adapter_model.safetensors").stat().st_size < 8 * 2**20
        assert json.loads((folder / "adapter_config.json").read_text())["r"] == 8


def test_demo_promotions_beat_base(demo_entries):
    for entry in demo_entries:
        evidence = entry["promotions"][-1]
        assert evidence["incumbent"] == "base model"
        assert evidence["forced"] is False
        assert evidence["candidate_loss"] < evidence["incumbent_loss"], entry["name"]


def test_demo_adapters_load_and_route(fresh_generator, embedder):
    from assistant.config import Settings
    from assistant.tuning.routing import build_router

    router = build_router(Settings(adapters_dir=ADAPTERS), fresh_generator, embedder)
    assert router.rejected == {}
    assert set(fresh_generator.adapters) == {f"{s}-lora-v1" for s in SPECIALTIES}

    # "\n" alone ends a JSONL record; str.splitlines() would also split at U+2028 inside a string
    questions = [json.loads(line) for line in DEMO_QUESTIONS.read_text().split("\n") if line.strip()]
    routed = [(q, router.choose(q["question"])) for q in questions]
    in_scope = [(q, c) for q, c in routed if q["specialty"] in SPECIALTIES]
    out_of_scope = [(q, c) for q, c in routed if q["specialty"] not in SPECIALTIES]
    # measured by benchmarks/adapters.py at the default threshold; see docs/benchmarks.md
    assert len(in_scope) == 10
    assert sum(c.specialty == q["specialty"] for q, c in in_scope) >= 9, [c.reason for _, c in in_scope]
    assert sum(c.name is None for _, c in out_of_scope) >= 16, [c.reason for _, c in out_of_scope]


def rebuild_loop(readme):
    """Return the specialties and the `bedside train` and `bedside adapters promote` argv of a README's
    rebuild loop."""
    text = readme.read_text(encoding="utf-8")
    block = next(b for b in re.findall(r"```sh\n(.*?)```", text, re.DOTALL) if b.startswith("for s in "))
    lines = block.replace("\\\n", " ").split("\n")
    specialties = lines[0].removeprefix("for s in ").removesuffix("; do").split()
    commands = [shlex.split(line) for line in lines[1:] if "bedside" in line]
    argv = [command[command.index("bedside") + 1:] for command in commands]
    return specialties, argv


@pytest.mark.parametrize("readme", [REPO / "README.md", ADAPTERS / "README.md"], ids=["README", "adapters"])
def test_readme_rebuild_matches_registry(readme, demo_entries):
    from assistant.cli import build_parser
    from assistant.commands.train import train_config_from_args

    specialties, (train_argv, promote_argv) = rebuild_loop(readme)
    assert set(specialties) == SPECIALTIES
    for entry in demo_entries:
        specialty = entry["specialty"]
        argv = [part.replace("$s", specialty) for part in train_argv]
        config = train_config_from_args(build_parser().parse_args(argv))
        record = json.loads((ADAPTERS / entry["path"] / "training.json").read_text(encoding="utf-8"))
        assert config.to_dict() == record["config"], specialty
        promote = [part.replace("$s", specialty) for part in promote_argv]
        assert promote[:3] == ["adapters", "promote", entry["name"]]


def test_cli_ask_json_reports_adapter(demo_index_dir, tmp_path):
    from assistant.tuning.registry import AdapterRegistry

    entry = AdapterRegistry(ADAPTERS).active("cardiology")
    env = {"BEDSIDE_ADAPTERS_DIR": str(ADAPTERS), "BEDSIDE_AUDIT_DB": str(tmp_path / "audit.db")}
    result = run_cli("ask", "When should anticoagulation be offered in atrial fibrillation?", "--specialty",
                     "cardiology", "--json", "--index", str(demo_index_dir), "--max-new-tokens", "8",
                     "--dtype", "float32", "--device", "cpu", cwd=tmp_path, env=env)

    assert result.returncode == 0, result.stderr
    adapter = json.loads(result.stdout)["adapter"]
    assert adapter["name"] == entry["name"]
    assert adapter["sha256"] == entry["files"]["adapter_model.safetensors"]
    assert adapter["specialty"] == "cardiology"
