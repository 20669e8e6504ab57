"""Fixtures of the vLLM suite (`make test-vllm`): tiny adapters, an export, and a real vLLM server.

vLLM lives in its own environment (`.venv-vllm`, or the Python named by BEDSIDE_VLLM_PYTHON). When it
is absent these tests are skipped, so the default `make test` run stays fast; `make test-vllm` sets
BEDSIDE_REQUIRE_VLLM=1, which turns that skip into a failure.

The suite's modules load this file with `pytest_plugins = ["vllm_support"]`. It is not a conftest.py
because pytest imports every conftest.py outside a package under the one module name `conftest`, so
a second one would replace tests/conftest.py for the `from conftest import ...` lines elsewhere.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import REPO, run_cli

VLLM_PYTHON = Path(os.environ.get("BEDSIDE_VLLM_PYTHON", REPO / ".venv-vllm" / "bin" / "python"))
# Server start took 189-300 s on 2 CPU cores shared with other jobs (load average 13-17).
SERVER_START_TIMEOUT_S = 600


def vllm_installed() -> bool:
    if not VLLM_PYTHON.is_file():
        return False
    probe = "import importlib.util, sys; sys.exit(importlib.util.find_spec('vllm') is None)"
    return subprocess.run([str(VLLM_PYTHON), "-c", probe], capture_output=True).returncode == 0


def pytest_collection_modifyitems(config, items):
    here = Path(__file__).parent
    ours = [item for item in items if here in Path(str(item.fspath)).parents]
    if not ours or vllm_installed():
        return
    reason = (
        f"vLLM is not installed for {VLLM_PYTHON}; `make test-vllm` creates .venv-vllm and runs these tests"
    )
    if os.environ.get("BEDSIDE_REQUIRE_VLLM") == "1":
        raise pytest.UsageError(reason + " (BEDSIDE_REQUIRE_VLLM=1 makes this an error)")
    for item in ours:
        item.add_marker(pytest.mark.skip(reason=reason))


# adapters


def make_tiny_adapters(plan: list[tuple[Path, int]], scale: float = 0.15) -> None:
    """Save one rank-8 LoRA adapter per (folder, seed) whose B matrices are seeded random noise.

    PEFT starts B at zero, so a fresh adapter would be the identity; noise of this size changes greedy
    output without wrecking it, which is all the serving tests need from an adapter. Real training
    would cost minutes of CPU here and is covered by the training tests.
    """
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from assistant import models

    base_folder = models.dequantized_gguf_folder(models.resolve_model(""))
    model = AutoModelForCausalLM.from_pretrained(base_folder, dtype=torch.float32)
    for folder, seed in plan:
        torch.manual_seed(seed)
        lora = get_peft_model(
            model,
            LoraConfig(
                r=8,
                lora_alpha=16,
                target_modules=["q_proj", "v_proj"],
                lora_dropout=0.0,
                task_type="CAUSAL_LM",
            ),
        )
        with torch.no_grad():
            for name, parameter in lora.named_parameters():
                if "lora_B" in name:
                    parameter.copy_(torch.randn_like(parameter) * scale)
        lora.save_pretrained(folder, safe_serialization=True)
        # unload() strips the LoRA layers without merging, so the next adapter starts from the bare base
        model = lora.unload()


def register_adapter(adapters_dir: Path, name: str, specialty: str, folder: Path, activate: bool) -> dict:
    """Add a registry record as training does (base fingerprint, file hashes), optionally promoted."""
    from assistant import models
    from assistant.tuning.registry import AdapterRegistry, folder_file_hashes

    spec = models.resolve_model("")
    registry = AdapterRegistry(adapters_dir)
    entry = registry.register(
        {
            "name": name,
            "specialty": specialty,
            "method": "lora",
            "path": str(folder.relative_to(adapters_dir)),
            "base": {"name": spec.display_name, "fingerprint": models.model_fingerprint(spec)},
            "files": folder_file_hashes(folder),
        }
    )
    if activate:
        registry.activate(name, {"reason": "vLLM test fixture"})
    return entry


@pytest.fixture(scope="session")
def adapters_dir(tmp_path_factory) -> Path:
    """A registry with two active adapters (cardiology, endocrinology) and one candidate for cardiology."""
    root = tmp_path_factory.mktemp("adapters")
    plan = [
        ("cardio-a", "cardiology", True),
        ("endo-b", "endocrinology", True),
        ("cardio-c", "cardiology", False),
    ]
    make_tiny_adapters([(root / name, seed) for seed, (name, _, _) in enumerate(plan)])
    for name, specialty, active in plan:
        register_adapter(root, name, specialty, root / name, active)
    return root


# export and server


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class Server:
    url: str
    export_dir: Path
    process: subprocess.Popen
    log: Path

    def stop(self) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(timeout=30)


@pytest.fixture(scope="session")
def export_dir(tmp_path_factory, adapters_dir) -> Path:
    out = tmp_path_factory.mktemp("vllm-export")
    port = free_port()
    result = run_cli(
        "export",
        "vllm",
        "--out",
        str(out),
        "--port",
        str(port),
        "--python",
        str(VLLM_PYTHON),
        "--device",
        "cpu",
        env={"BEDSIDE_ADAPTERS_DIR": str(adapters_dir)},
    )
    assert result.returncode == 0, result.stderr
    return out


@pytest.fixture(scope="session")
def vllm_server(export_dir, tmp_path_factory, request):
    """vLLM started from the export's own launch script on a free loopback port; stopped at the end.

    The demo index is built while the server starts, since both take minutes on a busy machine.
    """
    import httpx

    manifest = json.loads((export_dir / "bedside_export.json").read_text())
    log = tmp_path_factory.mktemp("vllm-log") / "server.log"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "VLLM_NO_USAGE_STATS": "1", "DO_NOT_TRACK": "1"}
    started = time.monotonic()
    with log.open("wb") as handle:
        process = subprocess.Popen(
            ["sh", str(export_dir / "serve.sh")],
            stdout=handle,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
        )
    server = Server(manifest["url"], export_dir, process, log)
    health = manifest["url"].removesuffix("/v1") + "/health"
    try:
        request.getfixturevalue("demo_index_dir")
        deadline = time.monotonic() + SERVER_START_TIMEOUT_S
        while True:
            if process.poll() is not None:
                pytest.fail(
                    f"vLLM exited with {process.returncode} during start-up:\n{log.read_text()[-4000:]}"
                )
            try:
                if httpx.get(health, timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(
                    f"vLLM did not become healthy in {SERVER_START_TIMEOUT_S} s:\n{log.read_text()[-4000:]}"
                )
            time.sleep(2)
        print(f"vLLM ready {time.monotonic() - started:.0f} s after its start", file=sys.stderr)
        yield server
    finally:
        server.stop()
