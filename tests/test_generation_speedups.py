"""Speed-ups that must not change answers: prompt prefix reuse and fp32 linear layers on oneDNN."""

from __future__ import annotations

import pytest
import torch

from assistant import cpu_linear
from assistant.answer.generation import MIN_REUSED_PROMPT_TOKENS, GenerationSettings, LocalGenerator
from assistant.answer.prompt import SYSTEM_PROMPT

QUESTIONS = [
    "Which antibiotic treats community-acquired pneumonia?",
    "How is diabetic ketoacidosis treated in the first hour?",
]
SETTINGS = GenerationSettings(max_new_tokens=24)


def conversation(question: str) -> list[dict[str, str]]:
    return [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": question}]


@pytest.fixture
def generators(base_model):
    model, tokenizer = base_model
    reusing = LocalGenerator(model, tokenizer, "base", "")
    fresh = LocalGenerator(model, tokenizer, "base", "")
    fresh.reuse_prompt_prefix = False
    return reusing, fresh


def test_prefix_reuse_keeps_outputs(generators):
    reusing, fresh = generators
    reusing.generate(conversation("Hello"), settings=SETTINGS)
    for question in QUESTIONS:
        output = reusing.generate(conversation(question), settings=SETTINGS)
        assert reusing.last_reused_tokens >= MIN_REUSED_PROMPT_TOKENS, question
        assert output == fresh.generate(conversation(question), settings=SETTINGS), question


def test_prefix_reuse_same_prompt_twice(generators):
    reusing, fresh = generators
    first = reusing.generate(conversation(QUESTIONS[0]), settings=SETTINGS)
    second = reusing.generate(conversation(QUESTIONS[0]), settings=SETTINGS)
    prompt_tokens = reusing.encode([conversation(QUESTIONS[0])])["input_ids"].shape[1]
    # every prompt token but the last comes from the cache; the last one runs to give the logits
    assert reusing.last_reused_tokens == prompt_tokens - 1
    assert second == first
    assert first == fresh.generate(conversation(QUESTIONS[0]), settings=SETTINGS)


def test_prefix_reuse_in_stream(generators):
    reusing, fresh = generators
    reusing.generate(conversation("Hello"), settings=SETTINGS)
    streamed = "".join(reusing.stream(conversation(QUESTIONS[1]), settings=SETTINGS)).strip()
    assert reusing.last_reused_tokens >= MIN_REUSED_PROMPT_TOKENS
    assert streamed == fresh.generate(conversation(QUESTIONS[1]), settings=SETTINGS)


def test_batches_skip_prefix_reuse(generators):
    reusing, _ = generators
    reusing.generate(conversation("Hello"), settings=SETTINGS)
    reusing.generate_batch([conversation(q) for q in QUESTIONS[:2]], settings=SETTINGS)
    assert reusing.last_reused_tokens == 0


@pytest.mark.skipif(not cpu_linear.onednn_available(), reason="this PyTorch build has no oneDNN linear op")
def test_onednn_kernel_keeps_outputs(generators):
    _, fresh = generators
    model = fresh.model
    before = cpu_linear.uses_onednn(model)
    try:
        cpu_linear.use_onednn(model, False)
        default = [fresh.generate(conversation(q), settings=SETTINGS) for q in QUESTIONS]
        default_batch = fresh.generate_batch([conversation(q) for q in QUESTIONS], settings=SETTINGS)
        assert cpu_linear.use_onednn(model, True) > 0
        assert [fresh.generate(conversation(q), settings=SETTINGS) for q in QUESTIONS] == default
        assert fresh.generate_batch([conversation(q) for q in QUESTIONS], settings=SETTINGS) == default_batch
    finally:
        cpu_linear.use_onednn(model, before)


@pytest.mark.skipif(not cpu_linear.onednn_available(), reason="this PyTorch build has no oneDNN linear op")
def test_onednn_linear_trains_through_default_kernel():
    layer = torch.nn.Linear(8, 4)
    reference = torch.nn.Linear(8, 4)
    reference.load_state_dict(layer.state_dict())
    cpu_linear.use_onednn(layer)
    assert cpu_linear.uses_onednn(layer)
    x = torch.randn(3, 8, requires_grad=True)
    layer(x).sum().backward()
    expected = x.detach().clone().requires_grad_(True)
    reference(expected).sum().backward()
    assert torch.equal(x.grad, expected.grad)
    assert torch.equal(layer.weight.grad, reference.weight.grad)
    with torch.inference_mode():
        assert torch.allclose(layer(x), reference(x), atol=1e-5)
