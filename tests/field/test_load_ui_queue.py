"""Bounded load on the clinician page over loopback: ten logged-in clients, two adapters.

Expected: every request is answered or rejected with Gradio's retry message, no answer carries an
adapter other than its specialty's (in the page and in the audit log), and resident memory stays
within a bound after a warm-up. `python -m benchmarks.load` runs the full 50-request measurement;
this test sends 20 short requests so it stays within CI time.
"""

from __future__ import annotations

import pytest

pytest_plugins = ["field_support"]

# Resident memory grows over the first requests while the allocator settles on new prompt lengths
# and adapters (measured: about 160 MiB over the first 10 requests after warm-up, then 55-60 MiB over
# the next 10). A leak of each request's KV cache (about 18 MB for a 400-token prompt: 30 layers,
# 2 x 192 values of 4 bytes per token) would add about 180 MiB over the 10 requests of the second half.
MAX_SECOND_HALF_GROWTH_MIB = 120


@pytest.fixture(scope="module")
def load_result(demo_adapter_generator, demo_index_dir, embedder, embedder_info, tmp_path_factory):
    from assistant.answer.pipeline import Assistant
    from assistant.audit import AuditLog
    from assistant.config import Settings
    from assistant.indexing import IndexStore
    from assistant.retrieval import Retriever
    from assistant.ui.app import cap_malloc_arenas
    from benchmarks.load import run_load

    # the server's threads run under the arena cap that launch.py sets
    cap_malloc_arenas()
    generator, router = demo_adapter_generator
    audit_db = tmp_path_factory.mktemp("load") / "audit.db"
    settings = Settings(index_dir=demo_index_dir, dtype="float32", device="cpu", max_new_tokens=4, top_k=1,
                        audit_db=audit_db)
    retriever = Retriever(IndexStore(demo_index_dir).open(embedder_info), embedder)
    assistant = Assistant(settings, retriever, generator, router=router, audit=AuditLog(audit_db))
    return run_load(assistant, requests=20, clients=10, warmup=6)


def test_every_request_answered_or_rejected(load_result):
    assert len(load_result.outcomes) == 20
    failed = [o.detail for o in load_result.outcomes if o.status == "failed"]
    assert failed == []
    assert load_result.count("answered") + load_result.count("rejected") == 20
    assert {o.client for o in load_result.outcomes} == {f"load_client_{n:02d}" for n in range(10)}


def test_no_answer_has_another_adapter(load_result):
    assert load_result.mixed_adapters == []
    for outcome in load_result.outcomes:
        if outcome.status == "answered":
            assert outcome.page_adapter.startswith(outcome.specialty), outcome


def test_memory_settles(load_result):
    assert load_result.rss_before_mib > 0
    assert load_result.rss_half_mib > 0
    assert load_result.rss_second_half_growth_mib < MAX_SECOND_HALF_GROWTH_MIB


def test_arena_cap_leaves_user_setting(monkeypatch):
    from assistant.ui.app import cap_malloc_arenas

    monkeypatch.setenv("MALLOC_ARENA_MAX", "4")

    assert cap_malloc_arenas() is False
