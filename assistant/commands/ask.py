"""`bedside ask`: a cited answer from the indexed guidelines."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from assistant.commands import settings_from_args
from assistant.errors import BedsideError


def register(subparsers: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    ask = subparsers.add_parser("ask", parents=[common], help="answer a question with numbered citations")
    ask.add_argument("question")
    ask.add_argument("--specialty", help="use this specialty's active adapter (default: automatic routing)")
    ask.add_argument("--top-k", type=int, help="chunks retrieved (default: the top_k setting, 5)")
    ask.add_argument("--since", metavar="YYYY-MM-DD", help="only use guidance dated on or after this date")
    ask.add_argument("--max-new-tokens", type=int, help="generation budget in tokens (default: 200)")
    ask.add_argument("--backend", choices=["local", "vllm"], help="where tokens are generated (default: local)")
    ask.add_argument("--no-store-text", action="store_true",
                     help="store only a hash of the question and answer in the audit log")
    ask.add_argument("--json", action="store_true", help="print the full answer record as JSON")
    ask.set_defaults(func=run_ask)


def check_specialty(specialty: str, manifest: dict[str, Any], adapters_dir: Path) -> None:
    """Raise unless `specialty` names an indexed specialty or a registered adapter's specialty."""
    known = {doc.get("specialty") for doc in manifest["documents"].values()}
    try:
        from assistant.tuning.registry import AdapterRegistry
    except ImportError:
        pass
    else:
        known |= {entry.get("specialty") for entry in AdapterRegistry(adapters_dir).entries()}
    known.discard(None)
    if specialty not in known:
        raise BedsideError(
            f"specialty {specialty!r} is unknown; use one of {', '.join(sorted(known)) or '(none indexed)'} "
            "or leave out --specialty"
        )


def run_ask(args: argparse.Namespace) -> int:
    from assistant.answer.pipeline import build_assistant
    from assistant.corpus.text import normalize_date
    from assistant.indexing import IndexStore
    from assistant.retrieval import validate_query

    # reject bad input before loading the models and the index
    validate_query(args.question)
    since = normalize_date(args.since, "--since") if args.since else None
    if args.top_k is not None and args.top_k < 1:
        raise BedsideError(f"--top-k {args.top_k} is invalid; use a whole number of at least 1")
    extra = {"max_new_tokens": args.max_new_tokens, "backend": args.backend}
    if args.no_store_text:
        extra["store_text"] = False
    settings = settings_from_args(args, **extra)
    manifest = IndexStore(settings.index_dir).read_manifest()
    if args.specialty:
        check_specialty(args.specialty, manifest, settings.adapters_dir)
    assistant = build_assistant(settings)

    if args.json:
        answer = assistant.ask(args.question, specialty=args.specialty, top_k=args.top_k, since=since)
        print(json.dumps(answer.to_dict(), ensure_ascii=False, indent=2))
        return 0

    answer = None
    for event in assistant.ask_stream(args.question, specialty=args.specialty, top_k=args.top_k, since=since):
        if event.kind == "token":
            sys.stdout.write(event.text)
            sys.stdout.flush()
        else:
            answer = event.answer
    print("\n")
    if answer.abstained:
        return 0
    print("Verified answer:\n" + answer.answer + "\n")
    for citation in answer.citations:
        where = f"page {citation.page}" if citation.page else (citation.section or "")
        print(f"[{citation.marker}] {citation.title} — {where}, {citation.issuer or ''} "
              f"{citation.version or ''} ({citation.date or 'undated'}) support {citation.support:.2f}")
    for flag in answer.flags:
        print(f"! {flag['type']}: {flag['detail']}")
    adapter = answer.adapter["name"] or "none (base model)"
    print(f"\nmodel {answer.model}, adapter {adapter}, index {answer.index_version}. "
          "Decision support only: verify against the cited sources.")
    return 0
