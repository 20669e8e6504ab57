"""Helpers every benchmark uses: machine facts, medians, and writing one section of docs/benchmarks.md.

Each benchmark owns one section, delimited by HTML comments, so benchmarks can run alone or together
without overwriting each other's figures.
"""

from __future__ import annotations

import datetime as dt
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DOC = REPO / "docs" / "benchmarks.md"
SHARED_DATA = Path(os.environ.get("BEDSIDE_SHARED_DATA", REPO.parent / "shared" / "data"))
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


def median_time(function: Callable[[], object], repeats: int = 5, warmup: int = 1) -> float:
    """Median wall time of `function` in seconds over `repeats` runs after `warmup` runs."""
    for _ in range(warmup):
        function()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def load_average() -> str:
    """The 1-minute load average, so a reader can tell whether the machine was busy."""
    try:
        return f"{os.getloadavg()[0]:.1f}"
    except OSError:
        return "unknown"


def write_section(name: str, markdown: str) -> None:
    """Replace (or append) the section `name` of docs/benchmarks.md, leaving the others untouched."""
    from assistant.fileio import atomic_write_text

    begin, end = f"<!-- begin {name} -->", f"<!-- end {name} -->"
    block = f"{begin}\n{markdown.strip()}\n{end}"
    text = DOC.read_text(encoding="utf-8") if DOC.is_file() else HEADER
    pattern = re.compile(re.escape(begin) + r".*?" + re.escape(end), re.DOTALL)
    text = pattern.sub(lambda _: block, text) if pattern.search(text) else text.rstrip() + "\n\n" + block + "\n"
    atomic_write_text(DOC, text)


def git_revision() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
