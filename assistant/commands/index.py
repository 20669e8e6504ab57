"""`bedside index rebuild | info | rollback | remove`."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from assistant.commands import settings_from_args
from assistant.errors import BedsideError


def register(subparsers: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    index = subparsers.add_parser("index", help="build and manage the guideline index")
    actions = index.add_subparsers(dest="index_command", metavar="ACTION", required=True)

    rebuild = actions.add_parser("rebuild", parents=[common], help="index the corpus (incremental by default)")
    rebuild.add_argument("--corpus", nargs="+", type=Path, metavar="PATH",
                         help="files or folders to index (default: the `corpus` setting, corpora/demo)")
    rebuild.add_argument("--full", action="store_true", help="re-embed every document, reusing nothing")
    rebuild.add_argument("--index-type", choices=["auto", "flat", "hnsw"], default="auto",
                         help="FAISS index type (auto: flat up to 50,000 chunks, HNSW above)")
    rebuild.add_argument("--scrub", action="store_true", help="de-identify documents before indexing")
    rebuild.add_argument("--no-progress", action="store_true", help="hide progress bars")
    rebuild.set_defaults(func=run_rebuild)

    info = actions.add_parser("info", parents=[common], help="print the serving version's manifest summary")
    info.add_argument("--json", action="store_true", help="print JSON")
    info.add_argument("--documents", action="store_true", help="list every document (with --json)")
    info.set_defaults(func=run_info)

    rollback = actions.add_parser("rollback", parents=[common], help="serve the previous index version again")
    rollback.set_defaults(func=run_rollback)

    remove = actions.add_parser("remove", parents=[common], help="write a new version without these documents")
    remove.add_argument("doc_ids", nargs="+", metavar="DOC_ID")
    remove.set_defaults(func=run_remove)


def run_rebuild(args: argparse.Namespace) -> int:
    from assistant import models
    from assistant.answer.pipeline import embedder_info
    from assistant.chunking import Chunker
    from assistant.corpus import load_corpus
    from assistant.fileio import ensure_writable_folder
    from assistant.indexing import IndexStore

    settings = settings_from_args(args, corpus=args.corpus)
    # a read-only or missing index folder fails here, before minutes of loading and embedding
    ensure_writable_folder(settings.index_dir, "--index")
    progress = not args.no_progress
    report = load_corpus(settings.corpus, progress=progress)
    for path, reason in report.problems:
        # most reasons already name the file; print it once
        print(f"bedside: skipped {reason if path in reason else f'{path}: {reason}'}", file=sys.stderr)
    documents = report.documents
    if not documents:
        # replacing a good index with an empty one would lose it; `bedside index remove` empties on purpose
        corpus = ", ".join(str(path) for path in settings.corpus)
        raise BedsideError(
            f"no documents could be loaded from {corpus} ({len(report.problems)} problems listed above); "
            "the index was left unchanged: pass files or folders of .md, .txt, .html, .pdf, .xml or .jsonl to --corpus"
        )
    if args.scrub:
        from assistant.safety.scrub import scrub_documents

        documents, scrub_report = scrub_documents(documents)
        print(scrub_report.summary(), file=sys.stderr)

    embedder_path = models.resolve_embedder(settings.embedder)
    embedder = models.load_embedder(embedder_path, settings.device)
    chunker = Chunker(embedder.tokenizer, settings.chunk_tokens, settings.chunk_overlap, embedder.max_seq_length)
    summary = IndexStore(settings.index_dir).rebuild(
        documents, chunker, embedder, embedder_info(settings.embedder, embedder_path, embedder),
        settings.to_dict(), full=args.full, progress=progress, problems=report.problems,
        index_type=args.index_type,
    )
    print(summary.line())
    return 0


def run_info(args: argparse.Namespace) -> int:
    from assistant.indexing import IndexStore

    settings = settings_from_args(args)
    store = IndexStore(settings.index_dir)
    manifest = store.read_manifest()
    info = {
        "version": manifest["version"],
        "previous_version": manifest.get("previous_version"),
        "built_at": manifest["built_at"],
        "documents": manifest["document_count"],
        "chunks": manifest["chunks"],
        "embedder": manifest["embedder"]["name"],
        "embedder_fingerprint": manifest["embedder"]["fingerprint"],
        "dimension": manifest["embedder"]["dimension"],
        "index_type": manifest["index_type"],
        "chunking": manifest["chunking"],
        "specialties": sorted({d["specialty"] for d in manifest["documents"].values() if d.get("specialty")}),
        "skipped_files": len(manifest.get("skipped_files", [])),
    }
    if args.documents:
        info["document_list"] = manifest["documents"]
    if args.json:
        print(json.dumps(info, indent=2))
    else:
        for key, value in info.items():
            if key != "document_list":
                print(f"{key:22} {value}")
    return 0


def run_rollback(args: argparse.Namespace) -> int:
    from assistant.indexing import IndexStore

    settings = settings_from_args(args)
    version = IndexStore(settings.index_dir).rollback()
    print(f"serving index version {version}")
    return 0


def run_remove(args: argparse.Namespace) -> int:
    from assistant.indexing import IndexStore

    settings = settings_from_args(args)
    summary = IndexStore(settings.index_dir).remove_documents(args.doc_ids)
    print(summary.line())
    return 0
