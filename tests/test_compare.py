"""`bedside compare` on a tiny budget, the PubMedQA converter, and the canary test that can fail."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import REPO, need_shared, run_cli

TRAINING = REPO / "corpora" / "training" / "cardiology.jsonl"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
DECISION_DIMENSIONS = ("Quality", "Forgetting", "Compute cost", "Iteration speed", "Rollback", "Audit", "Privacy")


@pytest.fixture(scope="module")
def tiny_compare(tmp_path_factory) -> Path:
    """One real comparison: full and LoRA, 2 steps each, 8 training and 3 held-out examples."""
    folder = tmp_path_factory.mktemp("compare")
    lines = TRAINING.read_text().splitlines()
    (folder / "train.jsonl").write_text("\n".join(lines[:8]) + "\n")
    (folder / "eval.jsonl").write_text("\n".join(lines[8:11]) + "\n")
    out = folder / "out"
    result = run_cli("compare", "--data", str(folder / "train.jsonl"), "--eval", str(folder / "eval.jsonl"),
                     "--methods", "full,lora", "--max-steps", "2", "--batch-size", "2", "--max-seq-length", "192",
                     "--canary-repeats", "2", "--canary-candidates", "32", "--max-new-tokens", "8",
                     "--out", str(out), "--device", "cpu")
    assert result.returncode == 0, result.stderr[-3000:]
    return out


def test_compare_report_has_every_field(tiny_compare):
    report = json.loads((tiny_compare / "report.json").read_text())
    results = report["results"]
    assert list(results) == ["base", "full", "lora"]
    for name, row in results.items():
        assert row["heldout"]["loss"] > 0, name
        assert row["heldout"]["perplexity"] > 1, name
        assert row["task"]["metric"] == "rougeL_f1", name
        assert 0 <= row["task"]["value"] <= 1, name
        assert row["general_text"]["perplexity"] > 1, name
        assert len(row["memorization"]["canaries"]) == 2, name
        for canary in row["memorization"]["canaries"]:
            assert 1 <= canary["rank"] <= 32
            assert canary["exposure"] == pytest.approx(5 - __import__("math").log2(canary["rank"]), abs=1e-3)
            assert isinstance(canary["extracted"], bool)
    for method in ("full", "lora"):
        training = results[method]["training"]
        assert training["steps"] == 2
        assert training["train_seconds"] > 0
        assert training["wall_seconds"] >= training["train_seconds"]
        assert training["peak_rss_mb"] > 100
        assert training["peak_cuda_mb"] is None
        assert len(training["loss_history"]) == 2
        artifact = results[method]["artifact"]
        assert artifact["bytes"] > 0
        assert len(artifact["sha256"]) == 64
        assert results[method]["load_seconds"] > 0
    full, lora = results["full"]["training"], results["lora"]["training"]
    assert full["trainable_parameters"] == full["total_parameters"]
    assert 0 < lora["trainable_parameters"] < full["trainable_parameters"] / 20
    assert results["lora"]["artifact"]["bytes"] < results["full"]["artifact"]["bytes"] / 20
    assert "adapter_model.safetensors" in results["lora"]["artifact"]["files"]
    # the same budget for both: same steps, batch and data
    assert report["budget"]["examples_seen"] == 4
    assert report["data"]["train_with_canaries"]["examples"] == 12
    assert report["data"]["general_text"]["lines"] == 50


def test_compare_writes_plots_and_decision(tiny_compare):
    for name in ("quality_vs_cost.png", "loss_curves.png", "memorization.png"):
        assert (tiny_compare / name).read_bytes()[:8] == PNG_MAGIC, name
    markdown = (tiny_compare / "report.md").read_text()
    for dimension in DECISION_DIMENSIONS:
        assert f"**{dimension}.**" in markdown, dimension
    assert "bedside compare --data" in markdown
    assert "general_english.txt" in markdown


def test_compare_rejects_bad_methods(tmp_path):
    train = tmp_path / "train.jsonl"
    train.write_text(TRAINING.read_text().splitlines()[0] + "\n")
    result = run_cli("compare", "--data", str(train), "--eval", str(train), "--methods", "full,adapterx",
                     "--out", str(tmp_path / "out"))
    assert result.returncode == 1
    assert "adapterx" in result.stderr
    assert "full,lora" in result.stderr


def test_compare_rejects_qlora_without_cuda(tmp_path):
    pytest.importorskip("torch")
    import torch

    if torch.cuda.is_available():
        pytest.skip("a CUDA GPU is visible, so qlora is allowed")
    train = tmp_path / "train.jsonl"
    train.write_text(TRAINING.read_text().splitlines()[0] + "\n")
    result = run_cli("compare", "--data", str(train), "--eval", str(train), "--methods", "full,qlora",
                     "--out", str(tmp_path / "out"))
    assert result.returncode == 1
    assert "CUDA" in result.stderr


def test_pubmedqa_training_files(tmp_path):
    from assistant.evaluation.datasets import load_pubmedqa, write_pubmedqa_training
    from assistant.evaluation.scoring import detect_task, load_chat_examples

    data = load_pubmedqa(need_shared("pubmedqa"))
    train_path, test_path = write_pubmedqa_training(data, tmp_path)
    train = [json.loads(line) for line in train_path.read_text().splitlines()]
    test = [json.loads(line) for line in test_path.read_text().splitlines()]
    assert len(train) == len(test) == 500
    assert {r["id"] for r in test} == set(data.test_ids)
    assert not {r["id"] for r in train} & set(data.test_ids)
    first = data.items[test[0]["id"]]
    user, answer = test[0]["messages"]
    assert first.question in user["content"]
    assert first.contexts[0] in user["content"]
    assert answer["content"].startswith(first.decision.capitalize() + ". ")
    assert first.long_answer in answer["content"]
    assert detect_task(load_chat_examples(test_path, limit=20)) == "decision"


def test_canary_cached_scores_match_full_sequences(base_model):
    """The prefix-cached secret scorer equals scoring each whole answer after the chat prompt."""
    from assistant.evaluation.canaries import make_canaries, secret_logprobs
    from assistant.evaluation.qa import OptionScorer

    model, tokenizer = base_model
    for canary in make_canaries(seed=3):
        other = "00000000" if canary.kind == "mrn" else "012-345-6789"
        secrets = [canary.secret, other]
        cached = secret_logprobs(model, tokenizer, canary, secrets, batch_size=1)
        scorer = OptionScorer(model, tokenizer)
        prompt = scorer.prompt_ids(canary.messages()[:1])
        full = []
        for secret in secrets:
            answer = tokenizer.encode(f"{canary.answer_prefix}{secret}", add_special_tokens=False)
            prefix = tokenizer.encode(canary.answer_prefix, add_special_tokens=False)
            assert answer[: len(prefix)] == prefix, "the secret must start on a token boundary"
            both = scorer.continuation_logprobs([prompt], [answer])[0]
            only_prefix = scorer.continuation_logprobs([prompt], [prefix])[0]
            full.append(both - only_prefix)
        assert cached == pytest.approx(full, abs=2e-3)


def test_canary_exposure_rises_with_full_fine_tuning(tmp_path, base_model):
    """Full fine-tuning on a set that repeats one canary many times must expose it beyond the base."""
    from assistant.config import Settings
    from assistant.evaluation.canaries import exposure, extracted, insert_canaries, make_canaries
    from assistant.evaluation.compare import load_artifact
    from assistant.models import resolve_model
    from assistant.tuning.config import load_train_config
    from assistant.tuning.recipes import train

    canary = make_canaries(seed=7, kinds=("mrn",))[0]
    lines = insert_canaries(TRAINING.read_text().splitlines()[:8], [canary], repeats=24, seed=7)
    data = tmp_path / "canary.jsonl"
    data.write_text("\n".join(lines) + "\n")

    model, tokenizer = base_model
    before = exposure(model, tokenizer, canary, candidates=256, seed=7)

    config = load_train_config(None, {
        "specialty": "canary", "data": str(data), "method": "full", "out": str(tmp_path / "full"),
        "max_steps": 8, "batch_size": 4, "max_seq_length": 128, "lr": 1e-4, "eval_fraction": 0.0,
        "register": False, "seed": 7,
    })
    train(config, Settings(adapters_dir=tmp_path / "adapters", device="cpu"))
    trained, trained_tokenizer, _ = load_artifact("full", tmp_path / "full", resolve_model(""), "cpu")
    after = exposure(trained, trained_tokenizer, canary, candidates=256, seed=7)

    assert after["exposure"] > before["exposure"] + 2, (before, after)
    assert after["rank"] <= 4, after
    assert extracted(trained, trained_tokenizer, canary)["extracted"], "greedy decoding did not reproduce it"


def test_decision_single_pass_matches_two_passes(tmp_path, base_model):
    """The one-pass loss and decision scorer equals the recipe's loss and the option scorer."""
    from assistant.evaluation.datasets import load_pubmedqa, spread, write_pubmedqa_training
    from assistant.evaluation.scoring import (
        decision_heldout,
        decision_quality,
        heldout_quality,
        load_chat_examples,
    )

    _, test_path = write_pubmedqa_training(load_pubmedqa(need_shared("pubmedqa")), tmp_path)
    examples = load_chat_examples(test_path)
    examples = [examples[i] for i in spread(list(range(len(examples))), 3)]
    model, tokenizer = base_model
    heldout, task = decision_heldout(model, tokenizer, examples, max_seq_length=1024)
    assert heldout["loss"] == pytest.approx(heldout_quality(model, tokenizer, examples, 1024)["loss"], abs=1e-4)
    separate = decision_quality(model, tokenizer, examples)
    assert task["value"] == separate["value"]
    assert task["predicted"] == separate["predicted"]
