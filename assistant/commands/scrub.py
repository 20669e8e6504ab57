"""`bedside scrub FILE|DIR --out DIR`: de-identify text files before indexing or training."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from assistant.errors import BedsideError

TEXT_SUFFIXES = {".txt", ".md", ".markdown", ".jsonl", ".csv", ".html", ".htm"}


def register(subparsers: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    scrub = subparsers.add_parser("scrub", parents=[common], help="de-identify text files (PHI scrubbing)")
    scrub.add_argument("inputs", nargs="+", type=Path, metavar="FILE_OR_DIR")
    scrub.add_argument("--out", type=Path, required=True, metavar="DIR", help="folder for the scrubbed copies")
    scrub.set_defaults(func=run_scrub)


def scrub_file(path: Path, report: Any) -> str:
    from assistant.corpus.text import read_utf8
    from assistant.safety.scrub import scrub_jsonl, scrub_text

    text = read_utf8(path)
    if path.suffix.lower() == ".jsonl":
        return scrub_jsonl(text, str(path), report)
    return scrub_text(text, report)


def run_scrub(args: argparse.Namespace) -> int:
    from tqdm.auto import tqdm

    from assistant.fileio import atomic_write_json, atomic_write_text, ensure_writable_folder
    from assistant.safety.scrub import ScrubReport

    jobs: list[tuple[Path, Path]] = []
    for root in args.inputs:
        if root.is_file():
            jobs.append((root, args.out / root.name))
        elif root.is_dir():
            jobs += [(p, args.out / p.relative_to(root)) for p in sorted(root.rglob("*"))
                     if p.is_file() and p.suffix.lower() in TEXT_SUFFIXES]
        else:
            raise BedsideError(f"input {str(root)!r} not found; pass existing files or folders")
    if not jobs:
        raise BedsideError(f"no text files ({', '.join(sorted(TEXT_SUFFIXES))}) found in the inputs")
    if any(source.resolve() == target.resolve() for source, target in jobs):
        raise BedsideError("--out must differ from the input folder, so originals are never overwritten")
    ensure_writable_folder(args.out, "--out")

    report = ScrubReport()
    failed = 0
    for source, target in tqdm(jobs, desc="scrubbing", unit="file"):
        try:
            atomic_write_text(target, scrub_file(source, report))
        except BedsideError as err:
            failed += 1
            print(f"bedside: skipped {source}: {err}", file=sys.stderr)
    atomic_write_json(args.out / "scrub_report.json", {
        "files": len(jobs) - failed, "failed": failed, "replaced": dict(report.counts),
        "names_detected": report.names_detected, "ner_model": report.ner_model,
    })
    print(f"{len(jobs) - failed} file(s) written to {args.out}; {report.summary()}")
    return 1 if failed else 0
