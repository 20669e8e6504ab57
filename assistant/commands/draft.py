"""`bedside draft-discharge`: batch discharge-summary drafts from FHIR or notes JSONL.

Exit status: 0 when every selected stay was drafted or was already up to date. Otherwise it is the
number of records listed in DIR/errors.jsonl (failed stays, unreadable lines, invalid resources),
capped at 125. A fatal error (invalid flags, a missing input) prints one line and exits 1.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from assistant.commands import settings_from_args


def register(subparsers: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    draft = subparsers.add_parser(
        "draft-discharge",
        parents=[common],
        help="draft discharge summaries for ended stays, in batches",
        description="Draft a discharge summary for every ended inpatient stay in INPUT. Each draft is "
        "written as DIR/<encounter id>.md and .json, marked DRAFT for clinician review.",
    )
    draft.add_argument(
        "input",
        type=Path,
        metavar="INPUT",
        help="FHIR bulk ndjson folder, Bundle JSON file or folder, or notes JSONL file",
    )
    draft.add_argument(
        "--out", type=Path, required=True, metavar="DIR", help="folder for drafts and errors.jsonl"
    )
    draft.add_argument(
        "--format",
        choices=["fhir", "notes"],
        dest="input_format",
        help="input format (default: notes for a .jsonl file, else fhir)",
    )
    draft.add_argument(
        "--specialty",
        metavar="NAME|auto",
        help="adapter: this specialty's active one, or auto to route each stay (default: the "
        "active discharge_summary adapter, else the base model)",
    )
    draft.add_argument(
        "--limit", type=int, metavar="N", help="draft at most N stays, earliest admission first"
    )
    draft.add_argument(
        "--batch-size", type=int, default=16, metavar="N", help="stays per generate call (default: 16)"
    )
    draft.add_argument(
        "--encounter",
        action="append",
        dest="encounters",
        metavar="ID",
        help="draft only this encounter (repeatable)",
    )
    draft.add_argument("--include-emergency", action="store_true", help="also draft emergency encounters")
    draft.add_argument("--force", action="store_true", help="redo drafts whose inputs are unchanged")
    draft.add_argument(
        "--max-new-tokens",
        type=int,
        metavar="N",
        help="hospital-course length budget in tokens (default: the max_new_tokens setting, 200)",
    )
    draft.add_argument(
        "--note-tokens",
        type=int,
        default=512,
        metavar="N",
        help="notes budget per stay in model tokens; longer notes are condensed and cut (default: 512)",
    )
    draft.add_argument(
        "--log-phi",
        action="store_true",
        help="allow patient ids and generated text in the log (default: counts only)",
    )
    draft.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    draft.set_defaults(func=run_draft)


def run_draft(args: argparse.Namespace) -> int:
    from assistant.drafting.runner import DraftOptions, load_resources, run_drafts

    options = DraftOptions(
        input_format=args.input_format,
        specialty=args.specialty,
        limit=args.limit,
        batch_size=args.batch_size,
        encounter_ids=args.encounters,
        include_emergency=args.include_emergency,
        force=args.force,
        log_phi=args.log_phi,
        note_tokens=args.note_tokens,
        progress=not args.no_progress,
    )
    options.validate()
    settings = settings_from_args(args, max_new_tokens=args.max_new_tokens)
    summary = run_drafts(args.input, args.out, options, settings, lambda: load_resources(settings))

    if summary.errors and args.log_phi:
        for error in summary.errors:
            print(f"bedside: failed: {error['reason']}", file=sys.stderr)
    print(summary.line())
    return summary.exit_status
