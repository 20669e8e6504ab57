"""Bounded load on the clinician page's queue: concurrent clinicians over loopback, two adapters.

    python -m benchmarks.load [--requests 50] [--clients 10] [--max-new-tokens 32] [--no-write]

Serves the real page (`assistant.ui.app.build_app`, login included) on a free 127.0.0.1 port in this
process, with the demo index and the active demo adapters. Each client logs in as its own account
through `gradio_client` and sends its share of the requests one after another, alternating between
the cardiology and infectious-disease specialties, so requests for two adapters interleave in the
queue. Every request must end answered or rejected with Gradio's retry message, and every audit
row must name the adapter of its request's specialty. Resident memory (RSS) of this process, which
contains the server, is read after a warm-up, when half the requests are done, and at the end.

The results replace the "load" section of docs/benchmarks.md unless --no-write is given; `run(quick)`
is the entry point of `python -m benchmarks.run`.
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import socket
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from benchmarks.common import REPO, command_line, load_average, machine, record_figure, today, write_section

logger = logging.getLogger(__name__)

MODULE = "load"
SPECIALTIES = ("cardiology", "infectious_disease")
QUESTIONS = {
    "cardiology": [
        "When is anticoagulation offered in atrial fibrillation?",
        "What blood pressure target applies to adults with hypertension?",
        "Which statin dose follows an acute coronary syndrome?",
    ],
    "infectious_disease": [
        "Which antibiotic treats mild community-acquired pneumonia?",
        "How long should hands be rubbed with alcohol gel?",
        "How soon should antibiotics start in suspected sepsis?",
    ],
}
# Gradio's answer when its queue is at max_size: a clean rejection that tells the client to retry.
RETRY_MESSAGE = re.compile(r"queue is full|try again", re.IGNORECASE)
ADAPTER_IN_PAGE = re.compile(r"Adapter: ([^<·]+?) ")


@dataclass
class Outcome:
    """One request as the client saw it."""

    client: str
    question: str
    specialty: str
    status: str  # "answered", "rejected" or "failed"
    seconds: float
    detail: str = ""
    page_adapter: str | None = None


@dataclass
class LoadResult:
    requests: int
    clients: int
    max_new_tokens: int
    outcomes: list[Outcome] = field(default_factory=list)
    mixed_adapters: list[str] = field(default_factory=list)
    rss_before_mib: float = 0.0
    rss_half_mib: float = 0.0
    rss_after_mib: float = 0.0
    # resident memory after each finished request, in finishing order
    rss_trace_mib: list[float] = field(default_factory=list)
    seconds: float = 0.0

    def count(self, status: str) -> int:
        return sum(o.status == status for o in self.outcomes)

    @property
    def rss_growth_mib(self) -> float:
        """Growth over the whole run, warm-up excluded."""
        return self.rss_after_mib - self.rss_before_mib

    @property
    def rss_last_quarter_growth_mib(self) -> float:
        """Growth while the last quarter of the requests ran."""
        trace = self.rss_trace_mib
        return trace[-1] - trace[max(0, 3 * len(trace) // 4 - 1)] if trace else 0.0

    @property
    def rss_second_half_growth_mib(self) -> float:
        """Growth while the second half of the requests ran: near zero when memory has settled."""
        return self.rss_after_mib - self.rss_half_mib

    def latency(self, quantile: float) -> float:
        times = sorted(o.seconds for o in self.outcomes if o.status == "answered")
        if not times:
            return 0.0
        return times[min(len(times) - 1, int(quantile * len(times)))]


def resident_mib() -> float:
    """Resident set size of this process in MiB, from /proc (0 where it is unavailable)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def expected_adapters(assistant: Any) -> dict[str, str]:
    """Return the adapter name the router gives each load specialty; raise when one has none."""
    names = {specialty: assistant.router.choose("", specialty).name for specialty in SPECIALTIES}
    missing = [s for s, name in names.items() if not name]
    if missing:
        raise RuntimeError(f"no active adapter for {missing}; the load run needs one per specialty")
    return names


def run_load(assistant: Any, requests: int = 50, clients: int = 10, warmup: int = 4) -> LoadResult:
    """Send `requests` questions from `clients` logged-in clients to the page served on loopback.

    `assistant` must have a router with active adapters for both SPECIALTIES and an audit log.
    The first `warmup` requests (sent before memory is read) are not counted.
    """
    from gradio_client import Client

    from assistant.ui.app import build_app, launch_options
    from assistant.ui.auth import UserStore

    adapters = expected_adapters(assistant)
    result = LoadResult(requests=requests, clients=clients,
                        max_new_tokens=assistant.generation.max_new_tokens)
    with tempfile.TemporaryDirectory(prefix="bedside-load-") as folder:
        users = UserStore(Path(folder) / "users.json")
        accounts = {f"load_client_{n:02d}": f"password of load client {n:02d}" for n in range(clients)}
        for name, password in accounts.items():
            users.set_password(name, password)
        app = build_app(assistant)
        port = free_port()
        app.launch(server_name="127.0.0.1", server_port=port, auth=users.verify, prevent_thread_lock=True,
                   quiet=True, **launch_options())
        url = f"http://127.0.0.1:{port}/"
        try:
            connected = {name: Client(url, auth=(name, password), verbose=False)
                         for name, password in accounts.items()}
            # warm-up: one-off costs of the first requests (code paths, adapters) fall before memory is read
            warm_client = next(iter(connected.values()))
            for number in range(warmup):
                specialty = SPECIALTIES[number % 2]
                _ask(warm_client, "warmup", QUESTIONS[specialty][0], specialty)
            first_row = _max_audit_id(assistant)
            result.rss_before_mib = resident_mib()

            plan = _plan(list(connected), requests)
            lock = threading.Lock()

            def record(outcome: Outcome) -> None:
                with lock:
                    result.outcomes.append(outcome)
                    result.rss_trace_mib.append(resident_mib())
                    if len(result.outcomes) == requests // 2:
                        result.rss_half_mib = result.rss_trace_mib[-1]

            started = time.perf_counter()
            threads = [threading.Thread(target=_client_loop, name=f"load-{name}",
                                        args=(connected[name], name, work, record))
                       for name, work in plan.items()]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
            result.seconds = time.perf_counter() - started
            result.rss_after_mib = resident_mib()
        finally:
            app.close()

    # every audit row of the run must name the adapter of its request's specialty
    by_question = {q: s for s, questions in QUESTIONS.items() for q in questions}
    for row in assistant.audit.rows():
        if row["id"] <= first_row:
            continue
        wanted = adapters[by_question[row["question"]]]
        if row["adapter_name"] != wanted:
            result.mixed_adapters.append(f"audit row {row['id']}: {row['adapter_name']} for {wanted}")
    for outcome in result.outcomes:
        if outcome.status == "answered" and outcome.page_adapter != adapters[outcome.specialty]:
            result.mixed_adapters.append(f"{outcome.client}: page shows {outcome.page_adapter} for "
                                         f"{adapters[outcome.specialty]}")
    return result


def _plan(names: list[str], requests: int) -> dict[str, list[tuple[str, str]]]:
    """Deal the requests round-robin to the clients; consecutive requests alternate specialties."""
    plan: dict[str, list[tuple[str, str]]] = {name: [] for name in names}
    for number in range(requests):
        specialty = SPECIALTIES[number % 2]
        questions = QUESTIONS[specialty]
        plan[names[number % len(names)]].append((questions[number // 2 % len(questions)], specialty))
    return plan


def _client_loop(client: Any, name: str, work: list[tuple[str, str]], record: Any) -> None:
    for question, specialty in work:
        record(_ask(client, name, question, specialty))


def _ask(client: Any, name: str, question: str, specialty: str) -> Outcome:
    started = time.perf_counter()
    try:
        job = client.submit(question, specialty, api_name="/on_ask")
        job.result(timeout=600)
        updates = job.outputs()
    except Exception as err:  # noqa: BLE001 - every client-side failure is classified and reported
        seconds = time.perf_counter() - started
        status = "rejected" if RETRY_MESSAGE.search(str(err)) else "failed"
        return Outcome(name, question, specialty, status, seconds, f"{type(err).__name__}: {err}")
    seconds = time.perf_counter() - started
    # the last update that carries the chat contains the verified answer
    chats = [update[0] for update in updates if isinstance(update[0], list) and update[0]]
    final = chats[-1][-1]["content"] if chats else ""
    final = final if isinstance(final, str) else str(final)
    if "bedside-answer" not in final:
        return Outcome(name, question, specialty, "failed", seconds, final[:200])
    found = ADAPTER_IN_PAGE.search(final)
    adapter = found.group(1) if found else None
    return Outcome(name, question, specialty, "answered", seconds, page_adapter=adapter)


def _max_audit_id(assistant: Any) -> int:
    return max((row["id"] for row in assistant.audit.rows()), default=0)


# the benchmark

def load_demo_assistant(max_new_tokens: int, audit_db: Path) -> Any:
    """Build the assistant `launch.py` would serve: demo index and demo adapters, fp32 on CPU."""
    from assistant.answer.pipeline import build_assistant
    from assistant.config import Settings

    index = REPO / "index"
    if not (index / "CURRENT").is_file():
        raise RuntimeError(f"no demo index in {index}; build it with `bedside index rebuild`")
    settings = Settings(index_dir=index, adapters_dir=REPO / "adapters", dtype="float32", device="cpu",
                        max_new_tokens=max_new_tokens, audit_db=audit_db)
    return build_assistant(settings)


def render(result: LoadResult, quick: bool, arenas: str) -> str:
    answered, rejected, failed = result.count("answered"), result.count("rejected"), result.count("failed")
    per_minute = 60 * answered / result.seconds if result.seconds else 0.0
    times = [o.seconds for o in result.outcomes if o.status == "answered"]
    columns = ["answered", "rejected (retry message)", "failed", "mixed adapters", "answers/min",
               "latency p50", "latency p95", "slowest"]
    values = [answered, rejected, failed, len(result.mixed_adapters), f"{per_minute:.1f}",
              f"{result.latency(0.5):.1f} s", f"{result.latency(0.95):.1f} s",
              f"{max(times, default=0):.1f} s"]
    rows = (columns, ["---"] * len(columns), values)
    trace = result.rss_trace_mib
    quarters = ", ".join(f"{trace[max(0, len(trace) * q // 4 - 1)]:.0f}" for q in (1, 2, 3, 4)) \
        if trace else "-"
    table = "\n".join("| " + " | ".join(map(str, row)) + " |" for row in rows)
    return f"""## Load: concurrent clinicians on the page's queue

```sh
{command_line()}{" (quick)" if quick else ""}
```

{result.requests} requests from {result.clients} clients, each logged in as its own account through
`gradio_client`, to the page served on 127.0.0.1 from the benchmark's own process (demo index, active
demo adapters, fp32 on CPU, {result.max_new_tokens} new tokens per answer). Requests alternate between
the cardiology and infectious-disease adapters; the queue runs one request at a time because one base
model serves every user. Measured {today()} on {machine()}; load average {load_average()} at the end.

{table}

Resident memory of the serving process: {result.rss_before_mib:.0f} MiB after a warm-up of 4 requests,
then {quarters} MiB after each quarter of the requests ({result.rss_second_half_growth_mib:+.0f} MiB over
the second half, {result.rss_growth_mib:+.0f} MiB over the whole run; malloc arenas {arenas}). glibc
keeps a malloc arena for each thread that allocates, and Gradio runs handlers on a pool of threads,
so memory grows until each arena has served requests and then levels off. `launch.py` therefore caps
the arenas at 2 (`assistant.ui.app.cap_malloc_arenas`), as this benchmark does. Without the cap, on
2026-12-05, 100 requests levelled off near 2,850 MiB (+5 MiB over the last quarter, +1,251 MiB over
the run); with MALLOC_ARENA_MAX=2 set in the environment, 50 requests levelled off near 1,930 MiB.

Latency is measured at the client, from submitting a question to the verified answer, so it includes
waiting in the queue behind the other clients: with one request served at a time, p95 grows with the
number of clients.
A mixed adapter would be an audit row or a page whose adapter differs from the one its specialty
names; the run checks every row and every answered page.
"""


def measure_and_report(requests: int, clients: int, max_new_tokens: int, quick: bool,
                       write: bool) -> LoadResult:
    """Run the load on the demo assistant; write the section and record the figures when `write`."""
    from assistant.ui.app import cap_malloc_arenas

    # as launch.py does before it loads anything
    capped = cap_malloc_arenas()
    setting = os.environ.get("MALLOC_ARENA_MAX", "unset")
    arenas = "capped at 2" if capped else f"not capped here (MALLOC_ARENA_MAX={setting})"
    with tempfile.TemporaryDirectory(prefix="bedside-load-audit-") as folder:
        assistant = load_demo_assistant(max_new_tokens, Path(folder) / "audit.db")
        result = run_load(assistant, requests=requests, clients=clients)
    markdown = render(result, quick, arenas)
    if not write:
        print(markdown)
        return result
    write_section(MODULE, markdown)
    answered = result.count("answered")
    record_figure(MODULE, f"requests answered or rejected cleanly, of {requests}",
                  answered + result.count("rejected"), "requests", target=f"value >= {requests}")
    record_figure(MODULE, "answers with a mixed adapter", len(result.mixed_adapters), "answers",
                  target="value <= 0")
    # a leaked KV cache per request (about 18 MB at 400 prompt tokens) would add over 200 MiB here
    record_figure(MODULE, "RSS growth over the last quarter of the run", result.rss_last_quarter_growth_mib,
                  "MiB", target="value <= 100",
                  note=f"{result.rss_before_mib:.0f} MiB after warm-up, "
                       f"{result.rss_after_mib:.0f} MiB at the end")
    record_figure(MODULE, f"answers per minute, {clients} clients", 60 * answered / max(result.seconds, 1e-9),
                  "answers/min", note=f"{max_new_tokens} new tokens per answer")
    return result


def run(quick: bool) -> None:
    """Measure, write the "load" section and record the headline figures (entry point of benchmarks.run)."""
    # With 16 new tokens every request still prefills a whole prompt and decodes through its adapter,
    # in less time than with 32, which the 30-minute suite needs on the slower 2-core machines
    requests, clients, tokens = (20, 10, 8) if quick else (50, 10, 16)
    result = measure_and_report(requests, clients, tokens, quick, write=True)
    if result.count("failed") or result.mixed_adapters:
        failures = [o.detail for o in result.outcomes if o.status == "failed"][:3]
        raise RuntimeError(f"load run failed: {result.count('failed')} failed requests {failures}, "
                           f"mixed adapters {result.mixed_adapters[:3]}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=50, help="requests in all (default: 50)")
    parser.add_argument("--clients", type=int, default=10, help="concurrent clients (default: 10)")
    parser.add_argument("--max-new-tokens", type=int, default=32,
                        help="generation budget per answer, in tokens (default: 32)")
    parser.add_argument("--no-write", action="store_true", help="print the section instead of writing it")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    measure_and_report(args.requests, args.clients, args.max_new_tokens, quick=False, write=not args.no_write)


if __name__ == "__main__":
    main()
