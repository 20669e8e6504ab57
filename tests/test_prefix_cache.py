"""Shared-prefix batched generation: batched rows equal solo rows and the plain path (fp32, greedy)."""

from __future__ import annotations

import pytest

SYSTEM = "You summarise hospital stays for a clinician in two plain sentences. Use only the facts given."
STAYS = [
    "Admitted with fever and productive cough; chest X-ray showed right lower lobe pneumonia. "
    "Amoxicillin for five days, afebrile by day 3, discharged home.",
    "Fall at home, scalp laceration closed with three sutures; CT head normal. Home next morning.",
    "Diabetic ketoacidosis: insulin infusion and fluids for 36 hours, central line placed, ketones "
    "cleared on day 2, back on basal-bolus insulin, home on day 3 with diabetes nurse follow-up.",
]


@pytest.fixture(scope="module")
def generators(base_model, model_spec):
    from assistant import models
    from assistant.answer.generation import LocalGenerator
    from assistant.answer.prefix_cache import SharedPrefixGenerator

    model, tokenizer = base_model
    plain = LocalGenerator(model, tokenizer, model_spec.display_name, models.model_fingerprint(model_spec))
    return plain, SharedPrefixGenerator(plain, [{"role": "system", "content": SYSTEM}])


def conversation(text: str) -> list[dict[str, str]]:
    return [{"role": "system", "content": SYSTEM}, {"role": "user", "content": text}]


def test_prefix_batch_equals_solo_and_plain(generators):
    from assistant.answer.generation import GenerationSettings

    plain, shared = generators
    settings = GenerationSettings(max_new_tokens=16)
    conversations = [conversation(text) for text in STAYS]

    together = shared.generate_batch(conversations, None, settings)
    alone = [shared.generate_batch([c], None, settings)[0] for c in conversations]
    reference = plain.generate_batch(conversations, None, settings)

    assert len(shared.prefix_ids) > 20
    assert all(together)
    assert together == alone
    assert together == reference


def test_prefix_mismatch_falls_back(generators, caplog):
    from assistant.answer.generation import GenerationSettings

    plain, shared = generators
    settings = GenerationSettings(max_new_tokens=8)
    other = [{"role": "system", "content": "Answer in one word."},
             {"role": "user", "content": "Colour of snow?"}]

    output = shared.generate_batch([other, conversation(STAYS[1])], None, settings)

    assert output == plain.generate_batch([other, conversation(STAYS[1])], None, settings)
    assert "does not start with the shared prefix" in caplog.text


def test_preallocated_layer_capacity_checked():
    import torch

    from assistant.answer.prefix_cache import _preallocated_layer_class
    from assistant.errors import ModelError

    layer = _preallocated_layer_class()(capacity=4)
    keys = torch.arange(24, dtype=torch.float32).reshape(1, 2, 3, 4)

    stored_keys, stored_values = layer.update(keys, keys + 1)

    assert torch.equal(stored_keys, keys)
    assert torch.equal(stored_values, keys + 1)
    assert layer.get_seq_length() == 3
    stored_keys, _ = layer.update(keys[:, :, :1], keys[:, :, :1])
    assert stored_keys.shape[-2] == 4
    with pytest.raises(ModelError, match="capacity 4 exceeded"):
        layer.update(keys[:, :, :1], keys[:, :, :1])
