"""bedside on a real vLLM server: export, cited answers, mixed adapters, runtime promotion, server loss.

The tests share one server and run in file order: the promotion test changes which cardiology
adapter is active, and the last test stops the server.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time

import pytest

from tests.conftest import run_cli

pytest_plugins = ["vllm_support"]

BASE_NAME = "SmolLM2-135M-Instruct"
QUESTION = "How is diabetic ketoacidosis diagnosed?"
PROMPT = [{"role": "user", "content": "What is atrial fibrillation? Answer in one sentence."}]


def audit_rows(path):
    with sqlite3.connect(path) as db:
        db.row_factory = sqlite3.Row
        return [dict(row) for row in db.execute("SELECT * FROM answers ORDER BY id")]


def test_export_layout_for_vllm(export_dir, adapters_dir):
    from assistant import models

    manifest = json.loads((export_dir / "bedside_export.json").read_text())
    source = json.loads((export_dir / "base" / "bedside_source.json").read_text())
    script = (export_dir / "serve.sh").read_text()

    assert sorted(a["name"] for a in manifest["adapters"]) == ["cardio-a", "endo-b"]
    assert (export_dir / "base" / "model.safetensors").is_file()
    assert (export_dir / "base" / "tokenizer.json").is_file()
    assert source["source_fingerprint"] == models.model_fingerprint(models.resolve_model(""))
    assert not (export_dir / "adapters" / "cardio-c").exists()
    assert "VLLM_ALLOW_RUNTIME_LORA_UPDATING=True" in script
    assert "--lora-modules" in manifest["launch_command"]
    assert f"cardio-a={export_dir / 'adapters' / 'cardio-a'}" in manifest["launch_command"]


def test_ask_through_vllm_cites(vllm_server, adapters_dir, demo_index_dir, tmp_path):
    audit_db = tmp_path / "audit.db"
    env = {
        "BEDSIDE_VLLM_URL": vllm_server.url,
        "BEDSIDE_ADAPTERS_DIR": str(adapters_dir),
        "BEDSIDE_AUDIT_DB": str(audit_db),
    }

    result = run_cli(
        "ask",
        QUESTION,
        "--backend",
        "vllm",
        "--specialty",
        "endocrinology",
        "--max-new-tokens",
        "48",
        "--top-k",
        "3",
        "--index",
        str(demo_index_dir),
        "--json",
        env=env,
    )

    assert result.returncode == 0, result.stderr
    answer = json.loads(result.stdout)
    assert answer["backend"] == "vllm"
    assert answer["model"] == BASE_NAME
    assert answer["adapter"]["name"] == "endo-b"
    assert not answer["abstained"]
    assert answer["citations"], answer["answer"]
    retrieved = {hit["chunk_id"] for hit in answer["retrieved"]}
    for citation in answer["citations"]:
        assert 1 <= citation["marker"] <= len(answer["retrieved"])
        assert citation["chunk_id"] in retrieved
    row = audit_rows(audit_db)[-1]
    assert (row["backend"], row["model"], row["adapter_name"]) == ("vllm", BASE_NAME, "endo-b")


def test_draft_discharge_through_vllm(vllm_server, adapters_dir, demo_index_dir, tmp_path):
    """Drafting moves only generation to vLLM: facts, checks, files and the audit row stay in bedside."""
    from tests.conftest import REPO

    audit_db = tmp_path / "audit.db"
    out = tmp_path / "drafts"
    env = {
        "BEDSIDE_BACKEND": "vllm",
        "BEDSIDE_VLLM_URL": vllm_server.url,
        "BEDSIDE_ADAPTERS_DIR": str(adapters_dir),
        "BEDSIDE_AUDIT_DB": str(audit_db),
    }

    result = run_cli(
        "draft-discharge",
        str(REPO / "tests" / "data" / "notes_example.jsonl"),
        "--out",
        str(out),
        "--specialty",
        "cardiology",
        "--limit",
        "2",
        "--max-new-tokens",
        "32",
        "--index",
        str(demo_index_dir),
        "--no-progress",
        env=env,
    )

    assert result.returncode == 0, result.stderr
    drafts = sorted(out.glob("*.json"))
    assert len(drafts) == 2, result.stdout
    rows = audit_rows(audit_db)
    assert len(rows) == 2
    for path, row in zip(drafts, rows, strict=True):
        draft = json.loads(path.read_text())
        provenance = draft["provenance"]
        assert provenance["model"] == BASE_NAME
        assert provenance["adapter"]["name"] == "cardio-a"
        assert provenance["settings"]["backend"] == "vllm"
        assert draft["sections"]["hospital_course"]["sentences"], draft["sections"]["hospital_course"]
        assert (row["kind"], row["backend"], row["adapter_name"]) == ("draft", "vllm", "cardio-a")


def test_two_adapters_run_concurrently(vllm_server):
    from transformers import AutoTokenizer

    from assistant.answer.vllm_backend import VLLMClient

    client = VLLMClient(vllm_server.url)
    tokenizer = AutoTokenizer.from_pretrained(vllm_server.export_dir / "base")
    prompt = list(
        tokenizer.apply_chat_template(PROMPT, add_generation_prompt=True, tokenize=True, return_dict=True)[
            "input_ids"
        ]
    )
    results: dict[str, dict] = {}

    def stream(adapter: str) -> None:
        payload = {"model": adapter, "prompt": prompt, "max_tokens": 24, "temperature": 0.0, "stream": True}
        events = []
        for event in client.stream("/completions", payload):
            events.append((time.monotonic(), event))
        results[adapter] = {
            "first": events[0][0],
            "last": events[-1][0],
            "models": {e["model"] for _, e in events},
            "text": "".join(c.get("text", "") for _, e in events for c in e["choices"]),
        }

    threads = [threading.Thread(target=stream, args=(name,)) for name in ("cardio-a", "endo-b")]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=300)

    a, b = results["cardio-a"], results["endo-b"]
    assert a["models"] == {"cardio-a"}
    assert b["models"] == {"endo-b"}
    # each stream produced tokens before the other one ended: the server ran them side by side
    assert a["first"] < b["last"]
    assert b["first"] < a["last"]
    assert a["text"] != b["text"]


def test_promoted_adapter_served_without_restart(vllm_server, adapters_dir, tmp_path):
    from assistant.answer.vllm_backend import VLLMClient, sync_adapters
    from assistant.audit import AuditLog
    from assistant.tuning.registry import AdapterRegistry

    pid = vllm_server.process.pid
    registry = AdapterRegistry(adapters_dir)
    registry.activate("cardio-c", {"reason": "vLLM promotion test"})
    audit = AuditLog(tmp_path / "audit.db")

    report = sync_adapters(vllm_server.url, registry, audit=audit)

    assert report.loaded == ["cardio-c"]
    assert report.unloaded == ["cardio-a"]
    client = VLLMClient(vllm_server.url)
    served = {m.id for m in client.models()}
    assert {"cardio-c", "endo-b"} <= served
    assert "cardio-a" not in served
    body = client.request(
        "POST",
        "/completions",
        json={"model": "cardio-c", "prompt": "Atrial fibrillation is", "max_tokens": 4, "temperature": 0.0},
    )
    assert body["model"] == "cardio-c"
    assert vllm_server.process.poll() is None
    assert vllm_server.process.pid == pid
    changes = [(r["kind"], r["adapter_name"], r["backend"]) for r in audit.rows()]
    assert ("adapter_change", "cardio-c", "vllm") in changes
    assert ("adapter_change", "cardio-a", "vllm") in changes
    assert sync_adapters(vllm_server.url, registry).changed is False


def test_unserved_adapter_is_an_error(vllm_server):
    from assistant.answer.vllm_backend import VLLMError, VLLMGenerator
    from assistant.config import Settings

    generator = VLLMGenerator.from_settings(Settings(vllm_url=vllm_server.url))

    with pytest.raises(VLLMError, match="cardio-a"):
        generator.generate(PROMPT, adapter="cardio-a")


def test_stopped_server_gives_clear_error(vllm_server, adapters_dir, demo_index_dir, tmp_path):
    from assistant.answer.vllm_backend import VLLMError, VLLMGenerator
    from assistant.config import Settings

    generator = VLLMGenerator.from_settings(Settings(vllm_url=vllm_server.url))
    vllm_server.stop()

    with pytest.raises(VLLMError, match="did not respond to .* after 3 attempt"):
        generator.generate(PROMPT)
    env = {
        "BEDSIDE_VLLM_URL": vllm_server.url,
        "BEDSIDE_ADAPTERS_DIR": str(adapters_dir),
        "BEDSIDE_AUDIT_DB": str(tmp_path / "audit.db"),
    }
    result = run_cli("ask", QUESTION, "--backend", "vllm", "--index", str(demo_index_dir), env=env)
    assert result.returncode == 1
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith(f"bedside: error: vLLM server at {vllm_server.url} did not respond to")
    assert "make serve-vllm" in last
