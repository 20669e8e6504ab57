"""Training data: JSONL validation, the held-out split, and chat-template tokenization with answer-only labels.

Two record shapes are accepted, one per line:

- chat: `{"messages": [{"role": "system"|"user"|"assistant", "content": "..."}, ...]}`, ending with an
  assistant turn;
- instruction: `{"instruction": "...", "input": "..." (optional), "output": "..."}`, which becomes one
  user turn (instruction, then input after a blank line) and one assistant turn.

Other keys (ids, tags) are ignored. Validation needs no tokenizer, so a bad file is rejected before
any model or tokenizer loads.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from assistant.errors import BedsideError
from assistant.jsonl import jsonl_lines

logger = logging.getLogger(__name__)

ROLES = ("system", "user", "assistant")
# Labels with this value are ignored by the cross-entropy loss of transformers' causal LMs.
IGNORE_INDEX = -100


@dataclass
class Example:
    """One training conversation and the line of the file it came from."""

    messages: list[dict[str, str]]
    line: int

    @property
    def key(self) -> str:
        """sha256 of the conversation's canonical JSON: a stable identity independent of file order."""
        canonical = json.dumps(self.messages, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
        return hashlib.sha256(canonical.encode("utf-8")).hexdigest()

    @property
    def question(self) -> str:
        """The last user turn: what a router compares incoming questions with."""
        return next((m["content"] for m in reversed(self.messages) if m["role"] == "user"), "")


@dataclass
class DataReport:
    """Valid examples of a JSONL file, the rejected lines with reasons, and the file's sha256."""

    path: Path
    sha256: str
    examples: list[Example] = field(default_factory=list)
    problems: list[tuple[int, str]] = field(default_factory=list)


def file_sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def record_to_messages(record: Any) -> list[dict[str, str]]:
    """Convert one parsed JSONL record to chat messages, raising ValueError with the reason if invalid."""
    if not isinstance(record, dict):
        raise ValueError(f"expected a JSON object, got {type(record).__name__}")
    has_chat = "messages" in record
    has_instruction = "instruction" in record or "output" in record
    if has_chat and has_instruction:
        raise ValueError("has both `messages` and `instruction`/`output`; use one shape per line")

    if has_chat:
        messages = record["messages"]
        if not isinstance(messages, list) or not messages:
            raise ValueError("`messages` must be a non-empty list")
        cleaned = []
        for position, message in enumerate(messages):
            if not isinstance(message, dict):
                raise ValueError(f"message {position} is not an object")
            role, content = message.get("role"), message.get("content")
            if role not in ROLES:
                raise ValueError(f"message {position} has role {role!r}; expected one of {', '.join(ROLES)}")
            if not isinstance(content, str) or not content.strip():
                raise ValueError(f"message {position} ({role}) has empty or non-string `content`")
            cleaned.append({"role": role, "content": content})
        if cleaned[-1]["role"] != "assistant":
            raise ValueError("the last message must be the assistant's answer")
        if not any(m["role"] == "user" for m in cleaned):
            raise ValueError("no user message")
        return cleaned

    if has_instruction:
        instruction, extra, output = record.get("instruction"), record.get("input", ""), record.get("output")
        if not isinstance(instruction, str) or not instruction.strip():
            raise ValueError("`instruction` is missing or empty")
        if extra is None:
            extra = ""
        if not isinstance(extra, str):
            raise ValueError("`input` must be a string")
        if not isinstance(output, str) or not output.strip():
            raise ValueError("`output` is missing or empty")
        prompt = instruction.strip() + (f"\n\n{extra.strip()}" if extra.strip() else "")
        return [{"role": "user", "content": prompt}, {"role": "assistant", "content": output.strip()}]

    raise ValueError("has neither `messages` nor `instruction` and `output`")


def load_examples(path: Path) -> DataReport:
    """Read and validate a JSONL training file; raise BedsideError when it is unusable as a whole."""
    path = Path(path)
    if not path.is_file():
        raise BedsideError(f"training data {str(path)!r} not found; pass an existing JSONL file to --data")
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8").lstrip("\ufeff")
    except UnicodeDecodeError as err:
        raise BedsideError(f"training data {str(path)!r} is not valid UTF-8 (offset {err.start}); "
                           "re-save it as UTF-8") from err

    report = DataReport(path=path, sha256=hashlib.sha256(raw).hexdigest())
    for number, line in enumerate(jsonl_lines(text), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            report.problems.append((number, f"invalid JSON ({err.msg} at column {err.colno})"))
            continue
        except RecursionError:
            report.problems.append((number, "invalid JSON (nested too deeply)"))
            continue
        try:
            report.examples.append(Example(record_to_messages(record), number))
        except ValueError as err:
            report.problems.append((number, str(err)))

    if not report.examples:
        detail = "; ".join(f"line {n}: {reason}" for n, reason in report.problems[:5]) or "the file is empty"
        raise BedsideError(
            f"training data {str(path)!r} has no valid examples ({detail}). Each line must be "
            '{"messages": [...]} or {"instruction": ..., "output": ...}'
        )
    for number, reason in report.problems:
        logger.warning("%s:%d skipped: %s", path, number, reason)
    return report


def split_heldout(examples: list[Example], fraction: float) -> tuple[list[Example], list[Example]]:
    """Split into (train, held-out) by each example's content hash, not by position or seed.

    An example lands in the held-out set when the first 32 bits of its hash fall below `fraction`, so
    it stays there when the file is reordered or grows: a later adapter trained on an extended file is
    still scored on examples neither adapter saw. With at least two examples and nothing below the
    threshold, the single lowest hash is held out so every run reports a held-out loss.
    """
    if fraction <= 0 or len(examples) < 2:
        return list(examples), []
    threshold = fraction * 2**32
    heldout_keys = {e.key for e in examples if int(e.key[:8], 16) < threshold}
    if not heldout_keys:
        heldout_keys = {min(examples, key=lambda e: e.key).key}
    if len(heldout_keys) >= len({e.key for e in examples}):
        # every distinct example fell below the threshold (a very small file): keep one to train on
        heldout_keys.discard(max(heldout_keys))
    train = [e for e in examples if e.key not in heldout_keys]
    heldout = [e for e in examples if e.key in heldout_keys]
    return train, heldout


def examples_sha256(examples: list[Example]) -> str:
    """sha256 over the sorted example hashes: identifies an evaluation set independent of order."""
    return hashlib.sha256("\n".join(sorted(e.key for e in examples)).encode()).hexdigest()


# tokenization

def _template_ids(tokenizer: Any, messages: list[dict[str, str]], add_generation_prompt: bool) -> list[int]:
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, tokenize=True)
    if hasattr(ids, "keys"):
        ids = ids["input_ids"]
    return list(ids)


def tokenize_example(tokenizer: Any, messages: list[dict[str, str]], max_length: int) -> dict[str, list[int]]:
    """Render with the chat template; labels are the assistant turns' tokens, everything else IGNORE_INDEX.

    Each assistant turn's span is found by rendering the conversation up to that turn with the
    generation prompt (the prefix) and through that turn (the full text). The span includes the
    template's end-of-turn token, so the model learns where an answer stops.
    """
    input_ids: list[int] = []
    labels: list[int] = []
    for position, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prefix = _template_ids(tokenizer, messages[:position], add_generation_prompt=True)
        full = _template_ids(tokenizer, messages[: position + 1], add_generation_prompt=False)
        if full[: len(prefix)] != prefix or len(prefix) < len(input_ids) or prefix[: len(input_ids)] != input_ids:
            raise BedsideError(
                "the tokenizer's chat template does not render earlier turns as a prefix of later ones, "
                "so answer tokens cannot be located; use a base model with a prefix-stable template"
            )
        # tokens between the end of the previous assistant turn and this prompt are context (no loss)
        labels.extend([IGNORE_INDEX] * (len(prefix) - len(input_ids)))
        labels.extend(full[len(prefix):])
        input_ids = full
    return {"input_ids": input_ids[:max_length], "labels": labels[:max_length]}


def tokenize_examples(tokenizer: Any, examples: list[Example], max_length: int,
                      purpose: str = "training") -> list[dict[str, list[int]]]:
    """Tokenize examples, dropping (with a warning naming the line) those with no answer token left."""
    rows = []
    for example in examples:
        row = tokenize_example(tokenizer, example.messages, max_length)
        if all(label == IGNORE_INDEX for label in row["labels"]):
            logger.warning("line %d dropped from %s: the prompt alone fills max_seq_length (%d tokens); "
                           "raise max_seq_length or shorten the example", example.line, purpose, max_length)
            continue
        rows.append(row)
    return rows


class PaddingCollator:
    """Right-pad input ids, attention masks and labels into one batch of tensors."""

    def __init__(self, pad_token_id: int) -> None:
        self.pad_token_id = pad_token_id

    def __call__(self, rows: list[dict[str, list[int]]]) -> dict[str, Any]:
        import torch

        width = max(len(r["input_ids"]) for r in rows)
        input_ids = [r["input_ids"] + [self.pad_token_id] * (width - len(r["input_ids"])) for r in rows]
        labels = [r["labels"] + [IGNORE_INDEX] * (width - len(r["labels"])) for r in rows]
        attention = [[1] * len(r["input_ids"]) + [0] * (width - len(r["input_ids"])) for r in rows]
        return {
            "input_ids": torch.tensor(input_ids, dtype=torch.long),
            "attention_mask": torch.tensor(attention, dtype=torch.long),
            "labels": torch.tensor(labels, dtype=torch.long),
        }
