"""Retrieval at scale: query latency at 1k, 10k and 100k chunks, FAISS flat vs HNSW, incremental rebuilds.

    python -m benchmarks.retrieval_scale [--quick] [--no-write] [--report-only]

Real corpus: the 1,000 PubMedQA abstracts (every context paragraph, as `bedside eval retrieval`
indexes them). They are indexed with a full rebuild through `IndexStore`. Then 1% of the abstracts
are edited and the index is rebuilt incrementally. Both builds are timed and profiled by stage.

Larger corpora are generated from that real index at benchmark time (see `synthetic_corpus`):
every real chunk, plus perturbed copies of real chunks until the size is reached. Each copy's vector
is the real chunk's embedding moved towards another real chunk's and blurred with Gaussian noise,
then renormalised; its text is the real chunk's text with words dropped, some words taken from that
other chunk, and neighbouring words swapped. Embedding 100k chunks with MiniLM would take hours on
2 cores, so only the real chunks are embedded. Every version is written and opened by the product
(`IndexStore`, with its own flat/HNSW choice by size), and every query goes through `Retriever.search`
with the real embedder: query embedding, BM25, FAISS, fusion and metadata, as in `bedside ask`.

Writes the "retrieval-scale" section of docs/benchmarks.md and records the headline figures.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import random
import shutil
import statistics
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.common import (
    REPO,
    RETRIEVAL_CACHE,
    SHARED_DATA,
    load_average,
    machine,
    record_figure,
    today,
    write_section,
)

logger = logging.getLogger(__name__)

MODULE = "retrieval_scale"
SECTION = "retrieval-scale"
SEED = 20241205
EDIT_SHARE = 0.01
# perturbation of the copies; the report states the cosine to the original that these give
PARTNER_WEIGHT = (0.1, 0.4)
VECTOR_NOISE = 0.5
WORD_DROPOUT = 0.15
WORD_SWAP = 0.1
TARGET_P50_MS = 30.0
TARGET_RECALL = 0.95
TARGET_REBUILD_SHARE = 0.05
WORK_DIR = REPO / ".cache" / "benchmarks" / "retrieval_scale"


@dataclass(frozen=True)
class Plan:
    abstracts: int
    sizes: tuple[int, ...]
    latency_queries: int
    recall_queries: int
    incremental_repeats: int
    dense_sizes: tuple[int, ...]
    scaled_rebuild_sizes: tuple[int, ...]


FULL = Plan(abstracts=1000, sizes=(1_000, 10_000, 100_000), latency_queries=200, recall_queries=500,
            incremental_repeats=3, dense_sizes=(1_000, 10_000, 50_000, 100_000),
            scaled_rebuild_sizes=(1_000, 10_000, 100_000))
QUICK = Plan(abstracts=250, sizes=(1_000, 10_000, 100_000), latency_queries=50, recall_queries=200,
             incremental_repeats=1, dense_sizes=(1_000, 10_000, 100_000), scaled_rebuild_sizes=())


# stage timing: wrap the functions a build or a query calls and add up their time

class Stages:
    """Accumulated seconds per named stage, collected by temporarily wrapping functions."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)

    @contextlib.contextmanager
    def watch(self, targets: list[tuple[Any, str, str]]) -> Iterator[Stages]:
        """Time every call of `getattr(owner, name)` as `stage` while the block runs."""
        originals = []
        for owner, name, stage in targets:
            original = getattr(owner, name)
            originals.append((owner, name, original))
            setattr(owner, name, self._timed(original, stage))
        try:
            yield self
        finally:
            for owner, name, original in reversed(originals):
                setattr(owner, name, original)

    def _timed(self, function: Callable[..., Any], stage: str) -> Callable[..., Any]:
        def timed(*args: Any, **kwargs: Any) -> Any:
            start = time.perf_counter()
            try:
                return function(*args, **kwargs)
            finally:
                self.seconds[stage] += time.perf_counter() - start
        return timed

    def reset(self) -> dict[str, float]:
        taken, self.seconds = dict(self.seconds), defaultdict(float)
        return taken


def build_targets() -> list[tuple[Any, str, str]]:
    """List the functions an index build calls, each with the stage its time counts towards."""
    import faiss

    from assistant.chunking import Chunker
    from assistant.indexing import store

    return [
        (store.IndexStore, "_load", "open previous version (FAISS, BM25)"),
        (store, "_sha256", "checksums (verify previous, manifest of new)"),
        (store.LoadedIndex, "chunks_of_documents", "read reused chunks (SQLite)"),
        (store.LoadedIndex, "vectors_of", "read reused vectors"),
        (Chunker, "chunk_document", "chunking"),
        (store, "embed_texts", "embedding"),
        (store, "build_faiss", "FAISS build"),
        (faiss, "write_index", "FAISS write"),
        (store, "_write_chunks_db", "SQLite write"),
        (store, "bm25_tokenize", "BM25 tokenize"),
        (store, "save_bm25", "BM25 index and save"),
    ]


def query_targets() -> list[tuple[Any, str, str]]:
    """List the functions one `Retriever.search` calls, each with the stage its time counts towards."""
    from assistant import retrieval
    from assistant.indexing.store import LoadedIndex

    return [
        (retrieval, "embed_texts", "embed query"),
        (retrieval.Retriever, "_dense", "FAISS"),
        (retrieval.Retriever, "_lexical", "BM25"),
        (LoadedIndex, "chunks_by_int_id", "SQLite metadata"),
        (retrieval.Retriever, "_boost_headers", "header boosts"),
        (LoadedIndex, "vectors_of", "exact cosines"),
    ]


# the real corpus and its models

@dataclass
class Models:
    embedder: Any
    info: Any
    chunker: Any
    settings: Any


def load_models() -> Models:
    from assistant import models
    from assistant.answer.pipeline import embedder_info
    from assistant.chunking import Chunker
    from assistant.config import Settings

    settings = Settings()
    path = models.resolve_embedder(settings.embedder)
    embedder = models.load_embedder(path, "cpu")
    info = embedder_info(settings.embedder, path, embedder)
    chunker = Chunker(embedder.tokenizer, settings.chunk_tokens, settings.chunk_overlap,
                      embedder.max_seq_length)
    return Models(embedder, info, chunker, settings)


def pubmedqa(abstracts: int) -> tuple[list[Any], list[str]]:
    """Load the first `abstracts` PubMedQA abstracts as documents, and all 1,000 questions."""
    from assistant.evaluation.datasets import load_pubmedqa, pubmedqa_documents

    folder = SHARED_DATA / "pubmedqa"
    if not (folder / "ori_pqal.json").is_file():
        raise SystemExit(f"{folder} has no ori_pqal.json; set BEDSIDE_SHARED_DATA to the shared data folder")
    data = load_pubmedqa(folder)
    pmids = list(data.items)
    return pubmedqa_documents(data, pmids[:abstracts]), [data.items[p].question for p in pmids]


def edited(document: Any, round_number: int) -> Any:
    """Return a copy of the document with one sentence appended to its last section, like a correction."""
    from assistant.corpus.document import Section

    sections = list(document.sections)
    last = sections[-1]
    correction = f" Erratum {round_number}: the sample size was corrected in review."
    sections[-1] = Section(text=last.text + correction, title=last.title, page=last.page)
    return replace(document, sections=sections)


# rebuilds of the real corpus

def measure_rebuilds(documents: list[Any], models: Models, plan: Plan,
                     root: Path) -> tuple[dict[str, Any], tuple[list[str], list[Any], np.ndarray]]:
    """Time a full rebuild of the real corpus, then incremental rebuilds after editing 1% of its documents.

    Also returns the full rebuild's documents, chunks and vectors: the real base of the generated corpora.
    """
    from assistant.indexing import IndexStore

    store = IndexStore(root)
    stages = Stages()
    settings = models.settings.to_dict()
    with stages.watch(build_targets()):
        logger.info("full rebuild of %d documents (embeds every chunk)", len(documents))
        full = store.rebuild(documents, models.chunker, models.embedder, models.info, settings, full=True,
                             progress=True)
        full_stages = stages.reset()
        base = real_base(root)
        share_with_quality(root)
        stages.reset()
        rng = random.Random(SEED)
        incremental, incremental_stages = [], []
        current = list(documents)
        for round_number in range(1, plan.incremental_repeats + 1):
            picks = rng.sample(range(len(current)), max(1, round(len(current) * EDIT_SHARE)))
            for n in picks:
                current[n] = edited(current[n], round_number)
            summary = store.rebuild(current, models.chunker, models.embedder, models.info, settings)
            incremental.append(summary)
            incremental_stages.append(stages.reset())
            logger.info("incremental rebuild %d: %d documents changed, %d chunks embedded, %.1f s",
                        round_number, summary.changed, summary.embedded_chunks, summary.seconds)
    median = statistics.median(s.seconds for s in incremental)
    middle = min(range(len(incremental)), key=lambda n: abs(incremental[n].seconds - median))
    return {"documents": len(documents), "chunks": full.chunks, "full_seconds": full.seconds,
            "full_stages": full_stages, "incremental_seconds": [s.seconds for s in incremental],
            "incremental_median": median, "incremental_stages": incremental_stages[middle],
            "changed": incremental[middle].changed, "embedded": incremental[middle].embedded_chunks,
            "index_type": store.read_manifest()["index_type"]}, base


def share_with_quality(root: Path) -> None:
    """Copy the fresh PubMedQA index to the retrieval_quality module's cache, unless it has one already.

    Both modules index the same abstracts with the default settings, so retrieval_quality, which
    runs later in `make bench`, opens this copy instead of embedding its 3,800 chunks again (about
    70 seconds on two idle cores). It checks document ids, content hashes and chunk settings before
    use, and embeds whatever differs.
    """
    target = RETRIEVAL_CACHE / "pubmedqa"
    if target.exists():
        return
    partial = target.with_name(target.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    shutil.copytree(root, partial)
    # the rename makes the copy appear whole or not at all, even if this run is stopped mid-copy
    partial.rename(target)
    logger.info("copied the PubMedQA index to %s for the retrieval_quality module", target)


# the generated corpora

@dataclass
class Corpus:
    """Chunks, their vectors and the documents they came from, ready to write as one index version."""

    documents: list[Any]
    chunks: list[Any]
    vectors: np.ndarray
    real_chunks: int
    copy_cosines: np.ndarray


def real_base(root: Path) -> tuple[list[Any], list[Any], np.ndarray]:
    """Read the document ids, chunks (in document order) and vectors of the index in `root`."""
    from assistant.indexing import IndexStore

    index = IndexStore(root).open()
    try:
        doc_ids = list(index.manifest["documents"])
        chunks = index.chunks_of_documents(doc_ids)
        vectors = index.vectors_of([c.int_id for c in chunks])
    finally:
        index.close()
    return doc_ids, chunks, vectors


def perturb_words(words: list[str], partner: list[str], weight: float, rng: random.Random) -> list[str]:
    """Drop words, take about `weight` of the rest from `partner`, and swap some neighbours."""
    kept = [w for w in words if rng.random() >= WORD_DROPOUT] or words[:1]
    if partner:
        for n in range(len(kept)):
            if rng.random() < weight:
                kept[n] = rng.choice(partner)
    for n in range(len(kept) - 1):
        if rng.random() < WORD_SWAP:
            kept[n], kept[n + 1] = kept[n + 1], kept[n]
    return kept


def synthetic_corpus(documents: dict[str, Any], chunks: list[Any], vectors: np.ndarray, size: int,
                     seed: int = SEED) -> Corpus:
    """About `size` chunks: real documents first, then perturbed copies of whole real documents.

    Below the real corpus's size, whole real documents are taken in order. Above it, copy k of a
    real document gets the id "<pmid>.c<k>", the title "PubMed <pmid> copy <k>" and one chunk per
    chunk of the original. Each copied chunk is paired with a random chunk of another document
    (its "partner") and a weight w drawn from PARTNER_WEIGHT. Its vector becomes
    normalise((1 - w) * own + w * partner + VECTOR_NOISE * gaussian / sqrt(dimension)). Its text
    drops WORD_DROPOUT of its words, replaces about w of them with partner words, and swaps
    neighbouring words with probability WORD_SWAP. The copies thus sit among real chunks the way
    related abstracts do, instead of as exact duplicates that BM25 and HNSW would treat alike.
    """
    from assistant.chunking import Chunk
    from assistant.corpus.document import Document, Section

    by_doc: dict[str, list[int]] = defaultdict(list)
    for row, chunk in enumerate(chunks):
        by_doc[chunk.doc_id].append(row)
    order = [d for d in documents if d in by_doc]
    picked_docs, rows = [], []
    for doc_id in order:
        if rows and len(rows) + len(by_doc[doc_id]) > size:
            break
        picked_docs.append(documents[doc_id])
        rows += by_doc[doc_id]
    out_chunks = [chunks[r] for r in rows]
    out_vectors = [vectors[rows]]
    real = len(rows)

    rng = random.Random(seed)
    noise = np.random.default_rng(seed)
    dimension = vectors.shape[1]
    words = [c.text.split() for c in chunks]
    cosines = []
    copy = 0
    while len(out_chunks) < size:
        copy += 1
        for doc_id in order:
            if len(out_chunks) >= size:
                break
            own = by_doc[doc_id][: size - len(out_chunks)]
            new_id = f"{doc_id}.c{copy}"
            title = f"PubMed {doc_id} copy {copy}"
            partners = [rng.randrange(len(chunks)) for _ in own]
            partners = [p if chunks[p].doc_id != doc_id else (p + len(by_doc[doc_id])) % len(chunks)
                        for p in partners]
            weights = np.array([rng.uniform(*PARTNER_WEIGHT) for _ in own], dtype=np.float32)[:, None]
            blended = (1 - weights) * vectors[own] + weights * vectors[partners]
            gaussian = noise.standard_normal(blended.shape, dtype=np.float32)
            blended += VECTOR_NOISE * gaussian / np.sqrt(dimension)
            blended /= np.linalg.norm(blended, axis=1, keepdims=True)
            cosines.append(np.einsum("ij,ij->i", blended, vectors[own]))
            sections = []
            for position, (row, partner, weight) in enumerate(zip(own, partners, weights[:, 0], strict=True)):
                source = chunks[row]
                text = " ".join(perturb_words(words[row], words[partner], float(weight), rng))
                sections.append(Section(text=text, title=source.section))
                out_chunks.append(Chunk(chunk_id=f"{new_id}#{position}-c", doc_id=new_id, position=position,
                                        text=text, title=title, source=source.source, section=source.section))
            out_vectors.append(blended.astype(np.float32))
            picked_docs.append(Document(doc_id=new_id, title=title, sections=sections,
                                        source=documents[doc_id].source))
    return Corpus(picked_docs, out_chunks, np.concatenate(out_vectors), real,
                  np.concatenate(cosines) if cosines else np.array([], dtype=np.float32))


def write_corpus(root: Path, corpus: Corpus, models: Models, index_type: str = "auto") -> dict[str, Any]:
    """Write `corpus` as one version through the product's writer, as a rebuild would after embedding.

    `IndexStore.rebuild` chunks and embeds before it writes. Here the chunks and vectors exist
    already, so the benchmark calls the store's own version writer (FAISS by size, BM25, SQLite,
    checksums, manifest) directly.
    """
    from assistant.fileio import exclusive_lock
    from assistant.indexing import IndexStore
    from assistant.indexing.store import BuildSummary

    store = IndexStore(root)
    stages = Stages()
    start = time.perf_counter()
    with stages.watch(build_targets()), exclusive_lock(root / ".lock"):
        root.mkdir(parents=True, exist_ok=True)
        version, building = store._new_build_folder()
        summary = BuildSummary(version="", documents=len(corpus.documents), chunks=len(corpus.chunks),
                               added=len(corpus.documents))
        doc_meta = {d.doc_id: {"content_hash": d.content_hash, "title": d.title, "source": d.source,
                               "date": d.date, "version": d.version, "specialty": d.specialty}
                    for d in corpus.documents}
        store._write_version(version, building, corpus.chunks, corpus.vectors, doc_meta, models.info,
                             models.chunker, models.settings.to_dict(), index_type, summary)
    return {"seconds": time.perf_counter() - start, "stages": stages.reset(),
            "index_type": store.read_manifest()["index_type"]}


# queries

def percentile(values: list[float], share: float) -> float:
    return float(np.percentile(np.array(values), share * 100))


def with_faiss(index: Any, faiss_index: Any) -> Any:
    """Return the loaded version with another FAISS index over the same vectors and ids to search."""
    from assistant.indexing.store import LoadedIndex

    return LoadedIndex(index.folder, index.manifest, faiss_index, index.device, index.bm25, index.bm25_ids)


def other_faiss(index: Any, index_type: str) -> Any:
    """Build a FAISS index of `index_type` over the version's vectors, as the product builds it."""
    import faiss

    from assistant.indexing.backends import build_faiss

    built = build_faiss(np.asarray(index.vectors, dtype=np.float32), index.bm25_ids, index_type)
    if index_type == "hnsw":
        faiss.downcast_index(built.index).hnsw.efSearch = index.manifest.get("hnsw_ef_search", 128)
    return built


def time_interleaved(retrievers: dict[tuple[int, str], Any], queries: list[str], warmup: list[str],
                     top_k: int) -> dict[tuple[int, str], dict[str, Any]]:
    """Time `Retriever.search` one query at a time, as `bedside ask` calls it, for every configuration.

    Each query runs on every configuration before the next query starts, in an order that rotates,
    so a change in the machine's load falls on all configurations alike. The CPU time of the process
    is kept beside the wall time: with one torch and one FAISS thread it is close to what the query
    takes on an idle core, whatever else the machine runs.
    """
    for retriever in retrievers.values():
        for query in warmup:
            retriever.search(query, top_k=top_k)
    keys = list(retrievers)
    latencies: dict[tuple[int, str], list[float]] = {key: [] for key in keys}
    cpu_times: dict[tuple[int, str], list[float]] = {key: [] for key in keys}
    without_embedding: dict[tuple[int, str], list[float]] = {key: [] for key in keys}
    totals: dict[tuple[int, str], dict[str, float]] = {key: defaultdict(float) for key in keys}
    results: dict[tuple[int, str], list[list[str]]] = {key: [] for key in keys}
    stages = Stages()
    with stages.watch(query_targets()):
        for number, query in enumerate(queries):
            turn = number % len(keys)
            for key in keys[turn:] + keys[:turn]:
                stages.reset()
                start, cpu_start = time.perf_counter(), time.process_time()
                hits = retrievers[key].search(query, top_k=top_k)
                elapsed = (time.perf_counter() - start) * 1000
                cpu_times[key].append((time.process_time() - cpu_start) * 1000)
                taken = stages.reset()
                latencies[key].append(elapsed)
                without_embedding[key].append(elapsed - taken.get("embed query", 0.0) * 1000)
                for stage, seconds in taken.items():
                    totals[key][stage] += seconds
                results[key].append([hit.chunk_id for hit in hits])

    timings = {}
    for key in keys:
        per_query = {stage: seconds * 1000 / len(queries) for stage, seconds in totals[key].items()}
        mean = statistics.mean(latencies[key])
        per_query["fusion, ranking, rest"] = mean - sum(per_query.values())
        timings[key] = {"p50": percentile(latencies[key], 0.5), "p95": percentile(latencies[key], 0.95),
                        "p50_without_embedding": percentile(without_embedding[key], 0.5),
                        "p50_cpu": percentile(cpu_times[key], 0.5), "mean": mean,
                        "stages": per_query, "results": results[key]}
        logger.info("%d chunks, %s: p50 %.1f ms, p95 %.1f ms, p50 without the query embedding %.1f ms", *key,
                    timings[key]["p50"], timings[key]["p95"], timings[key]["p50_without_embedding"])
    return timings


def dense_comparison(vectors: np.ndarray, query_vectors: np.ndarray, sizes: tuple[int, ...], ef_search: int,
                     prebuilt: dict[str, tuple[Any, float]]) -> list[dict[str, Any]]:
    """Flat vs HNSW on the first n chunks: build time, search ms/query one at a time, recall@10 vs flat.

    `prebuilt` contains the indexes over all of `vectors` (and their build times), already built for
    the query measurements, so the largest size is not built twice.
    """
    import faiss

    from assistant.indexing.backends import build_faiss

    rows = []
    for size in sizes:
        if size > len(vectors):
            continue
        ids = np.arange(size, dtype=np.int64)
        built = {}
        row: dict[str, Any] = {"size": size}
        for index_type in ("flat", "hnsw"):
            if size == len(vectors):
                built[index_type], row[f"{index_type}_build_s"] = prebuilt[index_type]
            else:
                start = time.perf_counter()
                built[index_type] = build_faiss(vectors[:size], ids, index_type)
                row[f"{index_type}_build_s"] = time.perf_counter() - start
                if index_type == "hnsw":
                    faiss.downcast_index(built[index_type].index).hnsw.efSearch = ef_search
            latencies, found = [], []
            for vector in query_vectors:
                start = time.perf_counter()
                _, top = built[index_type].search(vector[None, :], 10)
                latencies.append((time.perf_counter() - start) * 1000)
                found.append(top[0])
            row[f"{index_type}_ms"] = statistics.median(latencies)
            row[f"{index_type}_top"] = found
        pairs = zip(row.pop("hnsw_top"), row.pop("flat_top"), strict=True)
        row["recall"] = float(np.mean([len(set(hnsw) & set(flat)) / len(flat) for hnsw, flat in pairs]))
        rows.append(row)
        logger.info("dense at %d chunks: flat %.2f ms, HNSW %.2f ms, recall@10 %.3f (HNSW build %.1f s)",
                    size, row["flat_ms"], row["hnsw_ms"], row["recall"], row["hnsw_build_s"])
    return rows


def measure_scale(base: tuple[list[str], list[Any], np.ndarray], work: Path, models: Models,
                  questions: list[str], plan: Plan, embedding_rate: float) -> dict[str, Any]:
    """Write each generated size as a version, then time queries through flat and HNSW on all of them."""
    from assistant.evaluation.datasets import load_pubmedqa, pubmedqa_documents
    from assistant.indexing import IndexStore
    from assistant.retrieval import Retriever

    doc_ids, chunks, vectors = base
    data = load_pubmedqa(SHARED_DATA / "pubmedqa")
    documents = {d.doc_id: d for d in pubmedqa_documents(data, doc_ids)}
    rng = random.Random(SEED)
    shuffled = rng.sample(questions, len(questions))
    warmup = shuffled[:10]
    timed = shuffled[10:10 + plan.latency_queries]
    query_vectors = embed(models, shuffled[:plan.recall_queries])
    top_k = models.settings.top_k

    results: dict[str, Any] = {"real_chunks": len(chunks), "sizes": []}
    retrievers: dict[tuple[int, str], Any] = {}
    opened: dict[int, dict[str, Any]] = {}
    corpora: dict[int, tuple[Path, Corpus, dict[str, Any]]] = {}
    for size in plan.sizes:
        corpus = synthetic_corpus(documents, chunks, vectors, size)
        root = work / f"corpus-{size}"
        logger.info("writing a %d-chunk version (%d real chunks, %d copies)", len(corpus.chunks),
                    corpus.real_chunks, len(corpus.chunks) - corpus.real_chunks)
        written = write_corpus(root, corpus, models)
        row: dict[str, Any] = {
            "size": len(corpus.chunks), "real": corpus.real_chunks, "write": written,
            "index_type": written["index_type"],
            "copy_cosine": float(np.median(corpus.copy_cosines)) if len(corpus.copy_cosines) else None,
        }
        if size in plan.scaled_rebuild_sizes:
            # rebuilt after the queries, which thus search exactly the chunks written here
            corpora[size] = (root, corpus, written)
        del corpus

        start = time.perf_counter()
        index = IndexStore(root).open(models.info)
        row["open_seconds"] = time.perf_counter() - start
        row["disk_mb"] = sum(p.stat().st_size for p in index.folder.rglob("*") if p.is_file()) / 2**20
        other_type = "flat" if row["index_type"] == "hnsw" else "hnsw"
        start = time.perf_counter()
        other = with_faiss(index, other_faiss(index, other_type))
        opened[row["size"]] = {
            row["index_type"]: (index, written["stages"].get("FAISS build", 0.0)),
            other_type: (other, time.perf_counter() - start),
        }
        for index_type, (loaded, _) in opened[row["size"]].items():
            retrievers[(row["size"], index_type)] = Retriever(loaded, models.embedder)
        results["sizes"].append(row)

    timings = time_interleaved(retrievers, timed, warmup, top_k)
    for row in results["sizes"]:
        for index_type in ("flat", "hnsw"):
            row[index_type] = timings[(row["size"], index_type)]
        flat_results, hnsw_results = row["flat"].pop("results"), row["hnsw"].pop("results")
        row["same_hits"] = float(np.mean([len(set(a) & set(b)) / max(len(a), 1)
                                          for a, b in zip(flat_results, hnsw_results, strict=True)]))

    top = opened[results["sizes"][-1]["size"]]
    top_index = top[results["sizes"][-1]["index_type"]][0]
    results["dense"] = dense_comparison(
        np.asarray(top_index.vectors, dtype=np.float32), query_vectors, plan.dense_sizes,
        top_index.manifest.get("hnsw_ef_search", 128),
        {index_type: (loaded.faiss_index, seconds) for index_type, (loaded, seconds) in top.items()})
    for indexes in opened.values():
        for loaded, _ in indexes.values():
            loaded.close()
    for row, size in zip(results["sizes"], plan.sizes, strict=True):
        if size in corpora:
            root, corpus, written = corpora.pop(size)
            row["incremental"] = scaled_incremental(root, corpus, models, written, embedding_rate)
    for size in plan.sizes:
        shutil.rmtree(work / f"corpus-{size}", ignore_errors=True)
    results["copy_vs_neighbour"] = neighbour_cosines(vectors)
    return results


def scaled_incremental(root: Path, corpus: Corpus, models: Models, written: dict[str, Any],
                       embedding_rate: float) -> dict[str, Any]:
    """Time an incremental rebuild of a generated version after editing 1% of its documents.

    A full rebuild at this size would embed every chunk, which the generated corpus exists to
    avoid. Its time is therefore an estimate: the measured write time of this version plus its
    chunk count at the embedding rate of the real full rebuild.
    """
    from assistant.indexing import IndexStore

    rng = random.Random(SEED + 1)
    documents = list(corpus.documents)
    for n in rng.sample(range(len(documents)), max(1, round(len(documents) * EDIT_SHARE))):
        documents[n] = edited(documents[n], 1)
    stages = Stages()
    with stages.watch(build_targets()):
        summary = IndexStore(root).rebuild(documents, models.chunker, models.embedder, models.info,
                                           models.settings.to_dict())
    estimate = written["seconds"] + len(corpus.chunks) / embedding_rate
    logger.info("incremental rebuild at %d chunks: %.1f s (%d chunks embedded); full rebuild estimated "
                "%.0f s", len(corpus.chunks), summary.seconds, summary.embedded_chunks, estimate)
    return {"seconds": summary.seconds, "stages": stages.reset(), "embedded": summary.embedded_chunks,
            "changed": summary.changed, "full_estimate": estimate}


def neighbour_cosines(vectors: np.ndarray) -> float:
    """Return the median cosine between a real chunk and its nearest other real chunk."""
    similarity = vectors @ vectors.T
    np.fill_diagonal(similarity, -1)
    return float(np.median(similarity.max(axis=1)))


def embed(models: Models, texts: list[str]) -> np.ndarray:
    from assistant.indexing.store import embed_texts

    return embed_texts(models.embedder, texts)


# threads

def choose_threads() -> str:
    """Use one thread each for torch and FAISS when the cores are already busy; describe the choice."""
    import faiss
    import torch

    busy = os.getloadavg()[0] >= (os.cpu_count() or 1)
    if busy:
        torch.set_num_threads(1)
        faiss.omp_set_num_threads(1)
    threads = f"{torch.get_num_threads()} torch thread(s)"
    return threads + (", 1 FAISS thread (load average was above the core count at the start)" if busy else "")


# the run

def measure(plan: Plan, quick: bool) -> dict[str, Any]:
    threads = choose_threads()
    load_start = load_average()
    start = time.perf_counter()
    models = load_models()
    documents, questions = pubmedqa(plan.abstracts)
    WORK_DIR.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="scale-", dir=WORK_DIR) as scratch:
        work = Path(scratch)
        rebuilds, base = measure_rebuilds(documents, models, plan, work / "real")
        embedding_rate = rebuilds["chunks"] / rebuilds["full_stages"]["embedding"]
        scale = measure_scale(base, work, models, questions, plan, embedding_rate)
    return {"plan": plan.__dict__, "quick": quick, "threads": threads, "niceness": os.nice(0),
            "rebuilds": rebuilds, "scale": scale,
            "embedding_rate": embedding_rate, "minutes": (time.perf_counter() - start) / 60,
            "load_start": load_start, "load_end": load_average(), "date": today(), "machine": machine()}


def record(figures: dict[str, Any]) -> None:
    rebuilds = figures["rebuilds"]
    record_figure(MODULE,
                  f"incremental rebuild after editing 1% of {rebuilds['documents']:,} PubMedQA abstracts",
                  rebuilds["incremental_median"], "s", reference=rebuilds["full_seconds"],
                  reference_name="full rebuild", target=f"ratio <= {TARGET_REBUILD_SHARE}")
    sizes = figures["scale"]["sizes"]
    for row in sizes:
        chosen = row["index_type"]
        record_figure(MODULE, f"query p50, {row['size']:,} chunks ({chosen}, the product's choice)",
                      row[chosen]["p50"], "ms",
                      target=f"value <= {TARGET_P50_MS:g}" if row is sizes[-1] else None)
    top = sizes[-1]
    record_figure(MODULE, f"query p95, {top['size']:,} chunks ({top['index_type']})",
                  top[top["index_type"]]["p95"], "ms")
    record_figure(MODULE, f"query p50 without query embedding, {top['size']:,} chunks ({top['index_type']})",
                  top[top["index_type"]]["p50_without_embedding"], "ms")
    record_figure(MODULE, f"query p50 CPU time, {top['size']:,} chunks ({top['index_type']})",
                  top[top["index_type"]]["p50_cpu"], "ms",
                  # CPU time adds up every thread's time, so it only approximates latency on one thread
                  note="close to the latency on an idle core"
                  if figures["threads"].startswith("1 torch thread") else "summed over threads")
    dense = [row for row in figures["scale"]["dense"] if row["size"] == top["size"]]
    if dense:
        # a quick run copies each of its fewer real chunks about 4 times as often, and its recall then
        # measures those tight clusters more than HNSW (see RECALL_NOTES)
        copies = (top["size"] - top["real"]) / top["real"]
        record_figure(MODULE, f"HNSW recall@10 vs flat, {top['size']:,} chunks", dense[0]["recall"], "",
                      target=None if figures["quick"] else f"value >= {TARGET_RECALL}",
                      note=f"{copies:.0f} copies per real chunk" if figures["quick"] else "")


def run(quick: bool = False, write: bool = True, report_only: bool = False) -> dict[str, Any]:
    """Measure, record the headline figures, and write the section (the `benchmarks.run` entry point).

    With `report_only`, the section is rendered again from the figures the last run saved.
    """
    from assistant.fileio import atomic_write_text

    saved = WORK_DIR / "results.json"
    if report_only:
        figures = json.loads(saved.read_text(encoding="utf-8"))
    else:
        figures = measure(QUICK if quick else FULL, quick)
        atomic_write_text(saved, json.dumps(figures, indent=1, default=float))
        record(figures)
    markdown = report(figures)
    if write:
        write_section(SECTION, markdown)
    else:
        print(markdown)
    return figures


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.retrieval_scale", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true",
                        help="250 abstracts, fewer queries, no rebuilds of the generated corpora")
    parser.add_argument("--no-write", action="store_true", help="print the section instead of writing it")
    parser.add_argument("--report-only", action="store_true",
                        help="render the section from the figures the last run saved, measuring nothing")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    run(args.quick, write=not args.no_write, report_only=args.report_only)
    return 0


# the report

QUERY_STAGES = ("embed query", "BM25", "FAISS", "SQLite metadata", "header boosts", "exact cosines",
                "fusion, ranking, rest")
BUILD_STAGES = ("open previous version (FAISS, BM25)", "checksums (verify previous, manifest of new)",
                "read reused chunks (SQLite)", "read reused vectors", "chunking", "embedding", "FAISS build",
                "FAISS write", "SQLite write", "BM25 tokenize", "BM25 index and save")


def number(value: float | None, digits: int = 1) -> str:
    if value is None:
        return "—"
    return f"{value:,.0f}" if abs(value) >= 100 else f"{value:.{digits}f}"


def table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(row) + " |" for row in rows]


def growth(first: float | None, last: float | None) -> str:
    return f"{last / first:.1f}×" if first and last is not None else "—"


def build_rows(columns: list[tuple[dict[str, float], float]]) -> list[list[str]]:
    """Stage rows (seconds and share of the build) for builds given as (stages, total seconds)."""
    def cell(seconds: float, total: float) -> str:
        return f"{seconds:.2f} s ({seconds / total:.0%})" if total else "—"

    rows = [[stage] + [cell(stages.get(stage, 0.0), total) for stages, total in columns]
            for stage in BUILD_STAGES if any(stages.get(stage) for stages, _ in columns)]
    rest = [total - sum(stages.get(stage, 0.0) for stage in BUILD_STAGES) for stages, total in columns]
    rows.append(["other (locks, manifest, renames, pruning, bookkeeping)"]
                + [cell(seconds, total) for seconds, (_, total) in zip(rest, columns, strict=True)])
    return rows + [["**total**"] + [f"**{total:.2f} s**" for _, total in columns]]


def report(figures: dict[str, Any]) -> str:
    """Render the "Retrieval at scale" section of docs/benchmarks.md."""
    command = "python -m benchmarks.retrieval_scale" + (" --quick" if figures["quick"] else "")
    lines = [
        "## Retrieval at scale",
        "",
        f"`{command}` on {figures['date']}: {figures['machine']}; {figures['threads']}"
        + (f", niceness {figures['niceness']}" if figures.get("niceness") else "") + ". Load average "
        f"{figures['load_start']} at the start and {figures['load_end']} at the end (other jobs shared the "
        "cores, so compare the columns of one run rather than absolute times). The run took "
        f"{figures['minutes']:.1f} min."
        + (" Quick run: fewer abstracts and queries, and no rebuilds of the generated corpora."
           if figures["quick"] else ""),
    ]
    lines += corpus_lines(figures)
    lines += latency_lines(figures)
    lines += dense_lines(figures)
    lines += rebuild_lines(figures)
    lines += growth_lines(figures)
    return "\n".join(lines)


def corpus_lines(figures: dict[str, Any]) -> list[str]:
    rebuilds, scale = figures["rebuilds"], figures["scale"]
    return [
        "",
        "### Corpora and queries",
        "",
        f"The real corpus is the first {rebuilds['documents']:,} PubMedQA abstracts (Jin et al., 2019, MIT "
        "licence), every context paragraph indexed with the default chunking: "
        f"{rebuilds['chunks']:,} chunks. The larger corpora are generated from it when the benchmark runs, "
        "because embedding 100k chunks with all-MiniLM-L6-v2 would take hours on 2 cores. A corpus below the "
        "real size takes whole real abstracts in order. Above it, the corpus holds every real chunk plus "
        "copies of whole real abstracts until the size is reached. Each copied chunk is paired with a random "
        f"chunk of another abstract and a weight w drawn from {PARTNER_WEIGHT[0]}–{PARTNER_WEIGHT[1]}. Its "
        f"vector is normalise((1 − w) · own + w · partner + {VECTOR_NOISE} · g / √384) with g "
        "standard Gaussian, so copies stay near the real embeddings instead of filling space at random. Its "
        f"text drops {WORD_DROPOUT:.0%} of the words, replaces about w of the rest with words of the "
        f"partner, and swaps neighbouring words with probability {WORD_SWAP}, so BM25 sees new term "
        "statistics. Copies get their own document ids and titles. The median cosine between a copied chunk "
        f"and its original is {number(scale['sizes'][-1]['copy_cosine'], 2)}; between a real chunk and its "
        f"nearest other real chunk it is {number(scale['copy_vs_neighbour'], 2)}.",
        "",
        "Each corpus is written as one index version by the product's own writer (`IndexStore`: FAISS type "
        "chosen by size, BM25, SQLite metadata, checksums, manifest), then opened and verified. Queries are "
        "PubMedQA questions, shuffled with a fixed seed: 10 warm-up queries, then "
        f"{figures['plan']['latency_queries']} timed ones, each alone through `Retriever.search(top_k=5)` in "
        "hybrid mode with its defaults, as `bedside ask` calls it: query embedding, BM25, FAISS, weighted "
        "fusion, header boosts and metadata. For the other FAISS type, the same version is searched through "
        "an index of that type built in memory from the version's vectors.",
    ]


def latency_lines(figures: dict[str, Any]) -> list[str]:
    sizes = figures["scale"]["sizes"]
    chosen = [row[row["index_type"]] for row in sizes]
    top, p50 = sizes[-1], chosen[-1]["p50"]
    single_threaded = figures["threads"].startswith("1 torch thread")
    lines = ["", "### Query latency", "",
             "All six configurations were timed in one interleaved loop: each query ran on every corpus and "
             "FAISS type before the next query started, so changes in the machine's load fall on all of "
             "them alike. `without query embedding` is the per-query time minus the query embedding, the "
             "part that depends on the corpus. `CPU` is this process's CPU time per query, summed over its "
             "threads." + (" With one torch thread and one FAISS thread, as here, it approximates the "
                           "latency on an idle core, while the wall-clock columns include the time the "
                           "process waited for a core on the shared machine." if single_threaded else ""), ""]
    rows = []
    for row in sizes:
        for index_type in ("flat", "hnsw"):
            timing = row[index_type]
            label = index_type + (" (product's choice)" if index_type == row["index_type"] else "")
            rows.append([f"{row['size']:,} ({row['real']:,} + {row['size'] - row['real']:,})", label,
                         f"{number(timing['p50'])} ms", f"{number(timing['p95'])} ms",
                         f"{number(timing['p50_cpu'])} ms", f"{number(timing['p50_without_embedding'])} ms",
                         "—" if index_type == "flat" else f"{row['same_hits']:.3f}"])
    lines += table(["chunks (real + copies)", "FAISS type", "p50", "p95", "p50 CPU",
                    "p50 without query embedding", "share of flat's top 5"], rows)
    cpu, mean = chosen[-1]["p50_cpu"], chosen[-1]["mean"]
    embedding = chosen[-1]["stages"].get("embed query", 0.0)
    verdict = f"met. Its CPU time per query was {number(cpu)} ms (p50)."
    if p50 > TARGET_P50_MS:
        verdict = (f"missed by {p50 - TARGET_P50_MS:.1f} ms ({p50 / TARGET_P50_MS:.2f}× the target). The "
                   f"query embedding takes {number(embedding)} ms of the {number(mean)} ms mean "
                   f"(stage table below). The CPU time per query was {number(cpu)} ms (p50)"
                   + (", within the target, so the miss is time spent waiting for a core on the shared "
                      "machine." if cpu <= TARGET_P50_MS else "."))
    lines += ["", f"Target: p50 ≤ {TARGET_P50_MS:g} ms at {top['size']:,} chunks with the product's choice "
                  f"({top['index_type']}): **{number(p50)} ms**, {verdict}", "",
              "Mean time per query by stage (product's FAISS type; `fusion, ranking, rest` is the measured "
              "total minus the timed stages):", ""]
    lines += table(["stage"] + [f"{row['size']:,} chunks ({row['index_type']})" for row in sizes],
                   [[stage] + [f"{number(c['stages'].get(stage, 0.0), 2)} ms" for c in chosen]
                    for stage in QUERY_STAGES]
                   + [["**mean total**"] + [f"**{number(c['mean'], 2)} ms**" for c in chosen]])
    lines += ["", QUERY_NOTES, "", "Each version as written and opened by `IndexStore` (the write excludes "
              "embedding; open includes verifying every file's checksum):", ""]
    lines += table(["chunks", "FAISS type", "write", "open", "on disk"],
                   [[f"{row['size']:,}", row["index_type"], f"{number(row['write']['seconds'])} s",
                     f"{row['open_seconds']:.2f} s", f"{number(row['disk_mb'])} MB"] for row in sizes])
    return lines


def dense_lines(figures: dict[str, Any]) -> list[str]:
    from assistant.indexing.backends import FLAT_MAX_CHUNKS, HNSW_EF_SEARCH, HNSW_M

    dense, top = figures["scale"]["dense"], figures["scale"]["sizes"][-1]
    lines = ["", "### Dense search alone: flat vs HNSW", "",
             f"FAISS search alone, one query vector at a time ({figures['plan']['recall_queries']} PubMedQA "
             f"questions), over the first n chunks of the {top['size']:,}-chunk corpus. Recall@10 is the "
             f"share of flat's (exact) top 10 that HNSW returns. HNSW uses the product's settings "
             f"(M={HNSW_M}, efConstruction=80, efSearch={HNSW_EF_SEARCH}).", ""]
    lines += table(["chunks", "flat ms/query", "HNSW ms/query", "HNSW recall@10", "flat build", "HNSW build"],
                   [[f"{row['size']:,}", f"{row['flat_ms']:.2f}", f"{row['hnsw_ms']:.2f}",
                     f"{row['recall']:.3f}", f"{row['flat_build_s']:.2f} s", f"{row['hnsw_build_s']:.1f} s"]
                    for row in dense])
    dense_top = next((row for row in dense if row["size"] == top["size"]), None)
    if dense_top:
        verdict = "met" if dense_top["recall"] >= TARGET_RECALL else "missed"
        copies = (top["size"] - top["real"]) / top["real"]
        lines += ["", f"Target: HNSW recall@10 ≥ {TARGET_RECALL} at {top['size']:,} chunks: "
                      f"**{dense_top['recall']:.3f}**, {verdict}, with {copies:.0f} copies per real chunk. "
                      + RECALL_NOTES]
    at_threshold = next((row for row in dense if row["size"] == FLAT_MAX_CHUNKS), None)
    return lines + ["", threshold_text(FLAT_MAX_CHUNKS, at_threshold, dense_top)]


def threshold_text(threshold: int, at_threshold: dict[str, Any] | None, top: dict[str, Any] | None) -> str:
    """Write the paragraph on the flat/HNSW threshold, with the figures measured at it and at the top."""
    text = (f"The product keeps a flat index up to {threshold:,} chunks and builds HNSW above "
            "(`FLAT_MAX_CHUNKS` in `assistant/indexing/backends.py`). Every manifest records the type it "
            "chose (`index_type`), the setting (`index_type_setting`) and the threshold (`flat_max_chunks`). "
            "Flat search is exact and costs nothing to build, so an incremental rebuild stays cheap. HNSW "
            "answers in a fraction of a millisecond at any of these sizes, but its build time is paid again "
            "on every rebuild, because FAISS cannot remove vectors from an HNSW graph.")
    if at_threshold:
        share = at_threshold["flat_ms"] / TARGET_P50_MS
        text += (f" At {threshold:,} chunks, flat search took {at_threshold['flat_ms']:.2f} ms per query "
                 f"({share:.0%} of the {TARGET_P50_MS:g} ms query budget) and an HNSW build took "
                 f"{at_threshold['hnsw_build_s']:.0f} s.")
    if top:
        text += (f" At {top['size']:,} chunks, flat took {top['flat_ms']:.2f} ms per query and the HNSW "
                 f"build {top['hnsw_build_s']:.0f} s.")
    return text + THRESHOLD_NOTES


def rebuild_lines(figures: dict[str, Any]) -> list[str]:
    rebuilds = figures["rebuilds"]
    share = rebuilds["incremental_median"] / rebuilds["full_seconds"]
    runs = ", ".join(f"{seconds:.1f} s" for seconds in rebuilds["incremental_seconds"])
    lines = ["", "### Incremental rebuild", "",
             "The real corpus was indexed with a full rebuild (`IndexStore.rebuild(full=True)`, embedding "
             f"every chunk). Then {rebuilds['changed']} of its {rebuilds['documents']:,} abstracts (1%) had "
             "a sentence appended and the index was rebuilt incrementally, "
             f"{len(rebuilds['incremental_seconds'])} times with other abstracts each time ({runs}).", ""]
    lines += table(["corpus", "full rebuild", "incremental (median)", "ratio", "target", "met?"],
                   [[f"{rebuilds['documents']:,} abstracts, {rebuilds['chunks']:,} chunks",
                     f"{rebuilds['full_seconds']:.1f} s", f"{rebuilds['incremental_median']:.2f} s",
                     f"{share:.2%}", f"≤ {TARGET_REBUILD_SHARE:.0%}",
                     "yes" if share <= TARGET_REBUILD_SHARE else "**no**"]])
    lines += ["", "Where the time goes (the incremental column is the median run):", ""]
    lines += table(["stage", "full rebuild", "incremental"],
                   build_rows([(rebuilds["full_stages"], rebuilds["full_seconds"]),
                               (rebuilds["incremental_stages"], rebuilds["incremental_median"])]))
    scaled = [row for row in figures["scale"]["sizes"] if row.get("incremental")]
    if scaled:
        lines += ["", "The same edit on the generated corpora: 1% of their documents edited, then one "
                  "incremental rebuild through `IndexStore.rebuild`, which re-chunks and embeds the edited "
                  "documents with the real embedder. A full rebuild at these sizes would embed every chunk, "
                  "which the generated corpora exist to avoid, so its time is an **estimate**: the measured "
                  "write time of the version plus its chunks at the embedding rate of the real full rebuild "
                  f"({figures['embedding_rate']:.1f} chunks/s).", ""]
        lines += table(["chunks", "documents edited", "chunks embedded", "incremental", "full (estimate)",
                        "ratio"],
                       [[f"{row['size']:,}", f"{row['incremental']['changed']:,}",
                         f"{row['incremental']['embedded']:,}", f"{row['incremental']['seconds']:.1f} s",
                         f"{row['incremental']['full_estimate']:,.0f} s",
                         f"{row['incremental']['seconds'] / row['incremental']['full_estimate']:.2%}"]
                        for row in scaled])
        lines += ["", "Incremental rebuilds of the generated corpora by stage:", ""]
        lines += table(["stage"] + [f"{row['size']:,} chunks" for row in scaled],
                       build_rows([(row["incremental"]["stages"], row["incremental"]["seconds"])
                                   for row in scaled]))
    return lines + ["", REBUILD_NOTES]


def growth_lines(figures: dict[str, Any]) -> list[str]:
    sizes = figures["scale"]["sizes"]
    chosen = [row[row["index_type"]] for row in sizes]
    first, top = sizes[0], sizes[-1]

    def row(name: str, cells: list[str], values: list[float | None]) -> list[str]:
        return [name, *cells, growth(values[0], values[-1])]

    rows = [
        row("query p50, product's type", [f"{number(c['p50'])} ms" for c in chosen],
            [c["p50"] for c in chosen]),
        row("query p95, product's type", [f"{number(c['p95'])} ms" for c in chosen],
            [c["p95"] for c in chosen]),
        row("query p50 CPU time, product's type", [f"{number(c['p50_cpu'])} ms" for c in chosen],
            [c["p50_cpu"] for c in chosen]),
        row("query p50 without query embedding, product's type",
            [f"{number(c['p50_without_embedding'])} ms" for c in chosen],
            [c["p50_without_embedding"] for c in chosen]),
        row("query p50, flat", [f"{number(r['flat']['p50'])} ms" for r in sizes],
            [r["flat"]["p50"] for r in sizes]),
        row("query p50 without query embedding, flat",
            [f"{number(r['flat']['p50_without_embedding'])} ms" for r in sizes],
            [r["flat"]["p50_without_embedding"] for r in sizes]),
        row("BM25 stage", [f"{number(c['stages'].get('BM25'), 2)} ms" for c in chosen],
            [c["stages"].get("BM25") for c in chosen]),
        row("FAISS stage, product's type", [f"{number(c['stages'].get('FAISS'), 2)} ms" for c in chosen],
            [c["stages"].get("FAISS") for c in chosen]),
        row("write a version (no embedding)", [f"{number(r['write']['seconds'])} s" for r in sizes],
            [r["write"]["seconds"] for r in sizes]),
        row("open and verify a version", [f"{r['open_seconds']:.2f} s" for r in sizes],
            [r["open_seconds"] for r in sizes]),
        row("index on disk", [f"{number(r['disk_mb'])} MB" for r in sizes], [r["disk_mb"] for r in sizes]),
    ]
    if all(r.get("incremental") for r in sizes):
        rows.append(row("incremental rebuild, 1% edited",
                        [f"{r['incremental']['seconds']:.1f} s" for r in sizes],
                        [r["incremental"]["seconds"] for r in sizes]))
    lines = ["", "### Growth with corpus size", "",
             "Each figure at the three sizes, and its growth from the smallest to the largest corpus "
             f"({top['size'] / first['size']:.0f}× the chunks):", ""]
    lines += table(["figure", *[f"{r['size']:,} chunks" for r in sizes], "largest ÷ smallest"], rows)
    return lines + ["", GROWTH_NOTES]


RECALL_NOTES = (
    "Recall on generated data depends on how tightly the copies cluster. While this benchmark was written, "
    "100k chunks made from all 3,597 real chunks (28 copies each) gave recall@10 0.9990, 0.9997, 0.9997 and "
    "1.0000 at efSearch 64, 128, 256 and 512. Made from only 912 real chunks (110 copies each, as in a quick "
    "run), they gave 0.81, 0.88, 0.91 and 0.93: a hundred near-copies of one chunk leave nearly tied "
    "neighbours that the graph does not link well, and a larger efSearch recovers little of it (300 PubMedQA "
    "questions, one thread, load average about 8)."
)
THRESHOLD_NOTES = (
    " Flat search reads every vector from memory, so other jobs' memory traffic slows it: two runs on the "
    "loaded development machine measured 2.4 and 6.2 ms at 50,000 chunks. The threshold sits where flat's "
    "per-query cost stops being small beside the query embedding (about 21 ms here). Moving it lower would "
    "add an HNSW build to every rebuild of a mid-sized corpus, and moving it higher would let flat search "
    "take a growing share of the query budget."
)
QUERY_NOTES = (
    "Embedding the query (all-MiniLM-L6-v2, one short question) is the largest stage at every size and does "
    "not depend on the corpus. BM25 scores every chunk that shares a term with the query, so it grows with "
    "the corpus. It selects its candidates among the chunks that score above zero (`bm25_search` in "
    "`assistant/indexing/lexical.py`). The previous code called bm25s's `retrieve`, which partitions the "
    "whole score array, mostly zeros: at 100k chunks that took 15.9 ms per query against 0.23 ms now, with "
    "the same scores (200 PubMedQA questions, one thread, load average about 6, measured while this "
    "benchmark was written). Flat FAISS reads every vector, so its time grows linearly with the corpus, "
    "while HNSW visits a few hundred vectors at any of these sizes. The SQLite reads and the header boosts "
    "handle only the fused candidates (at most 100 from each method), so they barely grow."
)
REBUILD_NOTES = (
    "A full rebuild is almost all embedding. An incremental rebuild embeds only the edited documents' "
    "chunks, and then handles every chunk once more: it verifies the previous version's checksums, reads the "
    "reused chunks and vectors, tokenizes and indexes all chunks for BM25 (its statistics change with any "
    "edit), writes SQLite and builds FAISS. Those steps grow with the corpus. Below the flat threshold they "
    "stay small beside the embedding of the edited chunks. Above it, the HNSW build is the largest of them, "
    "since the graph is rebuilt from every vector. Reusing the BM25 tokens of unchanged chunks would save "
    "the `BM25 tokenize` share shown above."
)
GROWTH_NOTES = (
    "Query latency grows far slower than the corpus, because the query embedding, which does not depend on "
    "the corpus, dominates it. The part that does depend on it (the latency without the query embedding) "
    "grows with the chunks BM25 scores and, with a flat index, with the dense scan; the product's switch to "
    "HNSW above the threshold keeps the dense search nearly constant. The index on disk grows linearly with "
    "the chunks. Writing a version grows faster than linearly past the threshold, because the HNSW build "
    "costs more per vector as the graph grows. The incremental rebuild follows the embedding of the edited "
    "chunks plus that write."
)


if __name__ == "__main__":
    raise SystemExit(main())
