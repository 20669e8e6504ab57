"""Quality measures of a causal LM on held-out chat examples and on plain text.

Held-out loss uses the training recipe's own tokenization and loss (answer tokens only), so the
numbers match what `bedside train` records. The task metric depends on the data. When every
held-out answer starts with yes, no or maybe (PubMedQA-style data), it is decision accuracy by
constrained scoring. Otherwise it is ROUGE-L F1 of a greedy answer against the reference.
"""

from __future__ import annotations

import logging
import re
import time
from pathlib import Path
from typing import Any

from assistant.errors import BedsideError
from assistant.evaluation.datasets import DECISIONS
from assistant.evaluation.metrics import accuracy, macro_f1
from assistant.evaluation.qa import OptionScorer

logger = logging.getLogger(__name__)

DECISION_START = re.compile(r"^\s*(yes|no|maybe)\b", re.IGNORECASE)


def load_chat_examples(path: Path, limit: int = 0) -> list[Any]:
    """Validated examples of a training-format JSONL file (chat or instruction), the first `limit` if set."""
    from assistant.tuning.data import load_examples

    examples = load_examples(Path(path)).examples
    return examples[:limit] if limit else examples


def detect_task(examples: list[Any]) -> str:
    """"decision" when every reference answer starts with yes/no/maybe, else "free_text"."""
    answers = [e.messages[-1]["content"] for e in examples]
    return "decision" if answers and all(DECISION_START.match(a) for a in answers) else "free_text"


def heldout_quality(model: Any, tokenizer: Any, examples: list[Any], max_seq_length: int) -> dict[str, Any]:
    """Token-weighted answer loss and perplexity, scored as the training recipe scores its held-out split."""
    from assistant.tuning.data import tokenize_examples
    from assistant.tuning.heldout import heldout_loss

    rows = tokenize_examples(tokenizer, examples, max_seq_length, purpose="evaluation")
    scored = heldout_loss(model, tokenizer, rows, batch_size=4)
    if scored is None:
        raise BedsideError("no held-out example has an answer token within max_seq_length; raise --max-seq-length")
    return {"loss": scored["loss"], "perplexity": scored["perplexity"], "tokens": scored["tokens"],
            "examples": len(rows)}


def decision_quality(model: Any, tokenizer: Any, examples: list[Any]) -> dict[str, Any]:
    """Accuracy and macro-F1 of the yes/no/maybe decision, scored on the prompt turns of each example."""
    labels = [DECISION_START.match(e.messages[-1]["content"]).group(1).lower() for e in examples]
    predictions, _ = OptionScorer(model, tokenizer).predict([e.messages[:-1] for e in examples])
    return {"metric": "accuracy", "value": accuracy(predictions, labels),
            "macro_f1": macro_f1(predictions, labels, DECISIONS),
            "predicted": {d: predictions.count(d) for d in DECISIONS}}


def decision_heldout(model: Any, tokenizer: Any, examples: list[Any], max_seq_length: int,
                     batch_size: int = 4) -> tuple[dict[str, Any], dict[str, Any]]:
    """Score held-out loss and decision accuracy of decision data in one forward pass per batch.

    The logits at the last prompt position are the ones `OptionScorer` reads, and the answer
    tokens after it carry the loss, so one forward pass gives both instead of two. The loss is
    computed as `heldout_loss` computes it (token-weighted mean over answer tokens). Examples
    whose prompt fills `max_seq_length` are skipped for both.
    """
    import math

    import torch

    from assistant.tuning.data import IGNORE_INDEX, PaddingCollator, tokenize_examples

    rows, labels = [], []
    for example in examples:
        tokenized = tokenize_examples(tokenizer, [example], max_seq_length, purpose="evaluation")
        if tokenized:
            rows.append(tokenized[0])
            labels.append(DECISION_START.match(example.messages[-1]["content"]).group(1).lower())
    if not rows:
        raise BedsideError("no held-out example has an answer token within max_seq_length; raise --max-seq-length")
    scorer = OptionScorer(model, tokenizer)
    if not scorer.single_token:
        # options of several tokens need their own continuations scored: two passes
        return (heldout_quality(model, tokenizer, examples, max_seq_length),
                decision_quality(model, tokenizer, examples) | {"examples": len(examples)})
    option_ids = [[ids[0] for ids in forms] for forms in scorer.forms]
    collate = PaddingCollator(tokenizer.pad_token_id)
    device = next(model.parameters()).device
    total_loss, total_tokens, predictions = 0.0, 0, []
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            for start in range(0, len(rows), batch_size):
                chunk = rows[start:start + batch_size]
                batch = collate(chunk)
                logits = model(input_ids=batch["input_ids"].to(device),
                               attention_mask=batch["attention_mask"].to(device)).logits.float()
                # position t predicts token t + 1
                targets = batch["labels"][:, 1:].to(device)
                total_loss += float(torch.nn.functional.cross_entropy(
                    logits[:, :-1].reshape(-1, logits.shape[-1]), targets.reshape(-1),
                    ignore_index=IGNORE_INDEX, reduction="sum"))
                total_tokens += int((targets != IGNORE_INDEX).sum())
                for j, row in enumerate(chunk):
                    first_answer = next(i for i, label in enumerate(row["labels"]) if label != IGNORE_INDEX)
                    logprobs = torch.log_softmax(logits[j, first_answer - 1], dim=-1)
                    option_scores = [float(torch.logsumexp(logprobs[ids], dim=0)) for ids in option_ids]
                    predictions.append(scorer.options[option_scores.index(max(option_scores))])
    finally:
        model.train(was_training)
    loss = total_loss / total_tokens
    heldout = {"loss": round(loss, 6), "perplexity": round(math.exp(min(loss, 50.0)), 4), "tokens": total_tokens,
               "examples": len(rows)}
    task = {"metric": "accuracy", "value": accuracy(predictions, labels),
            "macro_f1": macro_f1(predictions, labels, DECISIONS),
            "predicted": {d: predictions.count(d) for d in DECISIONS}, "examples": len(rows)}
    return heldout, task


def free_text_quality(model: Any, tokenizer: Any, examples: list[Any], max_new_tokens: int,
                      batch_size: int = 4) -> dict[str, Any]:
    """Mean ROUGE-L F1 (rouge-score, stemmed) of greedy answers against the reference answers."""
    from rouge_score import rouge_scorer

    from assistant.answer.generation import GenerationSettings, LocalGenerator

    generator = LocalGenerator(model, tokenizer, "evaluated model", "")
    settings = GenerationSettings(max_new_tokens=max_new_tokens)
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    scores = []
    for start in range(0, len(examples), batch_size):
        batch = examples[start:start + batch_size]
        outputs = generator.generate_batch([e.messages[:-1] for e in batch], settings=settings)
        for example, output in zip(batch, outputs, strict=True):
            scores.append(scorer.score(example.messages[-1]["content"], output)["rougeL"].fmeasure)
    return {"metric": "rougeL_f1", "value": sum(scores) / len(scores), "max_new_tokens": max_new_tokens}


def task_quality(model: Any, tokenizer: Any, examples: list[Any], task: str, max_new_tokens: int) -> dict[str, Any]:
    start = time.perf_counter()
    if task == "decision":
        result = decision_quality(model, tokenizer, examples)
    else:
        result = free_text_quality(model, tokenizer, examples, max_new_tokens)
    result["examples"] = len(examples)
    result["seconds"] = round(time.perf_counter() - start, 2)
    return result


def load_text_lines(path: Path) -> list[str]:
    """Non-empty lines of a text file, skipping lines that start with '#'."""
    path = Path(path)
    if not path.is_file():
        raise BedsideError(f"general-text file {str(path)!r} not found; pass an existing UTF-8 text file")
    lines = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
    lines = [line for line in lines if line and not line.startswith("#")]
    if not lines:
        raise BedsideError(f"general-text file {str(path)!r} contains no text lines")
    return lines


def text_perplexity(model: Any, tokenizer: Any, lines: list[str]) -> dict[str, Any]:
    """Perplexity of plain text (no chat template): every token after each line's first is scored."""
    from assistant.tuning.heldout import heldout_loss

    rows = []
    for line in lines:
        ids = tokenizer.encode(line, add_special_tokens=False)
        if len(ids) >= 2:
            rows.append({"input_ids": ids, "labels": ids})
    scored = heldout_loss(model, tokenizer, rows, batch_size=8)
    if scored is None:
        raise BedsideError("the general-text lines are too short to score; use lines of several words")
    return {"loss": scored["loss"], "perplexity": scored["perplexity"], "tokens": scored["tokens"],
            "lines": len(rows)}
