"""Discharge drafting throughput: batched vs one-at-a-time on the same stays.

    python -m benchmarks.drafting [--input DIR] [--stays 16] [--batch-size 8] [--max-new-tokens 128]

Loads the models once and drafts the first N ended inpatient stays of the input twice, with batch
size B and then with batch size 1, into temporary folders. Prints drafts per minute, generated tokens
per second and the batched/solo ratios, plus how many drafts came out identical in both runs.
Generated tokens are the output text re-tokenized, over the time spent inside `generate`. Nothing is
written to the audit log. Add the printed row to docs/benchmarks.md with the machine and date.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_INPUT = REPO.parent / "shared" / "data" / "synthea_fhir"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--input", type=Path, default=DEFAULT_INPUT, help="FHIR folder or notes JSONL")
    parser.add_argument("--stays", type=int, default=16, help="stays drafted in each run (default: 16)")
    parser.add_argument(
        "--batch-size", type=int, default=8, help="batch size of the batched run (default: 8)"
    )
    parser.add_argument(
        "--max-new-tokens", type=int, default=128, help="hospital-course budget (default: 128)"
    )
    parser.add_argument("--note-tokens", type=int, default=512, help="notes budget per stay (default: 512)")
    parser.add_argument(
        "--dtype",
        default="float32",
        choices=["auto", "float32", "bfloat16"],
        help="base model dtype (default: float32, where batched equals solo)",
    )
    parser.add_argument("--index", type=Path, default=REPO / "index", help="guideline index folder")
    parser.add_argument("--json", action="store_true", help="print the result as JSON only")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    args = parse_args(argv)
    if not args.input.exists():
        print(f"input {args.input} not found; pass --input", file=sys.stderr)
        return 1

    import torch

    from assistant.config import load_settings
    from assistant.drafting import DraftOptions, load_resources, run_drafts

    settings = load_settings(
        overrides={
            "dtype": args.dtype,
            "device": "cpu",
            "index_dir": str(args.index),
            "max_new_tokens": args.max_new_tokens,
        }
    )
    resources = load_resources(settings, with_audit=False)
    # warm-up: the first generate call pays one-off allocation costs
    resources.generator.generate([{"role": "user", "content": "Say hello."}])

    results = {}
    with tempfile.TemporaryDirectory(prefix="bedside-bench-") as scratch:
        for name, batch_size in (("batched", args.batch_size), ("one_at_a_time", 1)):
            options = DraftOptions(
                limit=args.stays, batch_size=batch_size, force=True, note_tokens=args.note_tokens
            )
            summary = run_drafts(args.input, Path(scratch) / name, options, settings, resources)
            results[name] = {
                "batch_size": batch_size,
                "drafted": summary.drafted,
                "failed": summary.failed,
                "seconds": summary.seconds,
                "generation_seconds": round(summary.generation_seconds, 2),
                "generated_tokens": summary.generated_tokens,
                "drafts_per_minute": round(summary.drafts_per_minute, 2),
                "generated_tokens_per_second": round(summary.tokens_per_second, 2),
            }
        identical = 0
        prompt_tokens = []
        for path in sorted((Path(scratch) / "batched").glob("*.json")):
            together = json.loads(path.read_text())
            prompt_tokens.append(together["provenance"]["prompt_tokens"])
            solo_path = Path(scratch) / "one_at_a_time" / path.name
            if solo_path.is_file():
                identical += together["sections"] == json.loads(solo_path.read_text())["sections"]

    batched, solo = results["batched"], results["one_at_a_time"]
    report = {
        "date": dt.date.today().isoformat(),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads",
        "load_average_at_end": [round(x, 1) for x in os.getloadavg()],
        "settings": {
            "stays": args.stays,
            "max_new_tokens": args.max_new_tokens,
            "note_tokens": args.note_tokens,
            "dtype": resources.generator.dtype,
            "input": str(args.input),
        },
        "batched": batched,
        "one_at_a_time": solo,
        "speedup_drafts_per_minute": round(
            batched["drafts_per_minute"] / max(solo["drafts_per_minute"], 1e-9), 2
        ),
        "speedup_tokens_per_second": round(
            batched["generated_tokens_per_second"] / max(solo["generated_tokens_per_second"], 1e-9), 2
        ),
        "identical_drafts": identical,
        # prefill cost grows with the prompt and gains little from batching, so it bounds the speedup
        "prompt_tokens_mean": round(sum(prompt_tokens) / max(len(prompt_tokens), 1)),
        "prompt_tokens_max": max(prompt_tokens, default=0),
    }
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    print(json.dumps(report, indent=2))
    print()
    print("| run | batch | drafts | s | drafts/min | generated tok/s |")
    print("|---|---|---|---|---|---|")
    for name, row in results.items():
        print(
            f"| {name} | {row['batch_size']} | {row['drafted']} | {row['seconds']} | "
            f"{row['drafts_per_minute']} | {row['generated_tokens_per_second']} |"
        )
    print(
        f"\nspeedup: {report['speedup_drafts_per_minute']}x drafts/min, "
        f"{report['speedup_tokens_per_second']}x tokens/s; identical drafts {identical}/{batched['drafted']}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
