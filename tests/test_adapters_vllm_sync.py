"""`bedside adapters promote | rollback | sync` with the vllm backend: the running server loads and
unloads adapters to follow the registry, and every change is audited.

A small HTTP server on loopback replaces vLLM's runtime LoRA endpoints and records each request,
so these tests need no vLLM install; `make test-vllm` runs `sync_adapters` on real vLLM.
"""

from __future__ import annotations

import json
import shutil
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from conftest import REPO, run_cli

DEMO_ADAPTERS = REPO / "adapters"
BASE_ID = "served-base"


class RuntimeLoraServer(BaseHTTPRequestHandler):
    """vLLM's `/v1/models`, `/v1/load_lora_adapter` and `/v1/unload_lora_adapter`, with state in memory."""

    def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
        if self.path != "/v1/models":
            self.reply(404, {"detail": "Not Found"})
            return
        models = [{"id": BASE_ID, "root": "/models/base", "parent": None, "max_model_len": 2048}]
        models += [{"id": name, "root": root, "parent": BASE_ID, "max_model_len": 2048}
                   for name, root in self.server.adapters.items()]
        self.reply(200, {"object": "list", "data": models})

    def do_POST(self) -> None:  # noqa: N802
        body = json.loads(self.rfile.read(int(self.headers.get("content-length", 0))))
        self.server.requests.append((self.path, body))
        if self.path == "/v1/load_lora_adapter":
            self.server.adapters[body["lora_name"]] = body["lora_path"]
        elif self.path == "/v1/unload_lora_adapter" and body["lora_name"] in self.server.adapters:
            del self.server.adapters[body["lora_name"]]
        else:
            self.reply(404, {"detail": "Not Found"})
            return
        # vLLM answers these two endpoints with plain text, not JSON
        data = b"Success"
        self.send_response(200)
        self.send_header("content-type", "text/plain")
        self.send_header("content-length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def reply(self, status: int, body: dict) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def lora_server():
    server = ThreadingHTTPServer(("127.0.0.1", 0), RuntimeLoraServer)
    server.adapters, server.requests = {}, []
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    server.url = f"http://127.0.0.1:{server.server_address[1]}/v1"
    yield server
    server.shutdown()
    server.server_close()


@pytest.fixture
def cardiology_registry(tmp_path):
    """A registry holding only the demo cardiology adapter, made a candidate again."""
    from assistant.tuning.registry import AdapterRegistry

    demo = AdapterRegistry(DEMO_ADAPTERS).get("cardiology-lora-v1")
    root = tmp_path / "adapters"
    shutil.copytree(DEMO_ADAPTERS / demo["path"], root / demo["path"])
    entry = {k: v for k, v in demo.items()
             if k not in {"status", "promotions", "activated_at", "previous_active", "retired_at"}}
    registry = AdapterRegistry(root)
    registry.register(entry)
    return registry


def second_version_active(registry):
    """Register a copy of cardiology-lora-v1 as v2 and make it active, so v1 is what rollback restores."""
    from assistant.tuning.registry import folder_file_hashes

    v1 = registry.get("cardiology-lora-v1")
    registry.activate("cardiology-lora-v1", {"note": "first version"})
    shutil.copytree(registry.folder(v1), registry.root / "cardiology-lora-v2")
    v2 = {k: v for k, v in v1.items() if k not in {"status", "version", "activated_at", "promotions"}}
    v2.update(name="cardiology-lora-v2", path="cardiology-lora-v2",
              files=folder_file_hashes(registry.root / "cardiology-lora-v2"))
    registry.register(v2)
    registry.activate("cardiology-lora-v2", {"note": "second version"})
    return registry.folder(registry.get("cardiology-lora-v2"))


def vllm_env(tmp_path, url):
    return {"BEDSIDE_ADAPTERS_DIR": str(tmp_path / "adapters"), "BEDSIDE_BACKEND": "vllm",
            "BEDSIDE_VLLM_URL": url, "BEDSIDE_AUDIT_DB": str(tmp_path / "audit.db")}


def adapter_changes(tmp_path):
    from assistant.audit import AuditLog

    audit = AuditLog(tmp_path / "audit.db")
    try:
        return [(row["adapter_name"], row["generation"]["action"], row["backend"])
                for row in audit.rows() if row["kind"] == "adapter_change"]
    finally:
        audit.close()


def closed_port_url() -> str:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    # nothing listens on the port once the socket is closed
    return f"http://127.0.0.1:{port}/v1"


def test_rollback_unloads_and_loads_in_vllm(cardiology_registry, lora_server, tmp_path):
    v2_folder = second_version_active(cardiology_registry)
    v1_folder = cardiology_registry.folder(cardiology_registry.get("cardiology-lora-v1"))
    lora_server.adapters["cardiology-lora-v2"] = str(v2_folder.resolve())

    env = vllm_env(tmp_path, lora_server.url)
    result = run_cli("adapters", "rollback", "cardiology", cwd=tmp_path, env=env)

    assert result.returncode == 0, result.stderr
    assert "active again: cardiology-lora-v1" in result.stdout
    assert lora_server.requests == [
        ("/v1/load_lora_adapter", {"lora_name": "cardiology-lora-v1", "lora_path": str(v1_folder.resolve())}),
        ("/v1/unload_lora_adapter", {"lora_name": "cardiology-lora-v2"}),
    ]
    assert lora_server.adapters == {"cardiology-lora-v1": str(v1_folder.resolve())}
    assert adapter_changes(tmp_path) == [("cardiology-lora-v1", "load", "vllm"),
                                         ("cardiology-lora-v2", "unload", "vllm")]


def test_local_backend_leaves_vllm_alone(cardiology_registry, lora_server, tmp_path):
    second_version_active(cardiology_registry)
    env = {**vllm_env(tmp_path, lora_server.url), "BEDSIDE_BACKEND": "local"}

    result = run_cli("adapters", "rollback", "cardiology", cwd=tmp_path, env=env)

    assert result.returncode == 0, result.stderr
    assert lora_server.requests == []
    assert not (tmp_path / "audit.db").exists()


def test_unreachable_vllm_reported_then_synced(cardiology_registry, lora_server, tmp_path):
    from assistant.tuning.registry import AdapterRegistry

    v2_folder = second_version_active(cardiology_registry)
    lora_server.adapters["cardiology-lora-v2"] = str(v2_folder.resolve())

    env = vllm_env(tmp_path, closed_port_url())
    failed = run_cli("adapters", "rollback", "cardiology", cwd=tmp_path, env=env)

    assert failed.returncode == 1
    assert "the registry records the rollback of cardiology, but the vLLM server" in failed.stderr
    assert "run `bedside adapters sync`" in failed.stderr
    assert AdapterRegistry(tmp_path / "adapters").active("cardiology")["name"] == "cardiology-lora-v1"

    synced = run_cli("adapters", "sync", cwd=tmp_path, env=vllm_env(tmp_path, lora_server.url))

    assert synced.returncode == 0, synced.stderr
    assert "loaded cardiology-lora-v1" in synced.stdout
    assert set(lora_server.adapters) == {"cardiology-lora-v1"}
    again = run_cli("adapters", "sync", cwd=tmp_path, env=vllm_env(tmp_path, lora_server.url))
    assert "already serves the active adapters" in again.stdout


def test_promote_loads_adapter_into_vllm(cardiology_registry, lora_server, tmp_path):
    """The real promotion (scoring on the real base model) followed by the server update.

    Three of the adapter's own training examples keep the scoring short, and the candidate beats the
    base on them. The held-out comparison itself is tested in test_adapters_registry.py.
    """
    from assistant.tuning.registry import AdapterRegistry

    lines = (REPO / "corpora" / "training" / "cardiology.jsonl").read_text(encoding="utf-8").split("\n")[:3]
    heldout = tmp_path / "heldout.jsonl"
    heldout.write_text("\n".join(lines) + "\n", encoding="utf-8")
    lora_server.adapters["stale-adapter"] = str(tmp_path / "stale-adapter")
    folder = cardiology_registry.folder(cardiology_registry.get("cardiology-lora-v1")).resolve()

    env = vllm_env(tmp_path, lora_server.url)
    result = run_cli("adapters", "promote", "cardiology-lora-v1", "--heldout", str(heldout),
                     "--dtype", "float32", "--device", "cpu", cwd=tmp_path, env=env)

    assert result.returncode == 0, result.stderr
    assert "promoted cardiology-lora-v1" in result.stdout
    entry = AdapterRegistry(tmp_path / "adapters").get("cardiology-lora-v1")
    assert entry["status"] == "active"
    assert entry["promotions"][-1]["incumbent"] == "base model"
    assert lora_server.adapters == {"cardiology-lora-v1": str(folder)}
    assert [path for path, _ in lora_server.requests] == ["/v1/load_lora_adapter", "/v1/unload_lora_adapter"]
    assert adapter_changes(tmp_path) == [("cardiology-lora-v1", "load", "vllm"),
                                         ("stale-adapter", "unload", "vllm")]

