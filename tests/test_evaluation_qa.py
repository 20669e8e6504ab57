"""Constrained yes/no/maybe scoring and `bedside eval qa` on PubMedQA."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import need_shared, run_cli

from assistant.evaluation.datasets import decision_messages


def test_scorer_batch_equals_single_rows(base_model):
    """Left padding must not change a prompt's scores (fp32; tolerance covers summation order)."""
    from assistant.evaluation.qa import OptionScorer

    model, tokenizer = base_model
    scorer = OptionScorer(model, tokenizer)
    assert scorer.single_token
    prompts = [decision_messages("Is water wet?"),
               decision_messages("Does regular exercise lower resting heart rate in adults over sixty?",
                                 ["A trial of 200 adults found lower resting heart rate after training."])]
    together = scorer.score(prompts)
    alone = np.array([scorer.score([p])[0] for p in prompts])
    assert together.shape == (2, 3)
    np.testing.assert_allclose(together, alone, atol=1e-3)
    assert np.all(together < 0)


def test_scorer_general_path_matches_fast_path(base_model):
    """Scoring options as full continuations gives the same numbers as the next-token shortcut."""
    from assistant.evaluation.qa import OptionScorer, _logsumexp

    model, tokenizer = base_model
    scorer = OptionScorer(model, tokenizer)
    messages = [decision_messages("Is the sky blue on a clear day?")]
    fast = scorer.score(messages)[0]
    prompt = scorer.prompt_ids(messages[0])
    slow = [_logsumexp([scorer.continuation_logprobs([prompt], [ids])[0] for ids in forms]) for forms in scorer.forms]
    np.testing.assert_allclose(fast, slow, atol=1e-3)


def test_eval_qa_prints_majority_baseline(tmp_path):
    folder = need_shared("pubmedqa")
    out = tmp_path / "out"
    result = run_cli("eval", "qa", "--dataset", "pubmedqa", str(folder), "--limit", "12",
                     "--index-scope", "evaluated", "--cache-dir", str(tmp_path / "cache"), "--out", str(out),
                     "--dtype", "float32", "--device", "cpu")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "majority (yes) accuracy" in result.stdout
    report = json.loads((out / "qa.json").read_text())
    assert report["selection"] == "spread"
    modes = [r["mode"] for r in report["results"]]
    assert modes == ["no retrieval", "retrieval (hybrid, top 3)"]
    for row in report["results"]:
        assert row["questions"] == 12
        assert 0 <= row["accuracy"] <= 1
        assert 0 <= row["macro_f1"] <= 1
        assert row["majority_class"] == "yes"
        assert sum(row["predicted"].values()) == 12
    # 12 questions spread over the sorted split: 7 yes, 4 no, 1 maybe
    assert report["results"][0]["majority_accuracy"] == pytest.approx(7 / 12)
    assert report["results"][1]["gold_abstract_retrieved"] >= 0.9


def test_eval_qa_rejects_missing_dataset(tmp_path):
    result = run_cli("eval", "qa", "--dataset", "pubmedqa", str(tmp_path), "--no-retrieval")
    assert result.returncode == 1
    assert "PubMedQA not found" in result.stderr


def test_eval_qa_with_registered_adapter(tmp_path):
    folder = need_shared("pubmedqa")
    out = tmp_path / "out"
    result = run_cli("eval", "qa", str(folder), "--adapter", "cardiology-lora-v1", "--limit", "3",
                     "--no-retrieval", "--out", str(out), "--dtype", "float32", "--device", "cpu")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "adapter cardiology-lora-v1" in result.stdout
    report = json.loads((out / "qa.json").read_text())
    assert report["adapter"] == "cardiology-lora-v1"
    assert report["adapter_folder"].endswith("cardiology-lora-v1")
    assert report["results"][0]["questions"] == 3


def test_eval_qa_rejects_unknown_adapter(tmp_path):
    folder = need_shared("pubmedqa")
    result = run_cli("eval", "qa", str(folder), "--adapter", "no-such-adapter", "--no-retrieval",
                     "--out", str(tmp_path / "out"))
    assert result.returncode == 1
    assert "no-such-adapter" in result.stderr
