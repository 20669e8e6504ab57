"""Retrieval quality on PubMedQA and MedQuAD: recall@1/5/10 of dense, BM25 and hybrid search.

    python -m benchmarks.retrieval_quality [--quick | --medquad-if-cached] [--sweep] [--ci-cost]
                                           [--report-only] [--no-write]

PubMedQA (Jin et al., 2019): every context paragraph of the 1,000 expert-labelled abstracts is
indexed, one document per PubMed id, and each abstract's question is the query.
MedQuAD (Ben Abacha and Demner-Fushman, 2019): every answer is its own document (titled by its
focus, sectioned by its question type), and the queries are the questions of 500 pairs drawn with
a fixed seed. A query is found at k when any of its gold documents owns one of the first k chunks
(gold: the pair's own answer, plus any answer with identical text).

Indexes are real bedside index versions built with the default settings and kept under
`.cache/benchmarks/`, so a second run re-embeds nothing. `--sweep` also measures the fusion
alternatives behind the `Retriever` defaults. The figures replace the "Retrieval quality" section
of docs/benchmarks.md unless `--no-write` is given.
"""

from __future__ import annotations

import argparse
import json
import logging
import random
import sys
import time
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from assistant.corpus.document import Document
from assistant.fileio import atomic_write_json
from benchmarks.common import REPO, RETRIEVAL_CACHE, SHARED_DATA, load_average, machine, today, write_section

logger = logging.getLogger(__name__)

PUBMEDQA_DIR = SHARED_DATA / "pubmedqa"
MEDQUAD_DIR = SHARED_DATA / "medquad"
CACHE_DIR = RETRIEVAL_CACHE
MEDQUAD_SAMPLE = 500
MEDQUAD_SEED = 20240517
KS = (1, 5, 10)
# chunks read for the document-level recall; 10 distinct documents fit unless long answers fill them
DOCUMENT_DEPTH = 50
MODES = ("dense", "bm25", "hybrid")
# the CI tests' share of the sets: questions asked, and MedQuAD answers drawn beyond the hard ones
CI_QUESTIONS = 200
CI_RANDOM_DISTRACTORS = 300
# quick runs without a cached full MedQuAD index: a smaller subset drawn the same way, so the run
# embeds about 2,000 MedQuAD chunks instead of the CI subset's 4,000 or the full set's 15,700
QUICK_QUESTIONS = 100
QUICK_RANDOM_DISTRACTORS = 150
# the names of the recall tables, also the keys of the saved figures
PUBMEDQA_ALL = "PubMedQA, all 1,000 questions"
MEDQUAD_ALL = f"MedQuAD, {MEDQUAD_SAMPLE} sampled questions"
MEDQUAD_CI = f"MedQuAD CI subset, first {CI_QUESTIONS} sampled questions (the CI test)"
MEDQUAD_QUICK = f"MedQuAD quick subset, first {QUICK_QUESTIONS} sampled questions"


@dataclass
class RetrievalSet:
    """Documents to index, the queries, and per query the document ids that count as found."""

    name: str
    documents: list[Document]
    queries: list[str]
    gold: list[set[str]]

    def head(self, count: int) -> RetrievalSet:
        """The same documents with only the first `count` queries."""
        return RetrievalSet(self.name, self.documents, self.queries[:count], self.gold[:count])


# data sets

def pubmedqa_set(folder: Path = PUBMEDQA_DIR) -> RetrievalSet:
    """All 1,000 abstracts as documents (one section per paragraph); queries in file order."""
    from assistant.evaluation.datasets import load_pubmedqa, pubmedqa_documents

    data = load_pubmedqa(folder)
    pmids = list(data.items)
    return RetrievalSet("PubMedQA", pubmedqa_documents(data, pmids), [data.items[p].question for p in pmids],
                        [{p} for p in pmids])


def medquad_documents(folder: Path = MEDQUAD_DIR) -> list[Document]:
    """Every answered MedQuAD pair, one document each, in doc_id order (the licence files are skipped)."""
    from assistant.corpus import load_corpus

    report = load_corpus([folder])
    return sorted((d for d in report.documents if d.metadata.get("question")), key=lambda d: d.doc_id)


def medquad_set(documents: list[Document], sample: int = MEDQUAD_SAMPLE, seed: int = MEDQUAD_SEED,
                queries: int | None = None, random_distractors: int | None = None) -> RetrievalSet:
    """Queries from `sample` pairs drawn with `seed`; all documents, or a subset keeping the hard ones.

    `queries` keeps only the first that many of the drawn pairs, so a smaller set asks a subset of
    the full set's questions. With `random_distractors`, the documents are the drawn answers, every
    answer sharing a focus with a drawn pair (the near-duplicates that make MedQuAD hard), every
    answer with the same text as a gold answer, and that many other answers drawn with `seed` + 1.
    """
    ordered = sorted(documents, key=lambda d: d.doc_id)
    picked = random.Random(seed).sample(ordered, sample)[:queries]
    same_text: dict[str, set[str]] = defaultdict(set)
    for document in ordered:
        same_text[document.text].add(document.doc_id)
    gold = [same_text[d.text] for d in picked]
    queries = [d.metadata["question"] for d in picked]
    if random_distractors is None:
        return RetrievalSet("MedQuAD", ordered, queries, gold)

    foci = {d.title.casefold() for d in picked}
    keep = {d.doc_id for d in ordered if d.title.casefold() in foci}.union(*gold)
    others = [d for d in ordered if d.doc_id not in keep]
    drawn = random.Random(seed + 1).sample(others, min(random_distractors, len(others)))
    keep |= {d.doc_id for d in drawn}
    return RetrievalSet("MedQuAD subset", [d for d in ordered if d.doc_id in keep], queries, gold)


# indexing and scoring

def index_is_current(root: Path, documents: list[Document], chunk_tokens: int | None = None) -> bool:
    """Test whether `root` serves an index of exactly `documents` (ids, content hashes) and chunk settings."""
    from assistant.config import Settings
    from assistant.errors import IndexStoreError
    from assistant.indexing import IndexStore

    try:
        manifest = IndexStore(root).read_manifest()
    except IndexStoreError:
        return False
    settings = Settings()
    chunking = manifest.get("chunking", {})
    indexed = {doc_id: entry.get("content_hash") for doc_id, entry in manifest.get("documents", {}).items()}
    return (indexed == {d.doc_id: d.content_hash for d in documents}
            and chunking.get("chunk_tokens") == (chunk_tokens or settings.chunk_tokens)
            and chunking.get("chunk_overlap") == settings.chunk_overlap)


def build_retrieval_index(documents: list[Document], root: Path, chunk_tokens: int | None = None,
                          progress: bool = False) -> Any:
    """Open the index of `documents` in `root`, building it (incrementally) unless it is current.

    An unchanged index is opened as is: a rebuild would embed nothing but still rewrite BM25 and
    FAISS, which takes about a minute for MedQuAD.
    """
    from assistant import models
    from assistant.answer.pipeline import embedder_info
    from assistant.chunking import Chunker
    from assistant.config import Settings
    from assistant.errors import IndexStoreError
    from assistant.indexing import IndexStore

    settings = Settings(index_dir=root)
    if chunk_tokens is not None:
        settings.chunk_tokens = chunk_tokens
    path = models.resolve_embedder(settings.embedder)
    embedder = models.load_embedder(path, "cpu")
    info = embedder_info(settings.embedder, path, embedder)
    if index_is_current(root, documents, settings.chunk_tokens):
        try:
            return IndexStore(root).open(info)
        except IndexStoreError as err:
            logger.info("cached index in %s not usable (%s); rebuilding", root, err)
    chunker = Chunker(embedder.tokenizer, settings.chunk_tokens, settings.chunk_overlap,
                      embedder.max_seq_length)
    IndexStore(root).rebuild(documents, chunker, embedder, info, settings.to_dict(), progress=progress)
    return IndexStore(root).open(info)


def recall_at_k(results: Sequence[Sequence[Any]], gold: Sequence[set[str]],
                ks: Sequence[int] = KS) -> dict[int, float]:
    """Share of queries with a gold document among the first k hits, for each k."""
    found = {k: 0 for k in ks}
    for hits, expected in zip(results, gold, strict=True):
        doc_ids = [h.doc_id for h in hits]
        for k in ks:
            found[k] += bool(expected.intersection(doc_ids[:k]))
    return {k: found[k] / len(gold) for k in ks}


def first_chunk_per_document(hits: Sequence[Any]) -> list[Any]:
    """The hits with every later chunk of an already listed document removed."""
    seen: set[str] = set()
    kept = []
    for hit in hits:
        if hit.doc_id not in seen:
            seen.add(hit.doc_id)
            kept.append(hit)
    return kept


def evaluate(retriever: Any, data: RetrievalSet, modes: Sequence[str] = MODES) -> dict[str, dict[str, float]]:
    """Recall of each search mode on `data`, counted over chunks and over distinct documents.

    `R@k` counts the first k chunks as returned. `doc R@k` counts the first k distinct documents
    among the first DOCUMENT_DEPTH chunks of the same ranking.
    """
    scores = {}
    for mode in modes:
        start = time.perf_counter()
        results = retriever.search_many(data.queries, top_k=DOCUMENT_DEPTH, mode=mode)
        by_chunk = recall_at_k(results, data.gold)
        by_document = recall_at_k([first_chunk_per_document(hits) for hits in results], data.gold, (5, 10))
        scores[mode] = {**{f"R@{k}": v for k, v in by_chunk.items()},
                        **{f"doc R@{k}": v for k, v in by_document.items()}}
        logger.info("%s %s: %s (%.1f s)", data.name, mode, scores[mode], time.perf_counter() - start)
    return scores


def subset_of_index(full: Path, root: Path, documents: list[Document]) -> Any:
    """Index `documents` in `root`, starting from a copy of the index in `full` so nothing is re-embedded.

    The incremental rebuild drops the documents missing from `documents` and rebuilds BM25 over
    the rest, so chunks, vectors and BM25 statistics are those of an index of `documents` alone.
    """
    import shutil

    if not root.exists():
        shutil.copytree(full, root)
    return build_retrieval_index(documents, root)


# relevance gate

GATE_CANDIDATES = (0.35, 0.40, 0.45, 0.50)


def best_cosines(retriever: Any, queries: list[str], top_k: int) -> list[float]:
    """Best-chunk cosine of each query over its `top_k` hybrid hits, the value the relevance gate tests."""
    return [max((h.dense_score for h in hits), default=0.0)
            for hits in retriever.search_many(queries, top_k=top_k)]


def demo_gate(cache_dir: Path) -> list[tuple[dict[str, Any], float]]:
    """Each demo question with the best-chunk cosine it gets from the demo corpus index."""
    import json

    from assistant import models
    from assistant.config import Settings
    from assistant.corpus import load_corpus
    from assistant.retrieval import Retriever

    questions = [json.loads(line) for line in (REPO / "corpora" / "questions" / "demo_questions.jsonl")
                 .read_text(encoding="utf-8").splitlines() if line.strip()]
    index = build_retrieval_index(load_corpus([REPO / "corpora" / "demo"]).documents, cache_dir / "demo")
    embedder = models.load_embedder(models.resolve_embedder(""), "cpu")
    scores = best_cosines(Retriever(index, embedder), [q["question"] for q in questions], Settings().top_k)
    return list(zip(questions, scores, strict=True))


# CI cost: what chunk size and batch size do to embedding work

def chunking_cost(documents: list[Document],
                  chunk_sizes: Sequence[int] = (200, 254)) -> dict[int, tuple[int, int]]:
    """Chunks and embedder tokens (header included) that `documents` make at each chunk size."""
    from assistant import models
    from assistant.chunking import Chunker

    embedder = models.load_embedder(models.resolve_embedder(""), "cpu")
    cost = {}
    for size in chunk_sizes:
        chunker = Chunker(embedder.tokenizer, size, 32, embedder.max_seq_length)
        chunks = [c for d in documents for c in chunker.chunk_document(d)]
        tokens = sum(len(embedder.tokenizer.tokenize(c.embedding_text)) for c in chunks)
        cost[size] = (len(chunks), tokens)
        logger.info("chunk size %d: %d chunks, %d tokens", size, len(chunks), tokens)
    return cost


def embedding_throughput(texts: list[str], batch_sizes: Sequence[int] = (8, 32, 128)) -> dict[int, float]:
    """Texts embedded per CPU second at each batch size.

    CPU time of this process, not wall time, so other work on a shared machine counts less.
    """
    from assistant import models
    from assistant.indexing.store import embed_texts

    embedder = models.load_embedder(models.resolve_embedder(""), "cpu")
    embed_texts(embedder, texts[:32])
    rates = {}
    for batch_size in batch_sizes:
        start = time.process_time()
        embed_texts(embedder, texts, batch_size=batch_size)
        rates[batch_size] = len(texts) / (time.process_time() - start)
        logger.info("batch size %d: %.1f texts per CPU second", batch_size, rates[batch_size])
    return rates


# the fusion alternatives measured with --sweep; each row is a set of Retriever keyword arguments
SWEEP: list[dict[str, Any]] = (
    [{"fusion": "rrf", "rrf_k": k, "title_boost": 0.0, "section_boost": 0.0} for k in (5, 20, 60)]
    + [{"dense_weight": w, "title_boost": 0.0, "section_boost": 0.0} for w in (0.5, 0.6, 0.7, 0.8, 0.9)]
    + [{"title_boost": t, "section_boost": s} for t, s in ((0.3, 0.0), (0.0, 0.4), (0.1, 0.1), (0.2, 0.2),
                                                            (0.3, 0.3), (0.3, 0.6))]
    + [{"dense_weight": w} for w in (0.5, 0.7, 0.8)]
    + [{"candidates": c} for c in (20, 50, 200)]
)


class QueryMemo:
    """An embedder wrapper that embeds each distinct text once, so sweep variants share query vectors."""

    def __init__(self, embedder: Any) -> None:
        self.embedder = embedder
        self.vectors: dict[str, Any] = {}

    def encode(self, texts: list[str], **kwargs: Any) -> Any:
        import numpy as np

        missing = [t for t in dict.fromkeys(texts) if t not in self.vectors]
        if missing:
            self.vectors.update(zip(missing, self.embedder.encode(missing, **kwargs), strict=True))
        return np.stack([self.vectors[t] for t in texts])


def sweep(index: Any, embedder: Any, data: RetrievalSet) -> list[tuple[dict[str, Any], dict[str, float]]]:
    """Hybrid recall for each variant in SWEEP (the other arguments keep their defaults)."""
    from assistant.retrieval import Retriever

    memo = QueryMemo(embedder)
    rows = []
    for variant in SWEEP:
        results = Retriever(index, memo, **variant).search_many(data.queries, top_k=max(KS))
        recall = recall_at_k(results, data.gold)
        rows.append((variant, {f"R@{k}": v for k, v in recall.items()}))
        logger.info("%s %s: %s", data.name, variant, rows[-1][1])
    return rows


# report

def recall_table(scores: dict[str, dict[str, float]]) -> str:
    columns = list(next(iter(scores.values())))
    lines = ["| method | " + " | ".join(columns) + " |", "|---|" + "---|" * len(columns)]
    for mode, values in scores.items():
        lines.append(f"| {mode} | " + " | ".join(f"{values[c]:.3f}" for c in columns) + " |")
    return "\n".join(lines)


def sweep_table(rows: list[tuple[dict[str, Any], dict[str, float], dict[str, float]]]) -> str:
    lines = ["| hybrid variant | PubMedQA R@1 | R@5 | R@10 | MedQuAD R@1 | R@5 | R@10 |",
             "|---|---|---|---|---|---|---|"]
    for variant, pubmedqa, medquad in rows:
        label = ", ".join(f"{k}={v}" for k, v in variant.items())
        cells = [f"{scores[f'R@{k}']:.3f}" for scores in (pubmedqa, medquad) for k in KS]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def gate_table(demo: list[tuple[dict[str, Any], float]], real_sets: dict[str, list[float]]) -> str:
    def share_below(scores: list[float], gate: float) -> str:
        return f"{sum(s < gate for s in scores) / len(scores):.1%}"

    groups = {
        "demo, in corpus": [s for q, s in demo if q["in_corpus"]],
        "demo, out of corpus, medical": [s for q, s in demo
                                         if not q["in_corpus"] and q["question"] in MEDICAL_OUT],
        "demo, out of corpus, not medical": [s for q, s in demo
                                             if not q["in_corpus"] and q["question"] not in MEDICAL_OUT],
        **real_sets,
    }
    gates = " | ".join(f"< {g:.2f}" for g in GATE_CANDIDATES)
    lines = ["| questions | n | min | median | max | " + gates + " |",
             "|---|---|---|---|---|" + "---|" * len(GATE_CANDIDATES)]
    for name, scores in groups.items():
        ordered = sorted(scores)
        shares = " | ".join(share_below(scores, g) for g in GATE_CANDIDATES)
        lines.append(f"| {name} | {len(scores)} | {ordered[0]:.3f} | {ordered[len(ordered) // 2]:.3f} | "
                     f"{ordered[-1]:.3f} | {shares} |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.retrieval_quality", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    medquad_scope = parser.add_mutually_exclusive_group()
    medquad_scope.add_argument("--quick", action="store_true",
                       help="evaluate full MedQuAD only when its index is cached, else a smaller subset")
    medquad_scope.add_argument("--medquad-if-cached", action="store_true",
                       help="evaluate full MedQuAD only when its index is cached, else the CI subset "
                            "(what `make bench` runs, because embedding the full set takes about 6 minutes)")
    parser.add_argument("--sweep", action="store_true", help="also measure the fusion alternatives")
    parser.add_argument("--ci-cost", action="store_true",
                        help="also measure chunk counts, tokens and embedding rate by batch size on MedQuAD")
    parser.add_argument("--report-only", action="store_true",
                        help="rewrite the section from the figures the last run saved, measuring nothing")
    parser.add_argument("--no-write", action="store_true", help="print the section instead of writing it")
    parser.add_argument("--cache-dir", type=Path, default=CACHE_DIR, help="folder for the benchmark indexes")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")

    saved = args.cache_dir / "results.json"
    if args.report_only:
        figures = json.loads(saved.read_text(encoding="utf-8"))
    else:
        medquad_mode = "full"
        if args.quick:
            medquad_mode = "quick"
        elif args.medquad_if_cached:
            medquad_mode = "cached"
        figures = measure(args.cache_dir, args.sweep, args.ci_cost, medquad_mode)
        # --no-write changes where the section goes, not what is measured
        arguments = [a for a in (argv if argv is not None else sys.argv[1:]) if a != "--no-write"]
        figures["command"] = " ".join(["python -m benchmarks.retrieval_quality", *arguments])
        figures["date"], figures["machine"], figures["load_average"] = today(), machine(), load_average()
        atomic_write_json(saved, figures)

    markdown = report(figures)
    if args.no_write:
        print(markdown)
    else:
        write_section("retrieval-quality", markdown)
        print("wrote the retrieval-quality section of docs/benchmarks.md")
    return 0


def measure(cache_dir: Path, with_sweep: bool, with_ci_cost: bool, medquad_mode: str = "full") -> dict[str, Any]:
    """Build (or reuse) the indexes and take every figure the report shows.

    `medquad_mode` "full" indexes every MedQuAD answer (about 15,700 chunks, 6 minutes to embed on
    two idle cores) and copies the CI subset from that index. "cached" and "quick" evaluate the full
    set and the CI subset only when a previous run left the full MedQuAD index in `cache_dir`.
    Otherwise "cached" embeds the CI subset on its own (about 4,000 chunks) and "quick" the smaller
    quick subset. The sweep and the CI cost need the full MedQuAD index.
    """
    if medquad_mode not in ("full", "cached", "quick"):
        raise ValueError(f"medquad_mode {medquad_mode!r} is not one of 'full', 'cached', 'quick'")
    from assistant import models
    from assistant.config import Settings
    from assistant.retrieval import Retriever

    # indexes, built once and then reused from the cache folder
    embedder = models.load_embedder(models.resolve_embedder(""), "cpu")
    start = time.perf_counter()
    pubmedqa = pubmedqa_set()
    pubmedqa_index = build_retrieval_index(pubmedqa.documents, cache_dir / "pubmedqa", progress=True)
    documents = medquad_documents()
    medquad = medquad_set(documents)
    medquad_index = None
    if medquad_mode == "full" or index_is_current(cache_dir / "medquad", medquad.documents):
        medquad_index = build_retrieval_index(medquad.documents, cache_dir / "medquad", progress=True)
        subset_name, subset_root = MEDQUAD_CI, cache_dir / "medquad-ci-subset"
        subset = medquad_set(documents, queries=CI_QUESTIONS, random_distractors=CI_RANDOM_DISTRACTORS)
        subset_index = subset_of_index(cache_dir / "medquad", subset_root, subset.documents)
    elif medquad_mode == "cached":
        subset_name, subset_root = MEDQUAD_CI, cache_dir / "medquad-ci-subset"
        subset = medquad_set(documents, queries=CI_QUESTIONS, random_distractors=CI_RANDOM_DISTRACTORS)
        subset_index = build_retrieval_index(subset.documents, subset_root, progress=True)
    else:
        subset_name, subset_root = MEDQUAD_QUICK, cache_dir / "medquad-quick-subset"
        subset = medquad_set(documents, queries=QUICK_QUESTIONS, random_distractors=QUICK_RANDOM_DISTRACTORS)
        subset_index = build_retrieval_index(subset.documents, subset_root, progress=True)
    figures: dict[str, Any] = {
        "retriever_defaults": retriever_defaults(),
        "top_k": Settings().top_k,
        "min_relevance": Settings().min_relevance,
        "build_minutes": (time.perf_counter() - start) / 60,
        "sizes": {"PubMedQA": [len(pubmedqa.documents), pubmedqa_index.size],
                  subset_name: [len(subset.documents), subset_index.size]},
    }
    if medquad_index is not None:
        figures["sizes"]["MedQuAD"] = [len(medquad.documents), medquad_index.size]

    # recall of the default retriever
    pubmedqa_retriever = Retriever(pubmedqa_index, embedder)
    subset_retriever = Retriever(subset_index, embedder)
    figures["recall"] = {
        PUBMEDQA_ALL: evaluate(pubmedqa_retriever, pubmedqa),
        f"PubMedQA, first {CI_QUESTIONS} questions (the CI test)": evaluate(pubmedqa_retriever,
                                                                          pubmedqa.head(CI_QUESTIONS)),
    }
    if medquad_index is not None:
        figures["recall"][MEDQUAD_ALL] = evaluate(Retriever(medquad_index, embedder), medquad)
    figures["recall"][subset_name] = evaluate(subset_retriever, subset)

    # relevance gate
    top_k = Settings().top_k
    figures["demo_gate"] = demo_gate(cache_dir)
    real_gate = {"PubMedQA, all (in corpus)": best_cosines(pubmedqa_retriever, pubmedqa.queries, top_k)}
    if medquad_index is not None:
        medquad_retriever = Retriever(medquad_index, embedder)
        real_gate["MedQuAD, sampled (in corpus)"] = best_cosines(medquad_retriever, medquad.queries, top_k)
    else:
        real_gate[f"{subset_name.split(',')[0]} (in corpus)"] = best_cosines(subset_retriever, subset.queries,
                                                                            top_k)
    figures["real_gate"] = real_gate

    if with_sweep and medquad_index is not None:
        pubmedqa_rows = sweep(pubmedqa_index, embedder, pubmedqa)
        medquad_rows = sweep(medquad_index, embedder, medquad)
        figures["sweep"] = [(v, p, m) for (v, p), (_, m) in zip(pubmedqa_rows, medquad_rows, strict=True)]
    if with_ci_cost and medquad_index is not None:
        # every 30th chunk: about 520 texts spread over all MedQuAD sources and lengths
        rows = medquad_index.chunks_by_int_id(medquad_index.bm25_ids[::30].tolist())
        sample = [chunk.embedding_text for chunk in rows.values()]
        figures["ci_cost"] = {"chunking": chunking_cost(medquad.documents),
                              "rates": embedding_throughput(sample), "sample": len(sample)}
    return figures


MEDICAL_OUT = {
    "What topical treatment is first line for mild acne vulgaris?",
    "Which eye drops are first line for primary open-angle glaucoma?",
}


def report(figures: dict[str, Any]) -> str:
    """The "Retrieval quality" section of docs/benchmarks.md: setup, tables and what they show."""
    sizes = figures["sizes"]
    defaults = ", ".join(f"`{name}={value}`" for name, value in figures["retriever_defaults"].items())
    if "MedQuAD" in sizes:
        medquad = (f"MedQuAD: all {sizes['MedQuAD'][0]:,} answered pairs, each answer its own document "
                   "titled by its focus and sectioned by its question type, "
                   f"{sizes['MedQuAD'][1]:,} chunks. ")
        subset_name, questions, distractors = MEDQUAD_CI, CI_QUESTIONS, CI_RANDOM_DISTRACTORS
    elif MEDQUAD_CI in sizes:
        medquad = ("MedQuAD: this run found no cached index of the full set, so it indexed only the CI subset, "
                   "with each answer its own document titled by its focus and sectioned by its question type. "
                   "`make bench` skips the full set on a first run because embedding its 15,700 chunks takes "
                   "about 6 more minutes, which the 30-minute suite cannot spare. "
                   "`python -m benchmarks.retrieval_quality --sweep --ci-cost` indexes it once, and every later "
                   "`make bench` then evaluates it from the cache, with the fusion sweep and the CI cost. ")
        subset_name, questions, distractors = MEDQUAD_CI, CI_QUESTIONS, CI_RANDOM_DISTRACTORS
    else:
        medquad = ("MedQuAD: this quick run had no cached index of the full set, so it indexed only the "
                   "quick subset, with each answer its own document titled by its focus and sectioned by its "
                   "question type. ")
        subset_name, questions, distractors = MEDQUAD_QUICK, QUICK_QUESTIONS, QUICK_RANDOM_DISTRACTORS
    subset = sizes[subset_name]
    # the CI subset is copied from the full MedQuAD index when there is one; otherwise, like the quick
    # subset, it was embedded on its own
    embedded = sizes["PubMedQA"][1] + (sizes["MedQuAD"][1] if "MedQuAD" in sizes else subset[1])
    parts = [
        "## Retrieval quality",
        "",
        f"`{figures['command']}` on {figures['date']}: {figures['machine']}. Load average "
        f"{figures['load_average']} at the end. Building the indexes, or opening those a previous run "
        f"cached, took {_duration(figures['build_minutes'])}. A first run embeds every chunk listed below: "
        f"an estimated {embedded / EMBED_RATE / 60:.0f} min at "
        f"{EMBED_RATE} chunks per second, longer beside other jobs.",
        "",
        "Data: PubMedQA (Jin et al., 2019, MIT licence) and MedQuAD (Ben Abacha and Demner-Fushman, 2019, "
        f"CC BY 4.0). PubMedQA: {sizes['PubMedQA'][0]:,} abstracts with every context paragraph indexed, "
        f"{sizes['PubMedQA'][1]:,} chunks. {medquad}Both use the default chunking (200 tokens, 32 overlap). "
        f"The MedQuAD questions are {MEDQUAD_SAMPLE} pairs drawn by `random.Random({MEDQUAD_SEED}).sample` "
        "from the answers sorted by document id. Gold is the pair's own answer or any answer with the same "
        f"text. The {subset_name.split(',')[0]} keeps the first {questions} of those questions and indexes "
        f"{subset[0]:,} answers ({subset[1]:,} chunks): the drawn answers, every answer sharing a focus with "
        f"one of them (the near-duplicates), every answer with a gold answer's text, and {distractors} "
        "others drawn with the seed + 1.",
        "",
        "`R@k` counts a question as found when a gold document owns one of the first k chunks returned, "
        "which is what `bedside search --top-k k` shows. `doc R@k` reads the same ranking by distinct "
        f"documents: the first k documents among the first {DOCUMENT_DEPTH} chunks.",
        "",
        f"Default hybrid search, `Retriever` defaults {defaults}:",
    ]
    for name, scores in figures["recall"].items():
        parts += ["", f"**{name}**", "", recall_table(scores)]
    parts += ["", hybrid_notes(figures["recall"])]
    if figures.get("sweep"):
        parts += ["", "**Hybrid variants** (arguments not listed keep the defaults above; R@k as above)", "",
                  sweep_table(figures["sweep"]), "", sweep_notes(figures)]

    parts += ["", "### Relevance gate", "",
              f"Best-chunk cosine similarity over the top {figures['top_k']} hybrid hits, the value "
              f"`bedside ask` compares with `min_relevance` (default {figures['min_relevance']:.2f}), and "
              "the share of questions below each candidate gate:", "",
              gate_table(figures["demo_gate"], figures["real_gate"]), "", gate_notes(figures)]

    if figures.get("ci_cost"):
        cost = figures["ci_cost"]
        parts += ["", "### Embedding cost and the CI subset", "",
                  "| MedQuAD chunk size (tokens) | chunks | embedder tokens, headers included |",
                  "|---|---|---|"]
        parts += [f"| {size} | {chunks:,} | {tokens:,} |"
                  for size, (chunks, tokens) in cost["chunking"].items()]
        parts += ["", f"| batch size | chunks embedded per CPU second ({cost['sample']} MedQuAD chunks) |",
                  "|---|---|"]
        parts += [f"| {batch} | {rate:.1f} |" for batch, rate in cost["rates"].items()]
        parts += ["", ci_notes(figures)]
    return "\n".join(parts)


# chunks embedded per second by all-MiniLM-L6-v2 on two idle cores, for estimates only: the first
# `make bench` on 2026-12-05 (AMD EPYC, 2 cores) embedded these corpora's 19,500 chunks in 8.2 minutes
EMBED_RATE = 40


def _duration(minutes: float) -> str:
    return f"{minutes * 60:.0f} s" if minutes < 2 else f"{minutes:.0f} min"


def retriever_defaults() -> dict[str, Any]:
    """The keyword defaults of `Retriever`, so the report names the configuration it measured."""
    import inspect

    from assistant.retrieval import Retriever

    parameters = inspect.signature(Retriever.__init__).parameters.values()
    return {p.name: p.default for p in parameters if p.default is not inspect.Parameter.empty}


def hybrid_notes(recall: dict[str, dict[str, dict[str, float]]]) -> str:
    """Compare hybrid with the better single method on each set, in sentences built from the figures."""
    sentences = []
    for name, scores in recall.items():
        ahead, behind = [], []
        for k in KS:
            metric = f"R@{k}"
            best = max(("dense", "bm25"), key=lambda mode: scores[mode][metric])
            gap = scores["hybrid"][metric] - scores[best][metric]
            label = f"{metric} {scores['hybrid'][metric]:.3f} vs {scores[best][metric]:.3f} ({best})"
            (ahead if gap > 0 else behind).append(label)
        verdict = "beats both single methods at every k" if not behind else (
            "does not beat the better single method at " + ", ".join(behind))
        sentences.append(f"{name.split(' (')[0]}: hybrid {verdict}" + (f" ({', '.join(ahead)})" if not behind
                                                                        else "") + ".")
    return " ".join(sentences) + "\n\n" + HYBRID_EXPLANATION


HYBRID_EXPLANATION = """\
Why MedQuAD separates the methods: one focus (a disease, a gene, a drug) has many answers, one per
question type (symptoms, causes, treatment, outlook ...) and often one per source, so dense search and
BM25 both rank the right focus high but often the wrong aspect of it. Hybrid search fuses the two
score lists (min-max normalised, 0.6 dense) and then adds `title_boost` to every chunk whose document
title has all its content words in the question, and `section_boost` when the chunk's section label
(for MedQuAD, the question type) is also in the question. A question that names both its subject and
its aspect ("What are the treatments for gout?") thereby lifts the treatment answer about gout above
near-duplicates. PubMedQA has no such near-duplicates: dense search alone finds nearly every abstract,
and the fusion must not lose that. The hybrid variants table, when present, shows each part's share."""


def sweep_notes(figures: dict[str, Any]) -> str:
    """Name what each part of the default hybrid search adds on MedQuAD, from the sweep rows."""
    medquad_r1 = {json.dumps(variant, sort_keys=True): medquad["R@1"]
                  for variant, _, medquad in figures["sweep"]}

    def r1(**variant: Any) -> str:
        value = medquad_r1.get(json.dumps(variant, sort_keys=True))
        return "—" if value is None else f"{value:.3f}"

    no_boost = {"title_boost": 0.0, "section_boost": 0.0}
    dense = figures["recall"][MEDQUAD_ALL]["dense"]["R@1"]
    default = figures["recall"][MEDQUAD_ALL]["hybrid"]["R@1"]
    return (
        f"On MedQuAD R@1, dense search alone reaches {dense:.3f}. Without the header boosts, weighted fusion "
        f"at dense_weight 0.6 reaches {r1(dense_weight=0.6, **no_boost)} and reciprocal rank fusion (k=60) "
        f"{r1(fusion='rrf', rrf_k=60, **no_boost)}. The title boost alone lifts it to "
        f"{r1(title_boost=0.3, section_boost=0.0)}, the section boost alone to "
        f"{r1(title_boost=0.0, section_boost=0.4)}, and both (the default) to {default:.3f}."
    )


def gate_notes(figures: dict[str, Any]) -> str:
    """State what the default relevance gate does to each group of questions, from the figures."""
    gate = figures["min_relevance"]
    demo = figures["demo_gate"]
    in_corpus = [score for question, score in demo if question["in_corpus"]]
    out_of_corpus = [score for question, score in demo if not question["in_corpus"]]

    def below(scores: list[float]) -> str:
        return f"{sum(score < gate for score in scores)} of {len(scores)}"

    if max(out_of_corpus) < gate <= min(in_corpus):
        margin = (f"so the gate lies between the two groups with {gate - max(out_of_corpus):.2f} to spare "
                  f"below it and {min(in_corpus) - gate:.2f} above it")
    else:
        margin = "so no gate separates the two groups completely"
    real = "; ".join(f"{name.split(' (')[0]} {below(scores)}"
                     for name, scores in figures["real_gate"].items())
    return (
        f"At the default gate {gate:.2f}, `bedside ask` abstains on {below(out_of_corpus)} out-of-corpus "
        f"demo questions and on {below(in_corpus)} in-corpus ones. The highest out-of-corpus score is "
        f"{max(out_of_corpus):.3f} and the lowest in-corpus one {min(in_corpus):.3f}, {margin}. Medical "
        "questions the demo corpus does not cover score highest of the out-of-corpus ones, because their "
        "best chunk is about a neighbouring topic. Questions of the real sets whose own document is indexed "
        f"but whose best chunk still falls below the gate, so `ask` would abstain: {real}. The gate tests "
        "cosine similarity alone; the citation verifier's per-sentence support scores are the second check."
    )


def ci_notes(figures: dict[str, Any]) -> str:
    """Explain the CI-cost tables and compare the CI subset with the full set, from the figures."""
    cost = figures["ci_cost"]
    sizes = sorted(cost["chunking"], key=int)
    (small_chunks, small_tokens), (large_chunks, large_tokens) = (cost["chunking"][sizes[0]],
                                                                  cost["chunking"][sizes[-1]])
    fastest = max(cost["rates"], key=lambda batch: cost["rates"][batch])
    sentences = [
        f"Chunks of {sizes[-1]} instead of {sizes[0]} tokens make {1 - large_chunks / small_chunks:.0%} "
        f"fewer chunks but only {1 - large_tokens / small_tokens:.0%} fewer embedder tokens: the text is the "
        "same, and only the header and overlap that each chunk repeats are saved. Embedding time follows "
        "tokens, so the chunk size barely changes the cost.",
        f"Batch size {fastest} embedded fastest per CPU second; sentence-transformers pads each batch to its "
        "longest text, so larger batches compute more padding.",
    ]
    full, subset = figures["recall"].get(MEDQUAD_ALL), figures["recall"].get(MEDQUAD_CI)
    if full and subset:
        same_order = all(sorted(MODES, key=lambda mode: full[mode][f"R@{k}"])
                         == sorted(MODES, key=lambda mode: subset[mode][f"R@{k}"]) for k in KS)
        sentences.append(
            "The CI tests index the CI subset instead of the whole set to stay within CI time. It keeps the "
            "hard part of the set (every answer sharing a focus with a sampled question), and dense, BM25 "
            "and hybrid search rank " + ("in the same order on it as on the full set at every k."
                                         if same_order else "in a different order on it than on the full set "
                                         "at some k, so the CI test is a weaker check than the full set."))
    return " ".join(sentences)


def run(quick: bool) -> None:
    """Measure, write the section and record the headline recall (the `benchmarks.run` entry point).

    Both modes evaluate the full MedQuAD set only when a previous run cached its index, because
    embedding its 15,700 chunks takes about 6 minutes on two idle cores. Without it, full mode
    evaluates the CI subset (about 4,000 chunks to embed) and quick mode the smaller quick subset.
    Full mode adds the fusion sweep and the CI cost, which need the full MedQuAD index. The PubMedQA
    index (3,800 chunks) is usually cached by the retrieval_scale module, which runs earlier.
    """
    main(["--quick"] if quick else ["--sweep", "--ci-cost", "--medquad-if-cached"])
    record_headlines(json.loads((CACHE_DIR / "results.json").read_text(encoding="utf-8")))


def record_headlines(figures: dict[str, Any]) -> None:
    """Record hybrid recall against the better single method on each set for the benchmark summary."""
    from benchmarks.common import record_figure

    for name, scores in figures["recall"].items():
        if name == f"PubMedQA, first {CI_QUESTIONS} questions (the CI test)":
            continue
        for k in KS:
            metric = f"R@{k}"
            best = max(("dense", "bm25"), key=lambda mode: scores[mode][metric])
            # On MedQuAD hybrid must beat both single methods, as the CI test asks: strictly at R@1 and
            # R@5, and at least tie at R@10, where a subset of 100 or 200 questions often ties. On
            # PubMedQA it must keep dense search's recall.
            target = None
            if name.startswith("MedQuAD"):
                target = "ratio >= 1" if k == 10 else "ratio > 1"
            elif k == 5:
                target = "value >= 0.98"
            record_figure("retrieval_quality", f"hybrid {metric}, {name}", scores["hybrid"][metric],
                          reference=scores[best][metric],
                          reference_name="dense" if best == "dense" else "BM25", target=target)


if __name__ == "__main__":
    raise SystemExit(main())
