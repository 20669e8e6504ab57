"""Promotion: score a candidate adapter against the serving one on held-out data, then switch or refuse.

The serving side is the specialty's active adapter, or the bare base model when the specialty has
none. Both are scored with the same loss on the same examples in one process, and both scores are
written to the registry whether the promotion goes ahead or not.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from assistant import models
from assistant.answer.generation import BASE_ROUTE
from assistant.errors import BedsideError, ModelError
from assistant.tuning.data import (
    Example,
    examples_sha256,
    file_sha256,
    load_examples,
    split_heldout,
    tokenize_examples,
)
from assistant.tuning.heldout import heldout_loss
from assistant.tuning.loading import load_registered_adapter
from assistant.tuning.registry import TRAINING_RECORD, AdapterRegistry, now_iso

logger = logging.getLogger(__name__)

DEFAULT_MAX_SEQ_LENGTH = 512


@dataclass
class Promotion:
    """The outcome of `promote`: both scores, the evaluation set, and whether the candidate is now active."""

    candidate: str
    incumbent: str | None
    candidate_score: dict[str, Any]
    incumbent_score: dict[str, Any] | None
    evaluation: dict[str, Any]
    promoted: bool
    forced: bool

    def evidence(self) -> dict[str, Any]:
        return {
            "candidate_loss": self.candidate_score["loss"],
            "candidate_perplexity": self.candidate_score["perplexity"],
            "incumbent": self.incumbent or "base model",
            "incumbent_loss": self.incumbent_score["loss"] if self.incumbent_score else None,
            "incumbent_perplexity": self.incumbent_score["perplexity"] if self.incumbent_score else None,
            "evaluation": self.evaluation,
            "forced": self.forced,
        }


def promote(settings: Any, name: str, force: bool = False, heldout_file: Path | None = None,
            generator: Any = None) -> Promotion:
    """Score candidate `name` and the serving adapter (or base) and make the candidate active if not worse.

    `generator` is a LocalGenerator on the running base; by default the configured base is loaded.
    Raises BedsideError when the candidate scores worse and `force` is False.
    """
    registry = AdapterRegistry(settings.adapters_dir)
    entry = registry.get(name)
    if entry["status"] == "active":
        raise BedsideError(f"adapter {name!r} is already active for {entry['specialty']!r}")
    incumbent = registry.active(entry["specialty"])

    # evaluation set: the candidate's held-out split, minus anything the incumbent trained on
    examples, source = evaluation_examples(registry, entry, incumbent, heldout_file)
    evaluation = {"source": source, "examples": len(examples), "sha256": examples_sha256(examples)}

    # the running base with both adapters loaded
    if generator is None:
        from assistant.answer.generation import LocalGenerator

        spec = models.resolve_model(settings.model)
        model, tokenizer = models.load_base_model(spec, settings.dtype, settings.device)
        generator = LocalGenerator(model, tokenizer, spec.display_name, models.model_fingerprint(spec))
    load_registered_adapter(generator, registry, entry)
    incumbent_route = BASE_ROUTE
    if incumbent is not None:
        try:
            load_registered_adapter(generator, registry, incumbent)
            incumbent_route = incumbent["name"]
        except ModelError as err:
            # an incumbent that cannot load on this base cannot serve either; the candidate may replace it
            logger.warning("active adapter %s cannot be scored on this base (%s); comparing with the base model",
                           incumbent["name"], err)
            evaluation["incumbent_unloadable"] = str(err)

    # score both on identical token rows
    rows = tokenize_examples(generator.tokenizer, examples, max_seq_length(registry, entry), purpose="evaluation")
    # PEFT names each loaded adapter by its slot inside the model
    candidate_slot, incumbent_slot = generator.peft_adapter_names([name, incumbent_route])
    with generator.adapters_active():
        candidate_score = heldout_loss(generator.model, generator.tokenizer, rows, adapter_name=candidate_slot)
        incumbent_score = heldout_loss(generator.model, generator.tokenizer, rows, adapter_name=incumbent_slot)
    if candidate_score is None or incumbent_score is None:
        raise BedsideError("no evaluation example has an answer token within max_seq_length; pass --heldout FILE")
    evaluation["tokens"] = candidate_score["tokens"]
    result = Promotion(name, incumbent_route if incumbent_route != BASE_ROUTE else None, candidate_score,
                       incumbent_score, evaluation, promoted=False, forced=False)

    # decide, recording the evidence either way
    worse = candidate_score["loss"] > incumbent_score["loss"]
    if worse and not force:
        with registry.transaction() as data:
            data["events"].append({"at": now_iso(), "action": "promote-refused", "adapter": name,
                                   "specialty": entry["specialty"], **result.evidence()})
        raise BedsideError(
            f"candidate {name!r} scores held-out loss {candidate_score['loss']:.4f} against "
            f"{incumbent_score['loss']:.4f} for the {result.incumbent or 'base model'} on {len(rows)} examples, "
            "so it was not promoted (both scores are in the registry); pass --force to promote it anyway"
        )
    result.forced = worse
    result.promoted = True
    registry.activate(name, result.evidence())
    logger.info("promoted %s for %s: loss %.4f vs %.4f (%s)", name, entry["specialty"], candidate_score["loss"],
                incumbent_score["loss"], result.incumbent or "base model")
    return result


def resolve_data_path(registry: AdapterRegistry, recorded: str) -> Path | None:
    """Find a recorded training file: as given (absolute or from the working folder), else beside the registry."""
    for path in (Path(recorded), registry.root.parent / recorded):
        if path.is_file():
            return path
    return None


def training_split(registry: AdapterRegistry, entry: dict[str, Any]) -> tuple[list[Example], list[Example]] | None:
    """Recreate an adapter's (train, held-out) split from its recorded file, or None if it changed or is gone."""
    data = entry.get("data", {})
    path = resolve_data_path(registry, data.get("path", ""))
    if path is None or file_sha256(path) != data.get("sha256"):
        return None
    return split_heldout(load_examples(path).examples, float(data.get("eval_fraction", 0.1)))


def evaluation_examples(registry: AdapterRegistry, entry: dict[str, Any], incumbent: dict[str, Any] | None,
                        heldout_file: Path | None) -> tuple[list[Example], str]:
    if heldout_file is not None:
        examples = load_examples(Path(heldout_file)).examples
        source = str(heldout_file)
    else:
        split = training_split(registry, entry)
        if split is None:
            raise BedsideError(
                f"the training data of {entry['name']!r} ({entry.get('data', {}).get('path')!r}) is missing or "
                "changed since training, so its held-out split cannot be rebuilt; pass --heldout FILE.jsonl"
            )
        examples = split[1]
        source = f"held-out split of {entry['data']['path']}"

    # an incumbent scored on its own training examples would look better than it is
    if incumbent is not None:
        incumbent_split = training_split(registry, incumbent)
        if incumbent_split is not None:
            seen = {e.key for e in incumbent_split[0]}
            kept = [e for e in examples if e.key not in seen]
            if len(kept) < len(examples):
                logger.info("left out %d evaluation examples that %s trained on", len(examples) - len(kept),
                            incumbent["name"])
            examples = kept
        else:
            logger.warning("training data of the active adapter %s is unavailable; the evaluation set may include "
                           "examples it trained on", incumbent["name"])
    if not examples:
        raise BedsideError(f"no evaluation examples are left for {entry['name']!r}; pass --heldout FILE.jsonl with "
                           "examples neither adapter trained on")
    return examples, source


def max_seq_length(registry: AdapterRegistry, entry: dict[str, Any]) -> int:
    """Return the candidate's training max_seq_length, so scores match its recorded held-out loss."""
    import json

    record = registry.folder(entry) / TRAINING_RECORD
    try:
        return int(json.loads(record.read_text(encoding="utf-8"))["config"]["max_seq_length"])
    except (OSError, KeyError, ValueError, TypeError):
        return DEFAULT_MAX_SEQ_LENGTH
