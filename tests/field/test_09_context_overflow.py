"""Field case 9: top-k 20 with long chunks on a short-context base model.

Expected: the lowest-ranked chunks are dropped to fit and reported; no exception; the system prompt
and the question reach the model whole. When not even one chunk fits beside the question, bedside
abstains instead of answering without a source.
"""

from __future__ import annotations

import pytest
from field_helpers import RecordingGenerator

QUESTION = "How should severe hyperkalaemia with ECG changes be treated in the emergency department?"
# a base whose context window is 1,024 tokens; the demo chunks run to about 200 tokens each
SHORT_CONTEXT = 1024


@pytest.fixture
def short_context_assistant(demo_assistant):
    from assistant.answer.pipeline import Assistant
    from assistant.config import Settings

    settings = Settings(index_dir=demo_assistant.settings.index_dir, dtype="float32", device="cpu",
                        max_new_tokens=8)
    return Assistant(settings, demo_assistant.retriever, RecordingGenerator(demo_assistant.generator))


def test_lowest_ranked_chunks_dropped_and_reported(short_context_assistant):
    from assistant.answer.prompt import SYSTEM_PROMPT

    ranking = [hit.chunk_id for hit in short_context_assistant.retriever.search(QUESTION, top_k=20)]
    assert len(ranking) == 20

    answer = short_context_assistant.ask(QUESTION, top_k=20, context_tokens=SHORT_CONTEXT)

    kept = [hit.chunk_id for hit in answer.retrieved]
    assert not answer.abstained
    assert 1 <= len(kept) < 20
    assert kept == ranking[: len(kept)]
    assert answer.dropped_chunks == ranking[len(kept):]
    dropped_flags = [f for f in answer.flags if f["type"] == "dropped_chunk"]
    assert [f["chunk_id"] for f in dropped_flags] == answer.dropped_chunks
    assert answer.generation["prompt_tokens"] + 8 <= SHORT_CONTEXT

    [messages] = short_context_assistant.generator.prompts
    assert messages[0] == {"role": "system", "content": SYSTEM_PROMPT}
    assert messages[-1]["content"].endswith(f"Question: {QUESTION}")
    for chunk_id in kept:
        hit = next(h for h in answer.retrieved if h.chunk_id == chunk_id)
        assert hit.text in messages[-1]["content"]
    for number in range(len(kept) + 1, 21):
        assert f'<source id="{number}">' not in messages[-1]["content"]


def test_no_room_for_any_source_abstains(short_context_assistant):
    from assistant.answer.pipeline import NO_ROOM_FOR_SOURCES

    question = "Which potassium level needs treatment? " + "Details of the history follow. " * 60

    answer = short_context_assistant.ask(question, top_k=20, context_tokens=256)

    # nothing is generated without a source to answer from and verify against
    assert short_context_assistant.generator.prompts == []
    assert answer.abstained
    assert answer.answer == NO_ROOM_FOR_SOURCES
    assert len(answer.dropped_chunks) == 20
    reason = next(f["detail"] for f in answer.flags if f["type"] == "abstained")
    assert "256-token context" in reason
    assert "shorten the question" in reason
