"""Held-out loss: the token-weighted mean cross-entropy over answer tokens, and its perplexity.

Training, `bedside adapters promote` and the benchmarks score with this one function, so a score
recorded at training time and one computed at promotion are comparable.
"""

from __future__ import annotations

import math
from typing import Any

from assistant.tuning.data import IGNORE_INDEX, PaddingCollator


def heldout_loss(model: Any, tokenizer: Any, rows: list[dict[str, list[int]]], adapter_name: str | None = None,
                 batch_size: int = 8) -> dict[str, float] | None:
    """Score tokenized rows; `adapter_name` picks a loaded PEFT adapter per row ("__base__" = none).

    Returns None when there is nothing to score. Mean loss is over answer tokens (labels other than
    IGNORE_INDEX), not over batches, so it does not depend on batch size or padding.
    """
    import torch

    if not rows:
        return None
    collate = PaddingCollator(tokenizer.pad_token_id)
    device = next(model.parameters()).device
    total_loss, total_tokens = 0.0, 0
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            for start in range(0, len(rows), batch_size):
                batch = collate(rows[start:start + batch_size])
                kwargs: dict[str, Any] = {}
                if adapter_name is not None:
                    kwargs["adapter_names"] = [adapter_name] * batch["input_ids"].shape[0]
                logits = model(input_ids=batch["input_ids"].to(device),
                               attention_mask=batch["attention_mask"].to(device), **kwargs).logits
                # position t predicts token t + 1
                shifted_logits = logits[:, :-1].float()
                targets = batch["labels"][:, 1:].to(device)
                losses = torch.nn.functional.cross_entropy(
                    shifted_logits.reshape(-1, shifted_logits.shape[-1]), targets.reshape(-1),
                    ignore_index=IGNORE_INDEX, reduction="sum",
                )
                total_loss += float(losses)
                total_tokens += int((targets != IGNORE_INDEX).sum())
    finally:
        model.train(was_training)
    if total_tokens == 0:
        return None
    loss = total_loss / total_tokens
    return {"loss": round(loss, 6), "perplexity": round(math.exp(min(loss, 50.0)), 4), "tokens": total_tokens}
