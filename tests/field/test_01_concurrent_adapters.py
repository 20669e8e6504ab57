"""Field case 1: two adapters, 20 concurrent greedy requests alternating between them.

Expected: each answer equals the same request run alone, and the adapter used is recorded per answer
(in the answer record and in its audit row).
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest
from field_helpers import TWO_SPECIALTIES

pytest_plugins = ["field_support"]

QUESTIONS = [
    "When is anticoagulation offered in atrial fibrillation?",
    "Which antibiotic treats pneumonia in adults?",
]


@pytest.fixture(scope="module")
def adapter_assistant(demo_adapter_generator, demo_index_dir, embedder, embedder_info, tmp_path_factory):
    from assistant.answer.pipeline import Assistant
    from assistant.audit import AuditLog
    from assistant.config import Settings
    from assistant.indexing import IndexStore
    from assistant.retrieval import Retriever

    generator, router = demo_adapter_generator
    audit_db = tmp_path_factory.mktemp("case-01") / "audit.db"
    # one source and eight new tokens keep the 28 generations of this module within CI time
    settings = Settings(index_dir=demo_index_dir, dtype="float32", device="cpu", max_new_tokens=8, top_k=1,
                        audit_db=audit_db)
    retriever = Retriever(IndexStore(demo_index_dir).open(embedder_info), embedder)
    return Assistant(settings, retriever, generator, router=router, audit=AuditLog(audit_db))


def test_concurrent_answers_equal_solo(adapter_assistant):
    # alternating adapters; each of the four (question, adapter) pairs recurs five times
    requests = [(QUESTIONS[i // 2 % len(QUESTIONS)], TWO_SPECIALTIES[i % 2]) for i in range(20)]
    solo = {(q, s): adapter_assistant.ask(q, specialty=s, user="solo") for q, s in sorted(set(requests))}

    with ThreadPoolExecutor(max_workers=20) as pool:
        answers = list(pool.map(lambda r: adapter_assistant.ask(r[0], specialty=r[1], user="load"), requests))

    for (question, specialty), answer in zip(requests, answers, strict=True):
        alone = solo[(question, specialty)]
        assert answer.generation["raw_output"] == alone.generation["raw_output"], (question, specialty)
        assert answer.answer == alone.answer, (question, specialty)
        assert answer.adapter == alone.adapter
        assert answer.adapter["specialty"] == specialty
        assert answer.adapter["name"].startswith(specialty)
    # the two adapters are different models: at least one question gets two different answers
    outputs = {q: {solo[(q, s)].generation["raw_output"] for s in TWO_SPECIALTIES} for q in QUESTIONS}
    assert any(len(texts) == 2 for texts in outputs.values()), outputs


def test_audit_row_names_adapter_of_each_answer(adapter_assistant):
    requests = [(QUESTIONS[i % 2], TWO_SPECIALTIES[i % 2]) for i in range(4)]
    with ThreadPoolExecutor(max_workers=4) as pool:
        answers = list(pool.map(lambda r: adapter_assistant.ask(r[0], specialty=r[1], user="audit"),
                                requests))

    rows = {row["id"]: row for row in adapter_assistant.audit.rows()}
    for answer in answers:
        row = rows[answer.audit_id]
        assert row["adapter_name"] == answer.adapter["name"]
        assert row["adapter_sha256"] == answer.adapter["sha256"]
        assert row["question"] == answer.question
