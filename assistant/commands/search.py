"""`bedside search`: hybrid retrieval from the command line, one query or a file of them."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from assistant.commands import settings_from_args
from assistant.errors import BedsideError

HIT_FIELDS = ("chunk_id", "doc_id", "score", "title", "source", "page", "section", "date", "text")


def register(subparsers: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    search = subparsers.add_parser("search", parents=[common], help="retrieve guideline chunks for a query")
    search.add_argument("query", nargs="?", help="search text (or use --queries)")
    search.add_argument("--queries", type=Path, metavar="FILE",
                        help="one query a line, or JSONL with a `query` field; prints one JSON line per query")
    search.add_argument("--top-k", type=int, help="hits per query (default: the top_k setting, 5)")
    search.add_argument("--since", metavar="YYYY-MM-DD", help="only chunks dated on or after this date")
    search.add_argument("--specialty", help="only chunks of this specialty")
    search.add_argument("--mode", choices=["hybrid", "dense", "bm25"], default="hybrid", help="retrieval method")
    search.add_argument("--json", action="store_true", help="print JSON")
    search.set_defaults(func=run_search)


def read_queries(path: Path) -> list[str]:
    """Read one query a line, or JSONL with a `query` field; every query is validated with its line number."""
    from assistant.corpus.text import read_utf8
    from assistant.jsonl import jsonl_lines
    from assistant.retrieval import validate_query

    if not path.is_file():
        raise BedsideError(f"queries file {str(path)!r} not found")
    queries = []
    for number, line in enumerate(jsonl_lines(read_utf8(path)), 1):
        if not line.strip():
            continue
        if line.lstrip().startswith("{"):
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise BedsideError(f"{path}:{number} is not valid JSON ({err.msg})") from err
            except RecursionError as err:
                raise BedsideError(f"{path}:{number} is not valid JSON (nested too deeply)") from err
            if not isinstance(record, dict) or not isinstance(record.get("query"), str):
                raise BedsideError(f"{path}:{number} has no string `query` field")
            query = record["query"]
        else:
            query = line.strip()
        try:
            queries.append(validate_query(query))
        except BedsideError as err:
            raise BedsideError(f"{path}:{number}: {err}") from err
    if not queries:
        raise BedsideError(f"queries file {str(path)!r} holds no queries")
    return queries


def run_search(args: argparse.Namespace) -> int:
    from assistant import models
    from assistant.answer.pipeline import embedder_info
    from assistant.corpus.text import normalize_date
    from assistant.indexing import IndexStore
    from assistant.retrieval import Retriever, validate_query

    # reject bad input before loading the embedder and the index
    if (args.query is None) == (args.queries is None):
        raise BedsideError("give either a query or --queries FILE")
    queries = read_queries(args.queries) if args.queries else [validate_query(args.query)]
    since = normalize_date(args.since, "--since") if args.since else None
    settings = settings_from_args(args)
    top_k = args.top_k if args.top_k is not None else settings.top_k
    if top_k < 1:
        raise BedsideError(f"--top-k {top_k} is invalid; use a whole number of at least 1")
    IndexStore(settings.index_dir).read_manifest()

    embedder_path = models.resolve_embedder(settings.embedder)
    embedder = models.load_embedder(embedder_path, settings.device)
    index = IndexStore(settings.index_dir).open(embedder_info(settings.embedder, embedder_path, embedder))
    results = Retriever(index, embedder).search_many(queries, top_k, since, args.specialty, args.mode)

    for query, hits in zip(queries, results, strict=True):
        rows = [{key: hit.to_dict()[key] for key in HIT_FIELDS} for hit in hits]
        if args.json or args.queries:
            print(json.dumps({"query": query, "hits": rows}, ensure_ascii=False))
            continue
        if not hits:
            print("no matching chunks")
        for rank, hit in enumerate(hits, 1):
            where = f"p. {hit.page}" if hit.page else (hit.section or "")
            print(f"{rank}. [{hit.score:.3f}] {hit.title} — {where} ({hit.date or 'undated'})  {hit.chunk_id}")
            print("   " + " ".join(hit.text.split())[:240])
    return 0
