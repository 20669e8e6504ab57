"""Answer checks: counting on hand-built answers, then the real pipeline on in- and out-of-corpus questions."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
from conftest import DEMO_QUESTIONS, run_cli

from assistant.answer.citations import SentenceCheck
from assistant.evaluation.answers import evaluate_answers, score_answer, summarize_answers
from assistant.evaluation.datasets import AnswerQuestion, load_answer_questions


def fake_answer(raw: str, sources: int, supported: list[bool], abstained: bool = False):
    """An Answer-shaped record: only the fields the scorer reads."""
    hits = [SimpleNamespace(doc_id=f"doc-{n}") for n in range(1, sources + 1)]
    return SimpleNamespace(
        abstained=abstained, generation={"raw_output": raw}, retrieved=hits, citations=[], timings={},
        sentences=[SentenceCheck(f"s{n}", [], 0.5, ok) for n, ok in enumerate(supported)],
    )


def test_score_answer_counts_markers_against_sources():
    question = AnswerQuestion("q", True, "doc-2")
    row = score_answer(fake_answer("A [1]. B [2, 7]. C [3][9].", sources=3, supported=[True, False, True]), question)
    assert row["markers"] == 5
    assert row["valid_markers"] == 3
    assert row["sentences"] == 3
    assert row["supported_sentences"] == 2
    assert row["gold_retrieved"] is True


def test_summary_splits_abstention_by_corpus():
    rows = [
        score_answer(fake_answer("x [1].", 2, [True]), AnswerQuestion("a", True)),
        score_answer(fake_answer("", 0, [], abstained=True), AnswerQuestion("b", True)),
        score_answer(fake_answer("", 0, [], abstained=True), AnswerQuestion("c", False)),
        score_answer(fake_answer("y [4].", 2, [False]), AnswerQuestion("d", False)),
    ]
    summary = summarize_answers(rows)
    assert summary["abstention_rate_in_corpus"] == 0.5
    assert summary["abstention_rate_out_of_corpus"] == 0.5
    assert summary["citation_validity"] == 0.5
    assert summary["supported_sentence_rate"] == 0.5


def test_evaluate_answers_on_demo_pipeline(demo_assistant):
    questions = load_answer_questions(DEMO_QUESTIONS)
    chosen = [q for q in questions if q.in_corpus][:2] + [q for q in questions if not q.in_corpus][:3]
    result = evaluate_answers(demo_assistant, chosen)
    summary = result["summary"]
    assert summary["questions"] == 5
    assert summary["in_corpus"] == 2
    assert summary["out_of_corpus"] == 3
    # the three out-of-corpus questions chosen here are not medical: the relevance gate must hold
    assert summary["abstention_rate_out_of_corpus"] == 1.0
    assert summary["gold_retrieved_rate"] == 1.0
    for row in result["per_question"]:
        assert row["valid_markers"] <= row["markers"]
        assert row["supported_sentences"] <= row["sentences"]
    json.dumps(result)


def test_questions_file_rejects_missing_flag(tmp_path):
    from assistant.errors import BedsideError

    path = tmp_path / "q.jsonl"
    path.write_text(json.dumps({"question": "What is CURB-65?"}) + "\n")
    with pytest.raises(BedsideError, match="in_corpus"):
        load_answer_questions(path)


def test_eval_answers_cli_writes_report(demo_index_dir, tmp_path):

    questions = [json.loads(line) for line in DEMO_QUESTIONS.read_text().splitlines()]
    chosen = tmp_path / "questions.jsonl"
    chosen.write_text("\n".join(json.dumps(q) for q in [questions[0], questions[-3]]) + "\n")
    out = tmp_path / "out"
    result = run_cli("eval", "answers", "--questions", str(chosen), "--index", str(demo_index_dir),
                     "--max-new-tokens", "24", "--out", str(out), "--dtype", "float32", "--device", "cpu",
                     cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "citation_validity" in result.stdout
    report = json.loads((out / "answers.json").read_text())
    assert report["summary"]["questions"] == 2
    assert report["summary"]["abstention_rate_out_of_corpus"] == 1.0
    assert report["max_new_tokens"] == 24
    assert (out / "answers.md").read_text().startswith("| measure | value |")
