"""Run the benchmark suite (`make bench`) and rebuild the summary at the top of docs/benchmarks.md.

    python -m benchmarks.run [--only NAME ... | --all] [--quick] [--list]

Each module runs in its own Python process, one after another, so its memory figures start clean
and one failing module does not stop the rest. The harness logs each module's wall time and peak
resident memory, and exits non-zero at the end when any module failed. Every module writes its own
section of docs/benchmarks.md and records its headline figures with `benchmarks.common.record_figure`.
The harness then gathers those figures into the summary table at the top of the page; the contract
is in the docstring of `benchmarks.common`. Each module's output is also kept in
`.cache/benchmarks/logs/<module>.log`.

By default the harness runs the suite, every module but those in ON_REQUEST, which `--all` or
`--only` add. `--quick` asks each module for a smoke run of a few minutes with smaller sizes; its figures are
marked "quick" in the summary.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import logging
import os
import subprocess
import sys
import time
from collections.abc import Sequence
from typing import Any

from benchmarks.common import (
    QUICK_ENV,
    REPO,
    SUMMARY_SECTION,
    clear_figures,
    load_average,
    machine,
    summary_markdown,
    today,
    write_section,
)

logger = logging.getLogger("benchmarks.run")

# The suite runs the modules in this order, and the summary table lists them in it.
MODULES: dict[str, str] = {
    "generation": "decode tokens/s at batch 1 and 8 against llama.cpp, time to first token in `ask`",
    "drafting": "batched discharge drafting against the one-at-a-time loop on the same stays",
    "adapters": "adapter switch and load, mixed-adapter batches, LoRA vs full fine-tuning step",
    "retrieval_scale": "query latency at 1k, 10k and 100k chunks, flat vs HNSW, incremental rebuild",
    "load": "concurrent users against the server",
    "retrieval_quality": "recall of dense, BM25 and hybrid search on PubMedQA and MedQuAD",
}
# Modules outside the default suite, with the reason. `make bench` must finish within 30 minutes
# also on the slowest 2-core machines seen (22.4 minutes there without these modules). Their last
# figures stay in the summary.
ON_REQUEST: dict[str, str] = {
    "retrieval_quality": "measures retrieval for the answer path rather than a speed target, and its first "
                         "run embeds about 7,800 chunks (about 6 minutes)",
}
LOG_DIR = REPO / ".cache" / "benchmarks" / "logs"


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    selection = parser.add_mutually_exclusive_group()
    selection.add_argument("--only", nargs="+", metavar="NAME", choices=list(MODULES),
                       help=f"run only these modules (of: {', '.join(MODULES)})")
    selection.add_argument("--all", action="store_true",
                       help=f"also run the modules outside the suite ({', '.join(ON_REQUEST)})")
    parser.add_argument("--quick", action="store_true",
                        help="smoke runs with smaller sizes, a few minutes each")
    parser.add_argument("--list", action="store_true", help="list the modules and exit")
    # internal: the harness starts itself with --child NAME to run one module in a fresh process
    parser.add_argument("--child", choices=list(MODULES), help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def run_child(name: str, quick: bool) -> int:
    """Run one module's `run(quick)` in this process (the harness's child)."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", force=True)
    for noisy in ("transformers", "peft", "sentence_transformers", "httpx", "urllib3"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    module = importlib.import_module(f"benchmarks.{name}")
    runner = getattr(module, "run", None)
    if not callable(runner):
        logger.error("benchmarks/%s.py has no run(quick: bool) function; add one (see benchmarks/common.py)",
                     name)
        return 2
    runner(quick=quick)
    return 0


def launch(name: str, quick: bool) -> dict[str, Any]:
    """Run module `name` in a child process, streaming its output to the console and its log file."""
    if importlib.util.find_spec(f"benchmarks.{name}") is None:
        logger.error("%s: benchmarks/%s.py does not exist", name, name)
        return {"result": "missing", "seconds": 0.0, "peak_rss_mb": 0.0}
    clear_figures(name)
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1")
    env[QUICK_ENV] = "1" if quick else "0"
    command = [sys.executable, "-m", "benchmarks.run", "--child", name] + (["--quick"] if quick else [])
    LOG_DIR.mkdir(parents=True, exist_ok=True)
    logger.info("%s: starting (%s), load average %s", name, "quick" if quick else "full", load_average())
    start = time.perf_counter()
    with open(LOG_DIR / f"{name}.log", "w", encoding="utf-8") as log:
        process = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE,
                                   stderr=subprocess.STDOUT, text=True, errors="replace")
        assert process.stdout is not None
        for line in process.stdout:
            sys.stdout.write(line)
            log.write(line)
        # wait4 reports this child's own peak memory, not the largest of all children so far
        _, status, usage = os.wait4(process.pid, 0)
        process.returncode = os.waitstatus_to_exitcode(status)
    seconds = time.perf_counter() - start
    result = "ok" if process.returncode == 0 else f"failed (exit {process.returncode})"
    peak_mb = usage.ru_maxrss / 1024  # kilobytes on Linux
    logger.info("%s: %s in %.1f min, peak RSS %.2f GiB", name, result, seconds / 60, peak_mb / 1024)
    return {"result": result, "seconds": seconds, "peak_rss_mb": peak_mb}


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.child:
        return run_child(args.child, args.quick)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    if args.list:
        for name, what in MODULES.items():
            present = importlib.util.find_spec(f"benchmarks.{name}") is not None
            extra = "  [on request: --all or --only]" if name in ON_REQUEST else ""
            print(f"{name:18} {what}{'' if present else '  [module missing]'}{extra}")
        return 0

    names = args.only or [name for name in MODULES if args.all or name not in ON_REQUEST]
    command = "python -m benchmarks.run"
    if args.only:
        command += " --only " + " ".join(args.only)
    if args.all:
        command += " --all"
    for name, reason in ON_REQUEST.items():
        if name not in names:
            logger.info("%s: not in the suite, because it %s; run it with --all or --only %s", name, reason, name)
    if args.quick:
        command += " --quick"
    # the summary names the machine and its load, as every module's section does
    invocation = f"`{command}` on {today()}, {machine()}; load average {load_average()} at the start"
    start = time.perf_counter()
    runs = {}
    for number, name in enumerate(names, 1):
        logger.info("module %d of %d: %s", number, len(names), name)
        runs[name] = launch(name, args.quick)
    write_section(SUMMARY_SECTION, summary_markdown(list(MODULES), runs, invocation), top=True)
    failed = [name for name, run in runs.items() if run["result"] != "ok"]
    logger.info("suite finished in %.1f min; summary written to docs/benchmarks.md",
                (time.perf_counter() - start) / 60)
    for name, run in runs.items():
        logger.info("  %-18s %-18s %6.1f min  %5.2f GiB", name, run["result"], run["seconds"] / 60,
                    run["peak_rss_mb"] / 1024)
    if failed:
        logger.error("%d module(s) failed: %s; see .cache/benchmarks/logs/<module>.log", len(failed),
                     ", ".join(failed))
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
