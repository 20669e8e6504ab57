"""Evaluation sets: PubMedQA, JSONL retrieval sets, question files; PubMedQA as training data.

PubMedQA (Jin et al., 2019, MIT licence) is read from two release files. `ori_pqal.json` is keyed
by PubMed id, with QUESTION, CONTEXTS (abstract paragraphs without the conclusion), LABELS,
final_decision and LONG_ANSWER (the conclusion). The keys of `test_ground_truth.json` are the 500
test ids, and the other 500 ids are the training split.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from assistant.corpus.document import Document, Section
from assistant.corpus.loaders import iter_jsonl
from assistant.errors import BedsideError
from assistant.fileio import atomic_write_text

logger = logging.getLogger(__name__)

PUBMEDQA_ENV = "BEDSIDE_PUBMEDQA_DIR"
DEFAULT_PUBMEDQA_DIR = Path("data/pubmedqa")
DECISIONS = ("yes", "no", "maybe")


@dataclass
class PubMedQAItem:
    pmid: str
    question: str
    contexts: list[str]
    labels: list[str]
    decision: str
    long_answer: str


@dataclass
class PubMedQA:
    """The expert-labelled set, with the release's test split."""

    items: dict[str, PubMedQAItem]
    test_ids: list[str]
    folder: Path

    @property
    def train_ids(self) -> list[str]:
        test = set(self.test_ids)
        return [pmid for pmid in self.items if pmid not in test]


def resolve_pubmedqa_dir(path: Path | str | None) -> Path:
    """Return the PubMedQA folder: the argument, else $BEDSIDE_PUBMEDQA_DIR, else ./data/pubmedqa."""
    if path:
        folder = Path(path)
    elif os.environ.get(PUBMEDQA_ENV):
        folder = Path(os.environ[PUBMEDQA_ENV])
    else:
        folder = DEFAULT_PUBMEDQA_DIR
    if folder.is_file():
        folder = folder.parent
    if not (folder / "ori_pqal.json").is_file():
        raise BedsideError(
            f"PubMedQA not found in {str(folder)!r} (expected ori_pqal.json and test_ground_truth.json); "
            f"pass the folder, or set {PUBMEDQA_ENV}"
        )
    return folder


def load_pubmedqa(path: Path | str | None = None) -> PubMedQA:
    folder = resolve_pubmedqa_dir(path)
    try:
        raw = json.loads((folder / "ori_pqal.json").read_text(encoding="utf-8"))
        truth = json.loads((folder / "test_ground_truth.json").read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as err:
        raise BedsideError(f"PubMedQA files in {str(folder)!r} are unreadable: {err}") from err
    items = {}
    for pmid, record in raw.items():
        decision = str(record.get("final_decision", "")).strip().lower()
        if decision not in DECISIONS or not record.get("QUESTION") or not record.get("CONTEXTS"):
            raise BedsideError(f"PubMedQA record {pmid} in {str(folder)!r} lacks QUESTION, CONTEXTS or a "
                               "yes/no/maybe final_decision; use the unmodified release file")
        items[str(pmid)] = PubMedQAItem(
            pmid=str(pmid), question=record["QUESTION"].strip(), contexts=[c.strip() for c in record["CONTEXTS"]],
            labels=list(record.get("LABELS") or []), decision=decision,
            long_answer=str(record.get("LONG_ANSWER", "")).strip(),
        )
    missing = [pmid for pmid in truth if pmid not in items]
    if missing:
        raise BedsideError(f"test_ground_truth.json names {len(missing)} ids absent from ori_pqal.json "
                           f"(first: {missing[0]}); use files from one release")
    return PubMedQA(items=items, test_ids=list(truth), folder=folder)


def pubmedqa_documents(data: PubMedQA, pmids: list[str] | None = None) -> list[Document]:
    """Build one document per PubMed id, with one section per context paragraph (titled by its label).

    The title names the id only: a title holding the question would put the query into the index.
    """
    documents = []
    for pmid in pmids if pmids is not None else list(data.items):
        item = data.items[pmid]
        sections = [Section(text=text, title=(item.labels[n].title() if n < len(item.labels) else None))
                    for n, text in enumerate(item.contexts) if text]
        documents.append(Document(doc_id=pmid, title=f"PubMed {pmid}", sections=sections,
                                  source=f"https://pubmed.ncbi.nlm.nih.gov/{pmid}/"))
    return documents


# prompts shared by `eval qa`, the training converter and `compare`, so a model tuned on the
# converted data is scored on exactly the prompt it was trained on

def decision_messages(question: str, passages: list[str] | None = None) -> list[dict[str, str]]:
    """Build the user turn that requests a yes/no/maybe decision, with the evidence passages when given."""
    if passages:
        evidence = "\n\n".join(passages)
        content = (f"Evidence:\n{evidence}\n\nQuestion: {question}\n"
                   "Answer yes, no or maybe, then explain in one or two sentences.")
    else:
        content = f"Question: {question}\nAnswer yes, no or maybe, then explain in one or two sentences."
    return [{"role": "user", "content": content}]


def decision_answer(decision: str, long_answer: str) -> str:
    """Build the assistant turn: the decision word comes first, so its first token is what the QA scorer reads."""
    return f"{decision.capitalize()}. {long_answer}".strip()


def pubmedqa_training_records(data: PubMedQA, split: str) -> list[dict[str, Any]]:
    """Chat records (question + abstract paragraphs → decision and long answer) for one split."""
    if split not in {"train", "test"}:
        raise BedsideError(f"PubMedQA split {split!r} is invalid; use train or test")
    ids = data.train_ids if split == "train" else data.test_ids
    records = []
    for pmid in ids:
        item = data.items[pmid]
        records.append({
            "messages": decision_messages(item.question, item.contexts)
            + [{"role": "assistant", "content": decision_answer(item.decision, item.long_answer)}],
            "id": pmid,
        })
    return records


def write_pubmedqa_training(data: PubMedQA, out_dir: Path) -> tuple[Path, Path]:
    """Write `pubmedqa_train.jsonl` (the non-test 500) and `pubmedqa_test.jsonl`; return both paths."""
    paths = []
    for split in ("train", "test"):
        path = Path(out_dir) / f"pubmedqa_{split}.jsonl"
        # ASCII escapes keep U+2028 and U+2029 (present in some abstracts) from splitting a line in
        # readers that use str.splitlines()
        lines = [json.dumps(r, ensure_ascii=True) for r in pubmedqa_training_records(data, split)]
        atomic_write_text(path, "\n".join(lines) + "\n")
        paths.append(path)
    logger.info("PubMedQA training data written to %s and %s", *paths)
    return paths[0], paths[1]


# JSONL sets

@dataclass
class RetrievalQuery:
    query: str
    gold: set[str]


def load_retrieval_queries(path: Path) -> list[RetrievalQuery]:
    """Read `{"query": str, "gold": [doc ids]}` lines; a bad line is an error naming its number."""
    path = Path(path)
    if not path.is_file():
        raise BedsideError(f"retrieval query file {str(path)!r} not found")
    queries = []
    for number, record, problem in iter_jsonl(path):
        if problem is None:
            gold = record.get("gold")
            if isinstance(gold, str):
                gold = [gold]
            if not isinstance(record.get("query"), str) or not record["query"].strip():
                problem = "missing string field `query`"
            elif not isinstance(gold, list) or not gold or not all(isinstance(g, str) for g in gold):
                problem = "`gold` must be a non-empty list of document ids"
        if problem:
            raise BedsideError(f"{path}:{number}: {problem}; each line is "
                               '{"query": "...", "gold": ["doc-id", ...]}')
        queries.append(RetrievalQuery(record["query"].strip(), set(gold)))
    if not queries:
        raise BedsideError(f"retrieval query file {str(path)!r} contains no queries")
    return queries


@dataclass
class AnswerQuestion:
    question: str
    in_corpus: bool
    doc_id: str | None = None
    specialty: str | None = None


def load_answer_questions(path: Path) -> list[AnswerQuestion]:
    """Read `{"question", "in_corpus", "doc_id"?, "specialty"?}` lines (the demo questions' format)."""
    path = Path(path)
    if not path.is_file():
        raise BedsideError(f"questions file {str(path)!r} not found")
    questions = []
    for number, record, problem in iter_jsonl(path):
        if problem is None:
            if not isinstance(record.get("question"), str) or not record["question"].strip():
                problem = "missing string field `question`"
            elif not isinstance(record.get("in_corpus"), bool):
                problem = "missing boolean field `in_corpus`"
        if problem:
            raise BedsideError(f"{path}:{number}: {problem}; each line is "
                               '{"question": "...", "in_corpus": true, "doc_id": "..."}')
        questions.append(AnswerQuestion(record["question"].strip(), record["in_corpus"],
                                        record.get("doc_id"), record.get("specialty")))
    if not questions:
        raise BedsideError(f"questions file {str(path)!r} contains no questions")
    return questions


def spread(ids: list[str], limit: int) -> list[str]:
    """`limit` ids taken evenly across `ids` (all of them when `limit` is 0 or too large).

    The PubMedQA release lists its test split sorted by answer (276 yes, then no, then maybe), so
    the first 100 are all "yes"; an even spread keeps the label mix of the whole split.
    """
    if not limit or limit >= len(ids):
        return list(ids)
    return [ids[(n * len(ids)) // limit] for n in range(limit)]
