"""Yes/no/maybe answering by constrained decoding: the option with the highest log-likelihood wins.

Nothing is generated or parsed. Each prompt is rendered with the chat template and the generation
prompt, and the model's log-probability of each option as the assistant's first word is read off.
An option's probability sums its surface forms ("yes" and "Yes"), because an instruction-tuned
model usually capitalises the first word of a reply.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from assistant.evaluation.datasets import DECISIONS, PubMedQA, decision_messages
from assistant.evaluation.metrics import accuracy, macro_f1, majority_class

logger = logging.getLogger(__name__)

# Prompts are batched up to this many tokens (prompt length x rows) per forward pass.
BATCH_TOKENS = 4096


class OptionScorer:
    """Score fixed answer options after chat prompts with one causal LM (and optional PEFT adapter)."""

    def __init__(self, model: Any, tokenizer: Any, options: tuple[str, ...] = DECISIONS,
                 max_batch: int = 8) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.options = options
        self.max_batch = max_batch
        # surface forms of each option as token id sequences
        self.forms: list[list[list[int]]] = []
        for option in options:
            variants = dict.fromkeys([option, option.capitalize()])
            self.forms.append([tokenizer.encode(v, add_special_tokens=False) for v in variants])
        self.single_token = all(len(ids) == 1 for forms in self.forms for ids in forms)

    def prompt_ids(self, messages: list[dict[str, str]]) -> list[int]:
        ids = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        if hasattr(ids, "keys"):
            ids = ids["input_ids"]
        return list(ids)

    def score(self, messages_list: list[list[dict[str, str]]]) -> np.ndarray:
        """Log-likelihood of each option (columns, in `options` order) after each prompt (rows)."""
        prompts = [self.prompt_ids(m) for m in messages_list]
        scores = np.zeros((len(prompts), len(self.options)), dtype=np.float64)
        if self.single_token:
            first = [[ids[0] for ids in forms] for forms in self.forms]
            for rows, logprobs in self._next_token_logprobs(prompts):
                for row, lp in zip(rows, logprobs, strict=True):
                    scores[row] = [_logsumexp([lp[t] for t in ids]) for ids in first]
            return scores
        # general case: options of several tokens are scored as full continuations
        for o, forms in enumerate(self.forms):
            per_form = [self.continuation_logprobs(prompts, [ids] * len(prompts)) for ids in forms]
            scores[:, o] = [_logsumexp(values) for values in zip(*per_form, strict=True)]
        return scores

    def predict(self, messages_list: list[list[dict[str, str]]]) -> tuple[list[str], np.ndarray]:
        scores = self.score(messages_list)
        return [self.options[int(i)] for i in scores.argmax(axis=1)], scores

    def _batches(self, lengths: list[int]) -> list[list[int]]:
        # longest first, so padding stays small and the first batch shows the memory peak
        order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
        batches, current = [], []
        for i in order:
            width = lengths[current[0]] if current else lengths[i]
            if current and (len(current) >= self.max_batch or width * (len(current) + 1) > BATCH_TOKENS):
                batches.append(current)
                current = []
            current.append(i)
        if current:
            batches.append(current)
        return batches

    def _forward(self, rows: list[list[int]], keep: int) -> Any:
        """Left-padded forward pass; log-softmax over the vocabulary at the last `keep` positions.

        Only the kept positions go through the LM head: full logits for a batch of long prompts
        would take gigabytes (rows x positions x 49,152 vocabulary entries for SmolLM2).
        """
        import torch

        width = max(len(r) for r in rows)
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        device = next(self.model.parameters()).device
        input_ids = torch.tensor([[pad] * (width - len(r)) + r for r in rows], dtype=torch.long, device=device)
        mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows], dtype=torch.long, device=device)
        # positions count real tokens only, so a padded row sees the same positions as it would alone
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        with torch.inference_mode():
            logits = self.model(input_ids=input_ids, attention_mask=mask, position_ids=positions,
                                logits_to_keep=keep).logits
        return torch.log_softmax(logits.float(), dim=-1)

    def _next_token_logprobs(self, prompts: list[list[int]]):
        for batch in self._batches([len(p) for p in prompts]):
            logprobs = self._forward([prompts[i] for i in batch], keep=1)
            yield batch, [logprobs[j, -1].cpu().numpy() for j in range(len(batch))]

    def continuation_logprobs(self, prompts: list[list[int]], continuations: list[list[int]]) -> list[float]:
        """Sum of log-probabilities of each continuation's tokens after its prompt."""
        rows = [p + c for p, c in zip(prompts, continuations, strict=True)]
        out = [0.0] * len(rows)
        for batch in self._batches([len(r) for r in rows]):
            keep = max(len(continuations[i]) for i in batch) + 1
            logprobs = self._forward([rows[i] for i in batch], keep=keep)
            for j, i in enumerate(batch):
                tokens = continuations[i]
                # rows end with their continuation, so its tokens are predicted from the positions
                # just before the last len(tokens) ones
                first = keep - len(tokens) - 1
                out[i] = float(sum(logprobs[j, first + n, token] for n, token in enumerate(tokens)))
        return out


def _logsumexp(values: list[float]) -> float:
    top = max(values)
    return top + math.log(sum(math.exp(v - top) for v in values))


@dataclass
class QAResult:
    """One evaluation mode's predictions and scores."""

    mode: str
    ids: list[str]
    labels: list[str]
    predictions: list[str]
    seconds: float
    retrieval_hits: list[bool] = field(default_factory=list)

    def metrics(self, majority: str) -> dict[str, Any]:
        baseline = [majority] * len(self.labels)
        out: dict[str, Any] = {
            "mode": self.mode,
            "questions": len(self.labels),
            "accuracy": accuracy(self.predictions, self.labels),
            "macro_f1": macro_f1(self.predictions, self.labels, DECISIONS),
            "majority_class": majority,
            "majority_accuracy": accuracy(baseline, self.labels),
            "majority_macro_f1": macro_f1(baseline, self.labels, DECISIONS),
            "predicted": {d: self.predictions.count(d) for d in DECISIONS},
            "seconds": round(self.seconds, 2),
        }
        if self.retrieval_hits:
            out["gold_abstract_retrieved"] = sum(self.retrieval_hits) / len(self.retrieval_hits)
        return out


def evaluate_pubmedqa(scorer: OptionScorer, data: PubMedQA, ids: list[str], retriever: Any = None,
                      top_k: int = 3) -> QAResult:
    """Answer `ids` from the question alone, or from the top-k retrieved passages when `retriever` is given."""
    start = time.perf_counter()
    questions = [data.items[i].question for i in ids]
    hits_ok: list[bool] = []
    if retriever is None:
        messages = [decision_messages(q) for q in questions]
        mode = "no retrieval"
    else:
        results = retriever.search_many(questions, top_k=top_k, mode="hybrid")
        messages = [decision_messages(q, [h.text for h in hits]) for q, hits in zip(questions, results, strict=True)]
        hits_ok = [any(h.doc_id == pmid for h in hits) for pmid, hits in zip(ids, results, strict=True)]
        mode = f"retrieval (hybrid, top {top_k})"
    predictions, _ = scorer.predict(messages)
    result = QAResult(mode, list(ids), [data.items[i].decision for i in ids], predictions,
                      time.perf_counter() - start, hits_ok)
    logger.info("PubMedQA %s: %d questions in %.1f s", mode, len(ids), result.seconds)
    return result


def training_majority(data: PubMedQA) -> str:
    """The majority decision of the training split: the baseline that always answers it."""
    return majority_class(data.items[i].decision for i in data.train_ids)
