"""Helpers every benchmark uses: machine facts, medians, writing one section of docs/benchmarks.md,
and recording the headline figures that `benchmarks.run` gathers into the summary table.

Each benchmark owns one section, delimited by HTML comments, so benchmarks can run alone or together
without overwriting each other's figures.

The contract between a benchmark module and `python -m benchmarks.run`:

- The module `benchmarks/<module>.py` defines `run(quick: bool) -> None`. It measures, writes its own
  section with `write_section(<section name>, markdown)`, and records each headline figure with
  `record_figure`. `quick=True` is a smoke run of a few minutes with smaller sizes; its figures are
  marked as such in the summary. A failure raises; the harness then reports the module as failed.
- `record_figure(module, name, value, unit, reference=..., reference_name=..., target=..., note=...)`
  appends (or replaces, by `name`) one row of `.cache/benchmarks/figures/<module>.json`, where
  `module` is the module's own name ("generation", "retrieval_scale", ...). `reference` is the figure
  measured beside it in the same run, in the same unit, and `ratio` is value / reference.
- `target` is a string `"<value|ratio> <op> <number>"` with op one of <=, >=, <, >, for example
  `"ratio >= 0.6"` (at least 0.6x the reference), `"value <= 30"` (at most 30 in `unit`) or
  `"ratio <= 0.05"` (at most 5% of the reference's time). `met` is computed from it. A figure
  without a target is shown for context.
- The harness deletes `<module>.json` before it starts the module, so a failed module never leaves
  last run's figures in the summary; then it builds the "summary" section at the top of
  docs/benchmarks.md from every file in that folder.

Example::

    record_figure("retrieval_scale", "query p50, 100k chunks", 21.4, "ms", target="value <= 30")
    record_figure("generation", "decode tokens/s, batch 1", 61.0, "tokens/s", reference=150.0,
                  reference_name="llama.cpp, same GGUF", target="ratio >= 0.6")
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import math
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
DOC = REPO / "docs" / "benchmarks.md"
SHARED_DATA = Path(os.environ.get("BEDSIDE_SHARED_DATA", REPO.parent / "shared" / "data"))
FIGURES_DIR = REPO / ".cache" / "benchmarks" / "figures"
# the retrieval benchmarks' index cache: retrieval_quality reads it, and retrieval_scale seeds its PubMedQA index
RETRIEVAL_CACHE = REPO / ".cache" / "benchmarks" / "retrieval"
# set by `benchmarks.run --quick` in each module's process, so recorded figures are marked as smoke runs
QUICK_ENV = "BEDSIDE_BENCH_QUICK"
SUMMARY_SECTION = "summary"
HEADER = """# Benchmarks

Measured with `make bench` (or the module named in each section), on the machine and date each
section states. Figures are medians of the stated number of runs; ratios compare against a
reference measured in the same run, because absolute times vary between machines and runs.
"""


def machine() -> str:
    """One line naming the CPU, core count, memory and library versions."""
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    memory_gb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return (f"{cpu}, {os.cpu_count()} cores, {memory_gb:.0f} GiB, {gpu}; Python {platform.python_version()}, "
            f"torch {torch.__version__}")


def today() -> str:
    return dt.date.today().isoformat()


def command_line() -> str:
    return "python -m " + Path(sys.argv[0]).with_suffix("").relative_to(REPO).as_posix().replace("/", ".") \
        if Path(sys.argv[0]).is_relative_to(REPO) else " ".join(sys.argv)


def median_time(function: Callable[[], object], repeats: int = 5, warmup: int = 1,
                summary: Callable[[list[float]], float] = statistics.median) -> float:
    """Wall time of `function` in seconds over `repeats` runs after `warmup` runs: the median by default.

    Pass `summary=min` for a bandwidth-style figure, where the fastest run is the least disturbed one.
    """
    for _ in range(warmup):
        function()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        times.append(time.perf_counter() - start)
    return summary(times)


def load_average() -> str:
    """The 1-minute load average, so a reader can tell whether the machine was busy."""
    try:
        return f"{os.getloadavg()[0]:.1f}"
    except OSError:
        return "unknown"


@contextlib.contextmanager
def _doc_lock() -> Iterator[None]:
    """Serialise read-modify-write of docs/benchmarks.md between benchmarks run side by side."""
    import fcntl

    path = REPO / ".cache" / "benchmarks" / "doc.lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def write_section(name: str, markdown: str, top: bool = False) -> None:
    """Replace (or add) the section `name` of docs/benchmarks.md, leaving the others untouched.

    A new section goes at the end, or with `top` before the first section after the page's intro.
    """
    from assistant.fileio import atomic_write_text

    begin, end = f"<!-- begin {name} -->", f"<!-- end {name} -->"
    block = f"{begin}\n{markdown.strip()}\n{end}"
    with _doc_lock():
        text = DOC.read_text(encoding="utf-8") if DOC.is_file() else HEADER
        pattern = re.compile(re.escape(begin) + r".*?" + re.escape(end), re.DOTALL)
        if pattern.search(text):
            text = pattern.sub(lambda _: block, text)
        elif top:
            first = re.search(r"^(## |<!-- begin )", text, re.MULTILINE)
            cut = first.start() if first else len(text)
            text = text[:cut].rstrip() + "\n\n" + block + "\n\n" + text[cut:].lstrip()
        else:
            text = text.rstrip() + "\n\n" + block + "\n"
        atomic_write_text(DOC, text)


# headline figures: one JSON file per module, gathered by benchmarks.run into the summary table

_TARGET = re.compile(r"^\s*(value|ratio)\s*(<=|>=|<|>)\s*([-+0-9.eE]+)\s*$")
_OPERATORS: dict[str, Callable[[float, float], bool]] = {
    "<=": lambda a, b: a <= b, ">=": lambda a, b: a >= b, "<": lambda a, b: a < b, ">": lambda a, b: a > b,
}


def parse_target(target: str) -> tuple[str, str, float]:
    """Split a target such as "ratio >= 0.6" into ("ratio", ">=", 0.6), or raise naming the form."""
    match = _TARGET.match(target)
    if not match:
        raise ValueError(f"target {target!r} is invalid; write '<value|ratio> <op> <number>' with op one of "
                         "<=, >=, <, >, for example 'ratio >= 0.6' or 'value <= 30'")
    return match.group(1), match.group(2), float(match.group(3))


def figures_path(module: str) -> Path:
    if not re.fullmatch(r"[a-z][a-z0-9_]*", module):
        raise ValueError(f"module name {module!r} is invalid; use the benchmark module's name, "
                         "for example 'generation'")
    return FIGURES_DIR / f"{module}.json"


def record_figure(module: str, name: str, value: float, unit: str = "", *, reference: float | None = None,
                  reference_name: str = "", target: str | None = None, note: str = "") -> dict[str, Any]:
    """Record one headline figure of `module` for the summary table; returns the stored row.

    `reference` is measured in the same run and unit; `ratio` = value / reference. `target` reads
    as in the module docstring ("ratio >= 0.6", "value <= 30"). Recording a name again replaces it.
    """
    from assistant.fileio import atomic_write_json

    value = float(value)
    ratio = value / reference if reference not in (None, 0) and math.isfinite(value) else None
    met = None
    if target is not None:
        subject, operator, bound = parse_target(target)
        measured = value if subject == "value" else ratio
        met = None if measured is None else bool(_OPERATORS[operator](measured, bound))
    row = {"name": name, "value": value, "unit": unit,
           "reference": None if reference is None else float(reference), "reference_name": reference_name,
           "ratio": ratio, "target": target, "met": met, "note": note}
    path = figures_path(module)
    with _doc_lock():
        data = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {"module": module,
                                                                                      "figures": []}
        data.update(date=today(), quick=os.environ.get(QUICK_ENV) == "1", load_average=load_average())
        names = [f["name"] for f in data["figures"]]
        if name in names:
            data["figures"][names.index(name)] = row
        else:
            data["figures"].append(row)
        atomic_write_json(path, data)
    return row


def clear_figures(module: str) -> None:
    """Forget the recorded figures of `module` (before it runs again)."""
    figures_path(module).unlink(missing_ok=True)


def read_figures() -> dict[str, dict[str, Any]]:
    """Read every module's recorded figures, by module name."""
    found = {}
    for path in sorted(FIGURES_DIR.glob("*.json")) if FIGURES_DIR.is_dir() else []:
        try:
            found[path.stem] = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError):
            continue
    return found


def format_number(value: float | None) -> str:
    """Three significant figures, thousands separated; "—" for a missing value."""
    if value is None or not math.isfinite(value):
        return "—"
    size = abs(value)
    if size >= 100:
        return f"{value:,.0f}"
    if size >= 10:
        return f"{value:.1f}"
    if size >= 1:
        return f"{value:.2f}"
    # three decimals for shares and recalls, so 0.9996 does not print as "1"
    return f"{value:.3f}" if size >= 0.1 else f"{value:.3g}"


def _with_unit(value: float | None, unit: str) -> str:
    text = format_number(value)
    return text if text == "—" or not unit else f"{text} {unit}"


def _target_text(row: dict[str, Any]) -> str:
    if not row.get("target"):
        return "—"
    subject, operator, bound = parse_target(row["target"])
    symbol = {"<=": "≤", ">=": "≥", "<": "<", ">": ">"}[operator]
    if subject == "ratio":
        return f"{symbol} {bound:g}× reference"
    unit = row.get("unit", "")
    return f"{symbol} {bound:g}" + (f" {unit}" if unit else "")


def summary_markdown(order: Sequence[str] = (), runs: dict[str, dict[str, Any]] | None = None,
                     invocation: str = "") -> str:
    """Build the summary table of every recorded figure (modules in `order` first) and this run's log.

    `invocation` describes the run that wrote `runs` (command, date, machine) and heads the log table.
    """
    figures = read_figures()
    names = [m for m in order if m in figures] + sorted(m for m in figures if m not in order)
    lines = ["## Summary", "",
             "Headline figures of the last run of each benchmark module (`make bench`, or `python -m "
             "benchmarks.run --only MODULE`). The reference is measured in the same run; ratio = measured "
             "÷ reference. Each module's section below has the method, the machine and what the figure "
             "means.", "",
             "| module | figure | measured | reference | ratio | target | met? |",
             "|---|---|---|---|---|---|---|"]
    for module in names:
        data = figures[module]
        label = f"{module} ({data.get('date', '?')}{', quick' if data.get('quick') else ''})"
        for row in data.get("figures", []):
            reference = _with_unit(row.get("reference"), row.get("unit", ""))
            if reference != "—" and row.get("reference_name"):
                reference += f" ({row['reference_name']})"
            met = {True: "yes", False: "**no**", None: "—"}[row.get("met")]
            name = row["name"] + (f" ({row['note']})" if row.get("note") else "")
            measured = _with_unit(row["value"], row.get("unit", ""))
            ratio = "—" if row.get("ratio") is None else format_number(row["ratio"]) + "×"
            target = _target_text(row)
            lines.append(f"| {label} | {name} | {measured} | {reference} | {ratio} | {target} | {met} |")
            label = ""
    if not names:
        lines.append("| — | no figures recorded yet | | | | | |")
    if runs:
        lines += ["", f"Last `benchmarks.run` invocation, one process per module{invocation and ': '}"
                  f"{invocation}", "",
                  "| module | result | wall time | peak RSS |", "|---|---|---|---|"]
        for module, run in runs.items():
            lines.append(f"| {module} | {run['result']} | {run['seconds'] / 60:.1f} min | "
                         f"{run['peak_rss_mb'] / 1024:.1f} GiB |")
        if len(runs) > 1:
            total = sum(run["seconds"] for run in runs.values())
            lines.append(f"| **all {len(runs)} modules** | | **{total / 60:.1f} min** | |")
    return "\n".join(lines)


def git_revision() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True,
                              text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
