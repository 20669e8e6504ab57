"""Field case 2: the base route is asked a question, an adapter is loaded, the same question again.

Expected: identical tokens before and after, whether the request names no specialty or one without
an adapter, because loading an adapter must not change the bare base model.
"""

from __future__ import annotations

import copy

import pytest
from field_helpers import DEMO_ADAPTERS

QUESTION = "How should the levothyroxine dose be changed in pregnancy?"


@pytest.fixture
def base_assistant(base_model, model_spec, demo_index_dir, embedder, embedder_info):
    from assistant import models
    from assistant.answer.generation import LocalGenerator
    from assistant.answer.pipeline import Assistant
    from assistant.config import Settings
    from assistant.indexing import IndexStore
    from assistant.retrieval import Retriever

    model, tokenizer = base_model
    generator = LocalGenerator(copy.deepcopy(model), tokenizer, model_spec.display_name,
                               models.model_fingerprint(model_spec))
    settings = Settings(index_dir=demo_index_dir, dtype="float32", device="cpu", max_new_tokens=12, top_k=1)
    retriever = Retriever(IndexStore(demo_index_dir).open(embedder_info), embedder)
    return Assistant(settings, retriever, generator)


def token_ids(assistant, text: str) -> list[int]:
    return assistant.generator.tokenizer(text, add_special_tokens=False)["input_ids"]


def test_base_answer_unchanged_by_loading_adapter(base_assistant, embedder):
    from assistant.config import Settings
    from assistant.tuning.routing import build_router

    before = base_assistant.ask(QUESTION)
    assert before.adapter["name"] is None

    # load every active demo adapter into the same generator, then route through them
    base_assistant.router = build_router(Settings(adapters_dir=DEMO_ADAPTERS), base_assistant.generator,
                                         embedder)
    assert base_assistant.generator.adapters
    after_plain = base_assistant.ask(QUESTION, specialty="nephrology")
    base_assistant.router = None
    after_no_router = base_assistant.ask(QUESTION)

    for after in (after_plain, after_no_router):
        assert after.adapter["name"] is None
        assert token_ids(base_assistant, after.generation["raw_output"]) == \
            token_ids(base_assistant, before.generation["raw_output"])
        assert after.answer == before.answer
    # the adapter itself is live: the endocrinology adapter answers the same question differently
    base_assistant.router = build_router(Settings(adapters_dir=DEMO_ADAPTERS), base_assistant.generator,
                                         embedder)
    adapted = base_assistant.ask(QUESTION, specialty="endocrinology")
    assert adapted.adapter["name"] == "endocrinology-lora-v1"
    assert adapted.generation["raw_output"] != before.generation["raw_output"]
