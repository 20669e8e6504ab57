"""Retrieval quality on PubMedQA and MedQuAD: recall@1/5/10 of dense, BM25 and hybrid search.

Run as `python -m benchmarks.retrieval_quality`. DRAFT.
"""

from __future__ import annotations

import logging
import random
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

from assistant.corpus.document import Document
from benchmarks.common import SHARED_DATA

logger = logging.getLogger(__name__)

PUBMEDQA_DIR = SHARED_DATA / "pubmedqa"
MEDQUAD_DIR = SHARED_DATA / "medquad"
MEDQUAD_SAMPLE = 500
MEDQUAD_SEED = 1234
KS = (1, 5, 10)


@dataclass
class RetrievalSet:
    """Documents to index, queries, and for each query the document ids that count as found."""

    name: str
    documents: list[Document]
    queries: list[str]
    gold: list[set[str]]


def pubmedqa_set(folder: Path = PUBMEDQA_DIR) -> RetrievalSet:
    from assistant.evaluation.datasets import load_pubmedqa, pubmedqa_documents

    data = load_pubmedqa(folder)
    documents = pubmedqa_documents(data)
    pmids = list(data.items)
    return RetrievalSet("PubMedQA", documents, [data.items[p].question for p in pmids], [{p} for p in pmids])


def medquad_documents(folder: Path = MEDQUAD_DIR) -> list[Document]:
    from assistant.corpus import load_corpus

    report = load_corpus([folder])
    return [d for d in report.documents if d.metadata.get("question")]


def medquad_set(documents: list[Document], sample: int = MEDQUAD_SAMPLE, seed: int = MEDQUAD_SEED,
                random_distractors: int | None = None) -> RetrievalSet:
    ordered = sorted(documents, key=lambda d: d.doc_id)
    picked = random.Random(seed).sample(ordered, sample)
    by_text: dict[str, set[str]] = defaultdict(set)
    for document in ordered:
        by_text[document.text].add(document.doc_id)
    gold = [by_text[d.text] for d in picked]
    queries = [d.metadata["question"] for d in picked]
    if random_distractors is None:
        return RetrievalSet("MedQuAD", ordered, queries, gold)

    foci = {d.title.casefold() for d in picked}
    keep = {d.doc_id for d in ordered if d.title.casefold() in foci} | set().union(*gold)
    others = [d for d in ordered if d.doc_id not in keep]
    keep |= {d.doc_id for d in random.Random(seed + 1).sample(others, min(random_distractors, len(others)))}
    return RetrievalSet("MedQuAD subset", [d for d in ordered if d.doc_id in keep], queries, gold)


def recall_at_k(doc_rankings: list[list[str]], gold: list[set[str]], ks: tuple[int, ...] = KS) -> dict[int, float]:
    return {k: sum(bool(set(r[:k]) & g) for r, g in zip(doc_rankings, gold, strict=True)) / len(gold) for k in ks}
