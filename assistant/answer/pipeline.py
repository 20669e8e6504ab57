"""The `ask` pipeline: retrieve → relevance gate → prompt → generate → verify citations → record."""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from assistant.answer.citations import Citation, SentenceCheck, verify_citations
from assistant.answer.generation import GenerationSettings, LocalGenerator
from assistant.answer.prompt import context_limit, fit_prompt
from assistant.config import Settings
from assistant.retrieval import Hit, Retriever, passes_relevance_gate, validate_query
from assistant.safety.injection import find_injections, neutralize_injections

logger = logging.getLogger(__name__)

ABSTENTION = (
    "The indexed guidelines do not cover this question, so bedside gives no answer. "
    "Check the primary literature or ask a specialist."
)
NO_ROOM_FOR_SOURCES = (
    "The question leaves no room for a guideline source in the model's context, so bedside gives no "
    "answer. Shorten the question and ask again."
)
# A sentence counts as supported by a chunk at this cosine similarity (all-MiniLM-L6-v2); measured
# on the demo corpus, where sentences restating a chunk score 0.5-0.8 and unrelated ones below 0.3.
MIN_SUPPORT = 0.45


@dataclass
class AdapterChoice:
    """The adapter a request runs under; `name` None is the bare base model."""

    name: str | None = None
    specialty: str | None = None
    sha256: str | None = None
    reason: str = "no adapter"


@dataclass
class Answer:
    question: str
    answer: str
    abstained: bool
    citations: list[Citation]
    flags: list[dict[str, Any]]
    dropped_chunks: list[str]
    model: str
    model_fingerprint: str
    adapter: dict[str, Any]
    index_version: str
    timings: dict[str, float]
    retrieved: list[Hit] = field(default_factory=list)
    sentences: list[SentenceCheck] = field(default_factory=list)
    generation: dict[str, Any] = field(default_factory=dict)
    backend: str = "local"
    specialty: str | None = None

    def to_dict(self) -> dict[str, Any]:
        """The `bedside ask --json` shape."""
        return {
            "question": self.question,
            "answer": self.answer,
            "abstained": self.abstained,
            "citations": [c.to_dict() for c in self.citations],
            "flags": self.flags,
            "dropped_chunks": self.dropped_chunks,
            "model": self.model,
            "model_fingerprint": self.model_fingerprint,
            "adapter": self.adapter,
            "index_version": self.index_version,
            "timings": self.timings,
            "backend": self.backend,
            "specialty": self.specialty,
            "generation": self.generation,
            "retrieved": [{"chunk_id": h.chunk_id, "doc_id": h.doc_id, "version": h.version, "date": h.date,
                           "score": h.score, "dense_score": h.dense_score} for h in self.retrieved],
            "sentences": [asdict(s) for s in self.sentences],
        }


@dataclass
class AnswerEvent:
    """A streamed piece: `kind` is "token" (text holds new text) or "answer" (answer holds the result)."""

    kind: str
    text: str = ""
    answer: Answer | None = None


class Assistant:
    """Everything one process needs to answer: index, retriever, embedder, generator, router, audit."""

    def __init__(self, settings: Settings, retriever: Retriever, generator: LocalGenerator,
                 router: Any = None, audit: Any = None) -> None:
        self.settings = settings
        self.retriever = retriever
        self.generator = generator
        self.router = router
        self.audit = audit
        self.generation = GenerationSettings(max_new_tokens=settings.max_new_tokens)

    @property
    def index_version(self) -> str:
        return self.retriever.index.version

    def ask(self, question: str, specialty: str | None = None, user: str = "cli", **kwargs: Any) -> Answer:
        answer = None
        for event in self.ask_stream(question, specialty=specialty, user=user, **kwargs):
            if event.kind == "answer":
                answer = event.answer
        assert answer is not None
        return answer

    def ask_stream(self, question: str, specialty: str | None = None, user: str = "cli",
                   top_k: int | None = None, since: str | None = None, history: list[dict] | None = None,
                   context_tokens: int = 0) -> Iterator[AnswerEvent]:
        timings: dict[str, float] = {}
        started = time.perf_counter()
        question = validate_query(question)

        # route: the adapter follows the specialty; with none, the router picks one or the base
        choice = self.router.choose(question, specialty) if self.router else AdapterChoice()

        # retrieve
        t = time.perf_counter()
        hits = self.retriever.search(question, top_k=top_k or self.settings.top_k, since=since)
        timings["retrieval_s"] = round(time.perf_counter() - t, 4)
        flags: list[dict[str, Any]] = []

        # relevance gate: abstain rather than generate from unrelated text
        if not passes_relevance_gate(hits, self.settings.min_relevance):
            best = max((h.dense_score for h in hits), default=0.0)
            flags.append({"type": "abstained", "detail": f"best chunk similarity {best:.2f} is below the "
                                                         f"relevance gate {self.settings.min_relevance:.2f}"})
            yield from self._abstain(question, ABSTENTION, flags, [], choice, timings, started, hits,
                                     specialty, user)
            return

        # prompt: fenced numbered sources, fitted to the context window. Sentences that give the model
        # orders are taken out of the prompt's copy of each source; citations keep the original text.
        model, tokenizer = self.generator.model, self.generator.tokenizer
        limit = context_tokens or context_limit(model, tokenizer)
        originals = {hit.chunk_id: hit for hit in hits}
        fenced = [dataclasses.replace(hit, text=neutralize_injections(hit.text)) for hit in hits]
        # history holds earlier turns of this clinician's own session only
        prompt = fit_prompt(question, fenced, tokenizer, limit, self.generation.max_new_tokens,
                            history=history)
        prompt.hits = [originals[hit.chunk_id] for hit in prompt.hits]
        prompt.dropped = [originals[hit.chunk_id] for hit in prompt.dropped]
        for number, hit in enumerate(prompt.hits, 1):
            for injection in find_injections(hit.text):
                flags.append({"type": "injection", "marker": number, "chunk_id": hit.chunk_id,
                              "detail": f"source [{number}] contains an instruction aimed at the model "
                                        f"({injection['kind']}: {injection['match']!r}); it was removed from "
                                        "the prompt and the source was used as data only"})
        for hit in prompt.dropped:
            flags.append({"type": "dropped_chunk", "chunk_id": hit.chunk_id,
                          "detail": "lowest-ranked chunk left out to fit the model's context"})
        if not prompt.hits:
            # without a source the model would answer from memory, with nothing to verify against
            detail = (f"no retrieved source fits the model's {limit}-token context beside the question "
                      f"({prompt.prompt_tokens} tokens without sources); shorten the question")
            flags.append({"type": "abstained", "detail": detail})
            dropped = [hit.chunk_id for hit in prompt.dropped]
            yield from self._abstain(question, NO_ROOM_FOR_SOURCES, flags, dropped, choice, timings, started,
                                     hits, specialty, user)
            return

        # generate, streaming text as it comes
        t = time.perf_counter()
        pieces: list[str] = []
        first_token_at = None
        for piece in self.generator.stream(prompt.messages, adapter=choice.name, settings=self.generation):
            if first_token_at is None:
                first_token_at = time.perf_counter()
                timings["time_to_first_token_s"] = round(first_token_at - started, 4)
            pieces.append(piece)
            yield AnswerEvent("token", piece)
        timings["generation_s"] = round(time.perf_counter() - t, 4)
        raw = "".join(pieces).strip()

        # verify: markers must resolve; each sentence needs a supporting source
        t = time.perf_counter()
        checked = verify_citations(raw, prompt.hits, self.retriever.embedder, MIN_SUPPORT)
        timings["verification_s"] = round(time.perf_counter() - t, 4)
        timings["total_s"] = round(time.perf_counter() - started, 4)
        answer = self._answer(question, checked.text or raw, False, checked.citations, flags + checked.flags,
                              [h.chunk_id for h in prompt.dropped], choice, timings, prompt.hits,
                              checked.sentences, specialty)
        answer.generation["raw_output"] = raw
        answer.generation["prompt_tokens"] = prompt.prompt_tokens

        # record
        self._record(answer, user)
        yield AnswerEvent("answer", answer=answer)

    def _abstain(self, question: str, text: str, flags: list[dict[str, Any]], dropped: list[str],
                 choice: AdapterChoice, timings: dict[str, float], started: float, hits: list[Hit],
                 specialty: str | None, user: str) -> Iterator[AnswerEvent]:
        """Yield and record an abstention; nothing is generated."""
        yield AnswerEvent("token", text)
        timings["total_s"] = round(time.perf_counter() - started, 4)
        answer = self._answer(question, text, True, [], flags, dropped, choice, timings, hits, [], specialty)
        self._record(answer, user)
        yield AnswerEvent("answer", answer=answer)

    def _answer(self, question: str, text: str, abstained: bool, citations: list[Citation],
                flags: list[dict[str, Any]], dropped: list[str], choice: AdapterChoice, timings: dict[str, float],
                hits: list[Hit], sentences: list[SentenceCheck], specialty: str | None) -> Answer:
        return Answer(
            question=question, answer=text, abstained=abstained, citations=citations, flags=flags,
            dropped_chunks=dropped, model=self.generator.model_name,
            model_fingerprint=self.generator.model_fingerprint,
            adapter={"name": choice.name, "specialty": choice.specialty, "sha256": choice.sha256,
                     "reason": choice.reason},
            index_version=self.index_version, timings=timings, retrieved=hits, sentences=sentences,
            generation={**self.generation.to_dict(), "dtype": self.generator.dtype},
            backend=self.generator.backend, specialty=specialty or choice.specialty,
        )

    def _record(self, answer: Answer, user: str) -> None:
        if self.audit is not None:
            self.audit.record_answer(answer, user=user)


def question_hash(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def build_assistant(settings: Settings, with_audit: bool = True) -> Assistant:
    """Load the index, embedder, base model, adapters and audit log named by `settings`."""
    from assistant import models
    from assistant.indexing.store import IndexStore

    embedder_name = models.resolve_embedder(settings.embedder)
    embedder = models.load_embedder(embedder_name, settings.device)
    index = IndexStore(settings.index_dir).open(embedder_info(settings.embedder, embedder_name, embedder))
    retriever = Retriever(index, embedder)

    if settings.backend == "vllm":
        from assistant.answer.vllm_backend import VLLMGenerator

        # only token generation moves to the server; everything below stays in this process
        generator = VLLMGenerator.from_settings(settings)
    else:
        spec = models.resolve_model(settings.model)
        model, tokenizer = models.load_base_model(spec, settings.dtype, settings.device)
        generator = LocalGenerator(model, tokenizer, spec.display_name, models.model_fingerprint(spec))

    router = None
    registry_file = Path(settings.adapters_dir) / "registry.json"
    if registry_file.is_file():
        from assistant.tuning.routing import build_router

        router = build_router(settings, generator, embedder)

    audit = None
    if with_audit:
        from assistant.audit import AuditLog

        audit = AuditLog(settings.audit_db, store_text=settings.store_text)
    return Assistant(settings, retriever, generator, router=router, audit=audit)


def embedder_info(setting: str, path: str, embedder: Any) -> Any:
    """Describe the configured embedder for the manifest check: its setting, fingerprint and shape."""
    from assistant import models
    from assistant.indexing.store import EmbedderInfo

    dimension = embedder.get_embedding_dimension() if hasattr(embedder, "get_embedding_dimension") \
        else embedder.get_sentence_embedding_dimension()
    return EmbedderInfo(name=setting or "all-MiniLM-L6-v2 (embedded)",
                        fingerprint=models.embedder_fingerprint(path), dimension=int(dimension),
                        max_seq_length=int(embedder.max_seq_length))
