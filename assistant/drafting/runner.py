"""The batch runner: read stays → skip unchanged drafts → sort into batches → generate → verify → write.

Outputs go to DIR/<encounter id>.md and DIR/<encounter id>.json, each written atomically, JSON last:
a JSON file with the current input hash marks a finished draft, so a killed run resumes where it
stopped. Records that fail are listed in DIR/errors.jsonl (rewritten atomically as the run goes) and
the run goes on.

Batches are formed from stays sorted by prompt length, so rows of one batch need little padding.
The system turn that opens every prompt is prefilled once and shared by all rows
(`SharedPrefixGenerator`). A batched draft equals the same draft made alone (greedy decoding, fp32).
Generation pads between that prefix and the rest of each prompt, with an attention mask. The
embeddings used for scoring are computed from one stay's texts at a time, so no number depends on
which other stays share the batch. In bfloat16 batched rows can differ from
solo ones in the last bits, which may flip a greedy choice; the dtype and batch size are recorded
in every draft for that reason.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from assistant import __version__
from assistant.answer.generation import GenerationSettings, LocalGenerator
from assistant.answer.pipeline import MIN_SUPPORT
from assistant.answer.prefix_cache import SharedPrefixGenerator
from assistant.answer.prompt import context_limit, count_prompt_tokens
from assistant.config import Settings
from assistant.drafting.assembly import stays_from_fhir
from assistant.drafting.draft import DRAFT_FORMAT, build_draft, render_markdown
from assistant.drafting.fhir import read_fhir
from assistant.drafting.narrative import (
    PROMPT_VERSION,
    FittedNote,
    build_messages,
    clean_output,
    evidence_units,
    fit_notes,
    fitting_flags,
    listed_facts,
    score_sentences,
    shared_prefix,
)
from assistant.drafting.notes import read_notes
from assistant.drafting.recommend import recommend_many
from assistant.drafting.stay import ReadResult, RecordError, Stay
from assistant.errors import BedsideError
from assistant.fileio import atomic_write_json, atomic_write_text, ensure_writable_folder, exclusive_lock
from assistant.safety.injection import find_injections

logger = logging.getLogger(__name__)

DISCHARGE_SPECIALTY = "discharge_summary"
ERRORS_FILE = "errors.jsonl"
# the exit status of `bedside draft-discharge` is the failure count, capped below the shell's reserved codes
MAX_EXIT_STATUS = 125


@dataclass
class DraftOptions:
    """Options of one drafting run; the settings object covers models, index and audit."""

    input_format: str | None = None
    specialty: str | None = None
    limit: int | None = None
    # batch 16 drafted faster than 8 in benchmarks/drafting.py (docs/benchmarks.md)
    batch_size: int = 16
    encounter_ids: list[str] | None = None
    include_emergency: bool = False
    force: bool = False
    log_phi: bool = False
    note_tokens: int = 512
    progress: bool = False
    user: str = "cli"

    def validate(self) -> None:
        if self.input_format not in {None, "fhir", "notes"}:
            raise BedsideError(f"format {self.input_format!r} is invalid; use fhir or notes")
        if self.batch_size < 1:
            raise BedsideError(f"--batch-size {self.batch_size} is invalid; use a whole number of at least 1")
        if self.limit is not None and self.limit < 1:
            raise BedsideError(f"--limit {self.limit} is invalid; use a whole number of at least 1")
        if self.note_tokens < 32:
            raise BedsideError(f"--note-tokens {self.note_tokens} is too small; use at least 32")


@dataclass
class DraftingResources:
    """The heavy objects a run needs, loaded once per process and passed in."""

    generator: LocalGenerator
    embedder: Any
    embedder_name: str
    retriever: Any = None
    router: Any = None
    audit: Any = None


@dataclass
class RunSummary:
    discovered: int = 0
    selected: int = 0
    drafted: int = 0
    skipped: int = 0
    failed: int = 0
    not_ended: int = 0
    seconds: float = 0.0
    generation_seconds: float = 0.0
    generated_tokens: int = 0
    out_dir: str = ""
    errors: list[dict[str, Any]] = field(default_factory=list)

    @property
    def drafts_per_minute(self) -> float:
        return 60.0 * self.drafted / self.seconds if self.seconds else 0.0

    @property
    def tokens_per_second(self) -> float:
        return self.generated_tokens / self.generation_seconds if self.generation_seconds else 0.0

    @property
    def exit_status(self) -> int:
        return min(self.failed, MAX_EXIT_STATUS)

    def line(self) -> str:
        text = (
            f"{self.discovered} stays found, {self.selected} selected: {self.drafted} drafted, "
            f"{self.skipped} unchanged and skipped, {self.failed} failed"
        )
        if self.not_ended:
            text += f", {self.not_ended} not ended yet"
        text += f" in {self.seconds:.1f} s ({self.drafts_per_minute:.1f} drafts/min"
        if self.generated_tokens:
            text += f", {self.tokens_per_second:.1f} generated tokens/s"
        text += f"); drafts in {self.out_dir}"
        if self.failed:
            text += f", failures in {Path(self.out_dir) / ERRORS_FILE}"
        return text


@dataclass
class _Job:
    """One stay on its way to a draft."""

    stay: Stay
    input_hash: str
    fitted: list[FittedNote] = field(default_factory=list)
    messages: list[dict[str, str]] = field(default_factory=list)
    prompt_tokens: int = 0
    note_budget: int = 0
    adapter: dict[str, Any] = field(default_factory=dict)


# reading


def read_stays(input_path: Path, options: DraftOptions) -> ReadResult:
    """Read stays in the requested format (`notes` for a .jsonl file, else FHIR, when not given)."""
    input_path = Path(input_path)
    fmt = options.input_format or ("notes" if input_path.suffix == ".jsonl" else "fhir")
    if fmt == "notes":
        return read_notes(
            input_path,
            include_emergency=options.include_emergency,
            encounter_ids=options.encounter_ids,
            limit=options.limit,
        )
    return stays_from_fhir(
        read_fhir(input_path),
        include_emergency=options.include_emergency,
        encounter_ids=options.encounter_ids,
        limit=options.limit,
    )


# hashing


def draft_config(settings: Settings, options: DraftOptions) -> dict[str, Any]:
    """Return the settings that shape a draft's content; a change in any of them makes drafts stale.

    NOTE: the bedside code version is not among them, so an upgrade alone keeps existing drafts
    (each records the version that wrote it); pass --force to redo them, or bump PROMPT_VERSION or
    DRAFT_FORMAT when a change must invalidate them.
    """
    from assistant import models
    from assistant.indexing import IndexStore

    device = models.choose_device(settings.device)
    registry = Path(settings.adapters_dir) / "registry.json"
    return {
        "draft_format": DRAFT_FORMAT,
        "prompt_version": PROMPT_VERSION,
        "model_fingerprint": models.model_fingerprint(models.resolve_model(settings.model)),
        "embedder_fingerprint": models.embedder_fingerprint(models.resolve_embedder(settings.embedder)),
        "index_version": IndexStore(settings.index_dir).current_version(),
        "dtype": str(models.choose_dtype(settings.dtype, device)).removeprefix("torch."),
        "device": device,
        "generation": GenerationSettings(max_new_tokens=settings.max_new_tokens).to_dict(),
        "note_tokens": options.note_tokens,
        "min_relevance": settings.min_relevance,
        "min_support": MIN_SUPPORT,
        "specialty": options.specialty,
        "adapter_registry_sha256": hashlib.sha256(registry.read_bytes()).hexdigest()
        if registry.is_file()
        else None,
    }


def input_hash(stay: Stay, config: dict[str, Any]) -> str:
    payload = json.dumps(
        {"records": stay.records, "config": config},
        sort_keys=True,
        ensure_ascii=False,
        separators=(",", ":"),
        default=str,
    )
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()


def finished_hash(out_dir: Path, encounter_id: str) -> str | None:
    """Return the input hash of a finished draft in `out_dir`, or None when it is missing or unreadable."""
    json_path, md_path = out_dir / f"{encounter_id}.json", out_dir / f"{encounter_id}.md"
    if not (json_path.is_file() and md_path.is_file()):
        return None
    try:
        return json.loads(json_path.read_text(encoding="utf-8")).get("input_hash")
    except (OSError, ValueError, AttributeError):
        return None


# adapters


def choose_adapters(stays: list[Stay], specialty: str | None, router: Any) -> list[dict[str, Any]]:
    """Pick each stay's adapter: the named specialty's, the router's pick (auto), or the discharge one."""
    base = {"name": None, "specialty": None, "sha256": None}
    if router is None:
        if specialty not in {None, "auto"}:
            raise BedsideError(
                f"--specialty {specialty} needs an adapter registry (adapters/registry.json) and "
                "none was found; train and promote an adapter, or omit --specialty"
            )
        return [{**base, "reason": "no adapter registry; base model"} for _ in stays]
    choices = []
    for stay in stays:
        if specialty is None:
            try:
                choice = router.choose(_routing_text(stay), DISCHARGE_SPECIALTY)
            except BedsideError as err:
                choices.append(
                    {**base, "reason": f"no active {DISCHARGE_SPECIALTY} adapter ({err}); base model"}
                )
                continue
        else:
            choice = router.choose(_routing_text(stay), None if specialty == "auto" else specialty)
        choices.append(
            {
                "name": choice.name,
                "specialty": choice.specialty,
                "sha256": choice.sha256,
                "reason": choice.reason,
            }
        )
    return choices


def check_registered_specialty(specialty: str, adapters_dir: Path) -> None:
    """Raise unless some registered adapter serves `specialty`, so a typo never drafts silently on the base."""
    from assistant.tuning.registry import AdapterRegistry

    known = sorted({entry.get("specialty") for entry in AdapterRegistry(adapters_dir).entries()} - {None})
    if specialty not in known:
        raise BedsideError(
            f"--specialty {specialty!r} has no adapter in {str(adapters_dir)!r}; use one of "
            f"{', '.join(known) or '(none registered)'}, auto, or omit --specialty"
        )


def _routing_text(stay: Stay) -> str:
    return "; ".join(f.text for f in [*stay.reasons, *stay.diagnoses][:12]) or "hospital stay"


# running


class _Embeddings:
    """Unit-length embeddings of one list of texts in one call.

    Padding inside a batch changes the last bits of an embedding, so callers pass only texts of a
    single stay: its vectors then never depend on which other stays share the generation batch.
    """

    # sentence-transformers sorts texts by length and pads each batch to its longest text. A stay's
    # texts run from 8-token facts to 120-token note passages, so one batch of all of them computed
    # mostly padding: batches of 8 embedded a Synthea stay's evidence about 3 times faster than 64.
    batch_size = 8

    def __init__(self, embedder: Any) -> None:
        self.embedder = embedder

    def __call__(self, texts: list[str]) -> np.ndarray:
        return self.embedder.encode(
            texts,
            batch_size=self.batch_size,
            normalize_embeddings=True,
            convert_to_numpy=True,
            show_progress_bar=False,
        ).astype(np.float32)


def run_drafts(
    input_path: Path,
    out_dir: Path,
    options: DraftOptions,
    settings: Settings,
    resources: DraftingResources | Callable[[], DraftingResources],
) -> RunSummary:
    """Draft every selected stay of `input_path` into `out_dir`.

    `resources` may be a loader, called only when some stay needs drafting.
    """
    options.validate()
    if (
        options.specialty not in {None, "auto"}
        and not (Path(settings.adapters_dir) / "registry.json").is_file()
    ):
        raise BedsideError(
            f"--specialty {options.specialty} needs an adapter registry "
            f"({Path(settings.adapters_dir) / 'registry.json'}) and none was found; train and promote "
            "an adapter, or omit --specialty"
        )
    if options.specialty not in {None, "auto"}:
        check_registered_specialty(options.specialty, Path(settings.adapters_dir))
    started = time.perf_counter()
    out_dir = Path(out_dir)
    if Path(input_path).resolve() == out_dir.resolve():
        # drafts are .json files, so a rerun would read them back as FHIR input
        raise BedsideError(
            f"--out {str(out_dir)!r} is the input folder; choose another folder for the drafts"
        )
    ensure_writable_folder(out_dir, "--out")
    with exclusive_lock(out_dir / ".bedside-draft.lock"):
        summary = RunSummary(out_dir=str(out_dir))
        # temp files of atomic writes interrupted by a kill; the lock means no other run owns them
        for stale in out_dir.glob(".*.tmp"):
            stale.unlink(missing_ok=True)

        # read and select
        result = read_stays(input_path, options)
        errors: list[RecordError] = list(result.errors)
        summary.discovered, summary.not_ended = result.discovered, len(result.not_ended)
        summary.selected = len(result.stays) + sum(1 for e in errors if e.encounter_id)
        _write_errors(out_dir, errors)

        # skip drafts whose inputs are unchanged
        config = draft_config(settings, options)
        jobs = []
        for stay in result.stays:
            digest = input_hash(stay, config)
            if not options.force and finished_hash(out_dir, stay.encounter_id) == digest:
                summary.skipped += 1
                continue
            jobs.append(_Job(stay, digest))
        logger.info(
            "%d stays found, %d to draft, %d unchanged", result.discovered, len(jobs), summary.skipped
        )

        if jobs:
            loaded = resources() if callable(resources) else resources
            _draft_jobs(jobs, out_dir, options, settings, config, loaded, errors, summary, started)

        summary.failed = len(errors)
        summary.errors = [e.to_dict() for e in errors]
        summary.seconds = round(time.perf_counter() - started, 2)
        return summary


def _draft_jobs(
    jobs: list[_Job],
    out_dir: Path,
    options: DraftOptions,
    settings: Settings,
    config: dict[str, Any],
    resources: DraftingResources,
    errors: list[RecordError],
    summary: RunSummary,
    started: float,
) -> None:
    from tqdm import tqdm

    generator = resources.generator
    tokenizer = generator.tokenizer
    generation = GenerationSettings(max_new_tokens=settings.max_new_tokens)
    # every prompt opens with the same system turn: prefill it once instead of once per stay
    batcher = SharedPrefixGenerator(generator, shared_prefix())
    embed = _Embeddings(resources.embedder)
    limit = context_limit(generator.model, tokenizer)

    # prompts: fit each stay's notes into what the context leaves after the facts and the answer
    for job in jobs:
        bare = count_prompt_tokens(tokenizer, build_messages(job.stay, []))
        job.note_budget = max(0, min(options.note_tokens, limit - generation.max_new_tokens - bare - 16))
        job.fitted = fit_notes(job.stay.notes, tokenizer, job.note_budget, listed_facts(job.stay))
        job.messages = build_messages(job.stay, job.fitted)
        job.prompt_tokens = count_prompt_tokens(tokenizer, job.messages)
    for job, adapter in zip(
        jobs, choose_adapters([j.stay for j in jobs], options.specialty, resources.router), strict=True
    ):
        job.adapter = adapter

    # batches of similar prompt length limit padding
    jobs.sort(key=lambda j: (j.prompt_tokens, j.stay.encounter_id))
    batches = [jobs[i : i + options.batch_size] for i in range(0, len(jobs), options.batch_size)]
    progress = tqdm(
        total=summary.selected,
        initial=summary.selected - len(jobs),
        unit="stay",
        desc="drafting",
        disable=not options.progress,
        dynamic_ncols=True,
    )
    try:
        for number, batch in enumerate(batches, 1):
            batch_started = time.perf_counter()
            try:
                outputs = batcher.generate_batch(
                    [j.messages for j in batch], [j.adapter["name"] for j in batch], generation
                )
            except (BedsideError, RuntimeError, ValueError) as err:
                logger.error("batch %d of %d failed in generation: %s", number, len(batches), err)
                for job in batch:
                    errors.append(
                        RecordError(
                            reason=f"generation failed: {err}",
                            encounter_id=job.stay.encounter_id,
                            resource=job.stay.encounter_source,
                        )
                    )
                _write_errors(out_dir, errors)
                progress.update(len(batch))
                continue
            generation_s = time.perf_counter() - batch_started
            summary.generation_seconds += generation_s
            tokens = [len(tokenizer(text, add_special_tokens=False)["input_ids"]) for text in outputs]
            summary.generated_tokens += sum(tokens)

            for job, raw, generated in zip(batch, outputs, tokens, strict=True):
                try:
                    _finish(
                        job,
                        raw,
                        generated,
                        len(batch),
                        generation_s,
                        out_dir,
                        options,
                        settings,
                        config,
                        resources,
                        embed,
                        generation,
                    )
                    summary.drafted += 1
                except BedsideError as err:
                    errors.append(
                        RecordError(
                            reason=f"writing the draft failed: {err}",
                            encounter_id=job.stay.encounter_id,
                            resource=job.stay.encounter_source,
                        )
                    )
                    _write_errors(out_dir, errors)
                progress.update(1)
            elapsed = time.perf_counter() - started
            progress.set_postfix_str(f"{60 * summary.drafted / elapsed:.1f} drafts/min")
            logger.info(
                "batch %d of %d: %d stays, longest prompt %d tokens, generated in %.1f s",
                number,
                len(batches),
                len(batch),
                batch[-1].prompt_tokens,
                generation_s,
            )
    finally:
        progress.close()


def _finish(
    job: _Job,
    raw: str,
    generated_tokens: int,
    batch_rows: int,
    generation_s: float,
    out_dir: Path,
    options: DraftOptions,
    settings: Settings,
    config: dict[str, Any],
    resources: DraftingResources,
    embed: _Embeddings,
    generation: GenerationSettings,
) -> None:
    """Verify one generated narrative, assemble the draft, record it in the audit log and write it."""
    stay = job.stay
    step_started = time.perf_counter()
    narrative = score_sentences(clean_output(raw), evidence_units(stay), embed, MIN_SUPPORT)
    recommendations = recommend_many([stay], resources.retriever, settings.min_relevance, embed)[0]

    flags = list(stay.flags) + fitting_flags(job.fitted, job.note_budget)
    if not stay.notes:
        flags.append(
            {"type": "no_notes", "detail": "the stay has no notes; the narrative rests on structured facts"}
        )
    for note in stay.notes:
        for injection in find_injections(note.text):
            flags.append(
                {
                    "type": "injection",
                    "source": note.source,
                    "detail": f"the note contains text aimed at the model ({injection['kind']}); that "
                    "sentence was removed from the prompt",
                }
            )
    flags += narrative.flags + recommendations.flags

    generator = resources.generator
    provenance = {
        "model": generator.model_name,
        "model_fingerprint": generator.model_fingerprint,
        "adapter": job.adapter,
        "index_version": resources.retriever.index.version if resources.retriever else None,
        "embedder": resources.embedder_name,
        "embedder_fingerprint": config["embedder_fingerprint"],
        "dtype": generator.dtype,
        "device": config["device"],
        "batch_size": options.batch_size,
        "batch_rows": batch_rows,
        "generation": generation.to_dict(),
        "prompt_version": PROMPT_VERSION,
        "note_tokens": options.note_tokens,
        "note_budget": job.note_budget,
        "prompt_tokens": job.prompt_tokens,
        "generated_tokens": generated_tokens,
        "min_support": MIN_SUPPORT,
        "min_relevance": settings.min_relevance,
        "bedside_version": __version__,
        "settings": settings.to_dict(),
    }
    draft = build_draft(stay, narrative, job.fitted, recommendations, flags, provenance, job.input_hash)
    draft["created_at"] = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
    markdown = render_markdown(draft, stay)
    timings = {
        "batch_generation_s": round(generation_s, 3),
        "verification_s": round(time.perf_counter() - step_started, 3),
    }
    draft["timings"] = timings

    # The audit row goes first. A crash before the files are written redoes the draft on the next run,
    # so every draft on disk has its audit row.
    if resources.audit is not None:
        draft["audit_id"] = resources.audit.record(
            kind="draft",
            user=options.user,
            question=f"discharge draft for encounter {stay.encounter_id}",
            answer=markdown,
            abstained=False,
            retrieved=[
                {k: c[k] for k in ("chunk_id", "doc_id", "version", "date", "score")}
                for c in draft["citations"]
            ],
            index_version=provenance["index_version"],
            model=generator.model_name,
            model_fingerprint=generator.model_fingerprint,
            adapter=job.adapter,
            backend=generator.backend,
            generation={
                **generation.to_dict(),
                "dtype": generator.dtype,
                "batch_size": options.batch_size,
                "prompt_tokens": job.prompt_tokens,
                "raw_output": raw,
                "input_hash": job.input_hash,
            },
            citations=draft["citations"],
            flags=flags,
            timings=timings,
        )
    atomic_write_text(out_dir / f"{stay.encounter_id}.md", markdown)
    atomic_write_json(out_dir / f"{stay.encounter_id}.json", draft)
    if options.log_phi:
        logger.info("drafted encounter %s: %s", stay.encounter_id, narrative.text)


def _write_errors(out_dir: Path, errors: list[RecordError]) -> None:
    """Rewrite DIR/errors.jsonl with this run's failures (removed when there are none)."""
    path = out_dir / ERRORS_FILE
    if not errors:
        path.unlink(missing_ok=True)
        return
    atomic_write_text(path, "".join(json.dumps(e.to_dict(), ensure_ascii=False) + "\n" for e in errors))


def load_resources(settings: Settings, with_audit: bool = True) -> DraftingResources:
    """Load the base model, embedder, index (when built), router and audit log named by `settings`."""
    from assistant import models
    from assistant.answer.pipeline import embedder_info
    from assistant.errors import IndexStoreError
    from assistant.indexing import IndexStore
    from assistant.retrieval import Retriever

    embedder_path = models.resolve_embedder(settings.embedder)
    embedder = models.load_embedder(embedder_path, settings.device)
    retriever = None
    try:
        index = IndexStore(settings.index_dir).open(embedder_info(settings.embedder, embedder_path, embedder))
        retriever = Retriever(index, embedder)
    except IndexStoreError as err:
        logger.warning("no guideline index (%s); drafts will carry no recommendations", err)

    if settings.backend == "vllm":
        from assistant.answer.vllm_backend import VLLMGenerator

        # only token generation moves to the server; drafts are assembled and checked here
        generator = VLLMGenerator.from_settings(settings)
    else:
        spec = models.resolve_model(settings.model)
        model, tokenizer = models.load_base_model(spec, settings.dtype, settings.device)
        generator = LocalGenerator(model, tokenizer, spec.display_name, models.model_fingerprint(spec))

    router = None
    if (Path(settings.adapters_dir) / "registry.json").is_file():
        try:
            from assistant.tuning.routing import build_router
        except ImportError:
            logger.warning(
                "an adapter registry exists but adapter routing is not installed; drafting with the "
                "base model"
            )
        else:
            router = build_router(settings, generator, embedder)

    audit = None
    if with_audit:
        from assistant.audit import AuditLog

        audit = AuditLog(settings.audit_db, store_text=settings.store_text)
    return DraftingResources(
        generator=generator,
        embedder=embedder,
        embedder_name=settings.embedder or "all-MiniLM-L6-v2 (embedded)",
        retriever=retriever,
        router=router,
        audit=audit,
    )
