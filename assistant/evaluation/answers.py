"""Checks on cited free-text answers: citation validity, sentence support and abstention.

Citation validity counts the markers in the model's raw output, before the verifier removes bad
ones or attaches sources to uncited sentences. A marker is valid when it names one of the sources
the prompt numbered. The supported-sentence rate is the share of the verified answer's sentences
whose cited (or attached) source clears the verifier's support threshold.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from assistant.answer.citations import MARKER, normalize_markers
from assistant.evaluation.datasets import AnswerQuestion

logger = logging.getLogger(__name__)


def score_answer(answer: Any, question: AnswerQuestion) -> dict[str, Any]:
    """Counts for one `Answer`: markers, valid markers, sentences, supported sentences, abstention."""
    raw = answer.generation.get("raw_output", "") if not answer.abstained else ""
    markers = [int(n) for n in MARKER.findall(normalize_markers(raw))]
    sources = len(answer.retrieved)
    row: dict[str, Any] = {
        "question": question.question,
        "in_corpus": question.in_corpus,
        "abstained": answer.abstained,
        "markers": len(markers),
        "valid_markers": sum(1 <= n <= sources for n in markers),
        "sentences": len(answer.sentences),
        "supported_sentences": sum(s.supported for s in answer.sentences),
        "auto_cited_sentences": sum(s.auto_cited for s in answer.sentences),
        "seconds": answer.timings.get("total_s"),
    }
    if question.doc_id:
        row["gold_retrieved"] = any(h.doc_id == question.doc_id for h in answer.retrieved)
        row["gold_cited"] = any(c.doc_id == question.doc_id for c in answer.citations)
    return row


def _ratio(numerator: float, denominator: float) -> float | None:
    return numerator / denominator if denominator else None


def summarize_answers(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Aggregate per-question counts; a rate with nothing to count is None, not 0."""
    inside = [r for r in rows if r["in_corpus"]]
    outside = [r for r in rows if not r["in_corpus"]]
    answered = [r for r in rows if not r["abstained"]]
    with_gold = [r for r in inside if "gold_retrieved" in r]
    return {
        "questions": len(rows),
        "in_corpus": len(inside),
        "out_of_corpus": len(outside),
        "answered": len(answered),
        "citation_validity": _ratio(sum(r["valid_markers"] for r in answered), sum(r["markers"] for r in answered)),
        "markers": sum(r["markers"] for r in answered),
        "answers_without_markers": sum(r["markers"] == 0 for r in answered),
        "supported_sentence_rate": _ratio(sum(r["supported_sentences"] for r in answered),
                                          sum(r["sentences"] for r in answered)),
        "auto_cited_sentence_rate": _ratio(sum(r["auto_cited_sentences"] for r in answered),
                                           sum(r["sentences"] for r in answered)),
        "abstention_rate_in_corpus": _ratio(sum(r["abstained"] for r in inside), len(inside)),
        "abstention_rate_out_of_corpus": _ratio(sum(r["abstained"] for r in outside), len(outside)),
        "gold_retrieved_rate": _ratio(sum(r["gold_retrieved"] for r in with_gold), len(with_gold)),
        "gold_cited_rate": _ratio(sum(r["gold_cited"] for r in with_gold), len(with_gold)),
    }


def evaluate_answers(assistant: Any, questions: list[AnswerQuestion]) -> dict[str, Any]:
    """Ask every question through the full pipeline and score the answers."""
    start = time.perf_counter()
    rows = []
    for number, question in enumerate(questions, 1):
        answer = assistant.ask(question.question, user="evaluation")
        rows.append(score_answer(answer, question))
        logger.info("answered %d/%d (%s)", number, len(questions), "abstained" if answer.abstained else "answered")
    summary = summarize_answers(rows)
    summary["seconds"] = round(time.perf_counter() - start, 2)
    return {"summary": summary, "per_question": rows}
