"""The vLLM backend's client side, export and launcher helpers, without a vLLM install.

A small HTTP server on loopback replaces a misbehaving vLLM (5xx replies, a wrong model name)
so retries and refusals can be checked quickly; `make test-vllm` runs the same paths on real vLLM.
"""

from __future__ import annotations

import json
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from tests.conftest import run_cli

MESSAGES = [{"role": "user", "content": "What is atrial fibrillation?"}]


class ScriptedVLLM(BaseHTTPRequestHandler):
    """Replies to /v1/completions from `self.server.replies` in order: (status, body) pairs."""

    def do_POST(self) -> None:  # noqa: N802 (http.server's naming)
        length = int(self.headers.get("content-length", 0))
        self.server.requests.append(json.loads(self.rfile.read(length)))
        status, body = self.server.replies.pop(0)
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def scripted_server():
    server = ThreadingHTTPServer(("127.0.0.1", 0), ScriptedVLLM)
    server.replies, server.requests = [], []
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    from assistant import models

    return AutoTokenizer.from_pretrained(models.dequantized_gguf_folder(models.resolve_model("")))


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def make_generator(server, tokenizer, adapters=None):
    from assistant.answer.vllm_backend import VLLMClient, VLLMGenerator

    url = f"http://127.0.0.1:{server.server_address[1]}/v1"
    client = VLLMClient(url, attempts=3, backoff_s=0.01)
    return VLLMGenerator(
        client, tokenizer, "SmolLM2-135M-Instruct", "sha256:test", 8192, "bfloat16", adapters or {}
    )


def completion(model: str, text: str) -> dict:
    return {"model": model, "choices": [{"index": 0, "text": text, "finish_reason": "length"}]}


def test_generate_retries_server_errors(scripted_server, tokenizer):
    scripted_server.replies = [
        (503, {"error": {"message": "overloaded"}}),
        (500, {}),
        (200, completion("cardio", " Irregular rhythm.")),
    ]
    generator = make_generator(scripted_server, tokenizer, {"cardio": "/adapters/cardio"})

    text = generator.generate(MESSAGES, adapter="cardio")

    assert text == "Irregular rhythm."
    assert len(scripted_server.requests) == 3
    request = scripted_server.requests[-1]
    assert request["model"] == "cardio"
    assert request["temperature"] == 0.0
    assert request["prompt"] == generator.encode(MESSAGES)


def test_generate_fails_after_bounded_retries(scripted_server, tokenizer):
    from assistant.answer.vllm_backend import VLLMError

    scripted_server.replies = [(503, {"error": {"message": "overloaded"}})] * 3
    generator = make_generator(scripted_server, tokenizer)

    with pytest.raises(VLLMError, match="after 3 attempt.*overloaded"):
        generator.generate(MESSAGES)
    assert len(scripted_server.requests) == 3


def test_answer_from_other_model_rejected(scripted_server, tokenizer):
    from assistant.answer.vllm_backend import VLLMError

    scripted_server.replies = [(200, completion("SmolLM2-135M-Instruct", "base text"))]
    generator = make_generator(scripted_server, tokenizer, {"cardio": "/adapters/cardio"})

    with pytest.raises(VLLMError, match="answered with model 'SmolLM2-135M-Instruct' when 'cardio'"):
        generator.generate(MESSAGES, adapter="cardio")


def test_client_error_not_retried(scripted_server, tokenizer):
    from assistant.answer.vllm_backend import VLLMError

    scripted_server.replies = [(400, {"error": {"message": "max_tokens is too large"}})]
    generator = make_generator(scripted_server, tokenizer)

    with pytest.raises(VLLMError, match="HTTP 400: max_tokens is too large"):
        generator.generate(MESSAGES)
    assert len(scripted_server.requests) == 1


def test_unreachable_server_error_names_fix():
    from assistant.answer.vllm_backend import VLLMClient, VLLMError

    client = VLLMClient(f"http://127.0.0.1:{free_port()}/v1", attempts=2, backoff_s=0.01)

    with pytest.raises(VLLMError, match="did not respond to /models after 2 attempt.*make serve-vllm"):
        client.models()


def test_invalid_url_rejected():
    from assistant.answer.vllm_backend import VLLMClient, VLLMError

    with pytest.raises(VLLMError, match="vllm_url 'localhost:8000' is invalid"):
        VLLMClient("localhost:8000")


def test_ask_unreachable_vllm_is_one_line_error(demo_index_dir, tmp_path):
    url = f"http://127.0.0.1:{free_port()}/v1"
    result = run_cli(
        "ask",
        "How is diabetic ketoacidosis diagnosed?",
        "--backend",
        "vllm",
        "--index",
        str(demo_index_dir),
        env={
            "BEDSIDE_VLLM_URL": url,
            "BEDSIDE_AUDIT_DB": str(tmp_path / "audit.db"),
            "BEDSIDE_ADAPTERS_DIR": str(tmp_path / "adapters"),
        },
    )

    assert result.returncode == 1
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith(f"bedside: error: vLLM server at {url} did not respond to /models after 3 attempt")


def test_export_base_only_layout(tmp_path):
    from assistant import models

    out = tmp_path / "export"
    result = run_cli(
        "export",
        "vllm",
        "--out",
        str(out),
        "--no-adapters",
        "--port",
        "8123",
        "--device",
        "cpu",
        env={"BEDSIDE_ADAPTERS_DIR": str(tmp_path / "adapters")},
    )

    assert result.returncode == 0, result.stderr
    manifest = json.loads((out / "bedside_export.json").read_text())
    assert manifest["base_fingerprint"] == models.model_fingerprint(models.resolve_model(""))
    assert manifest["adapters"] == []
    assert (out / "base" / "model.safetensors").is_file()
    assert (
        json.loads((out / "base" / "bedside_source.json").read_text())["source_fingerprint"]
        == manifest["base_fingerprint"]
    )
    script = (out / "serve.sh").read_text()
    assert "export VLLM_ALLOW_RUNTIME_LORA_UPDATING=True" in script
    assert "--port 8123" in script
    assert "vllm.entrypoints.openai.api_server" in result.stdout
    assert manifest["launch_command"] in result.stdout


def test_export_rejects_changed_adapter(tmp_path):
    from assistant import models
    from assistant.tuning.registry import AdapterRegistry, folder_file_hashes

    adapters = tmp_path / "adapters"
    folder = adapters / "cardio"
    folder.mkdir(parents=True)
    (folder / "adapter_config.json").write_text(json.dumps({"r": 8, "peft_type": "LORA"}))
    (folder / "adapter_model.safetensors").write_bytes(b"weights as registered")
    spec = models.resolve_model("")
    registry = AdapterRegistry(adapters)
    registry.register(
        {
            "name": "cardio",
            "specialty": "cardiology",
            "method": "lora",
            "path": "cardio",
            "base": {"name": spec.display_name, "fingerprint": models.model_fingerprint(spec)},
            "files": folder_file_hashes(folder),
        }
    )
    registry.activate("cardio", {"reason": "test"})
    (folder / "adapter_model.safetensors").write_bytes(b"weights changed afterwards")

    result = run_cli(
        "export",
        "vllm",
        "--out",
        str(tmp_path / "export"),
        "--device",
        "cpu",
        env={"BEDSIDE_ADAPTERS_DIR": str(adapters)},
    )

    assert result.returncode == 1
    assert "changed after registration" in result.stderr


def test_lora_rank_ceiling():
    from assistant.commands.export import lora_rank_ceiling
    from assistant.errors import BedsideError

    assert [lora_rank_ceiling(r) for r in (1, 2, 8, 12, 16, 33, 512)] == [1, 8, 8, 16, 16, 64, 512]
    with pytest.raises(BedsideError, match="above vLLM's maximum"):
        lora_rank_ceiling(1024)


def test_strip_launcher_flags():
    from assistant.tuning.launch import strip_launcher_flags

    argv = [
        "train",
        "--launcher",
        "accelerate",
        "--specialty",
        "cardiology",
        "--num-processes=4",
        "--accelerate-config",
        "x.yaml",
        "--max-steps",
        "2",
    ]

    assert strip_launcher_flags(argv) == ["train", "--specialty", "cardiology", "--max-steps", "2"]


def test_launcher_rejects_bad_process_count(tmp_path):
    result = run_cli(
        "train",
        "--specialty",
        "cardiology",
        "--data",
        "corpora/training/cardiology.jsonl",
        "--launcher",
        "accelerate",
        "--num-processes",
        "0",
        env={"BEDSIDE_ADAPTERS_DIR": str(tmp_path / "adapters")},
    )

    assert result.returncode == 1
    assert "--num-processes 0 is invalid" in result.stderr
