"""Helpers of the field-failure tests: in-process CLI runs, folder snapshots, corpus files and a
generator wrapper that records the prompts the model receives. Fixtures live in `field_support`.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import shutil
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
DEMO_CORPUS = REPO / "corpora" / "demo"
DEMO_ADAPTERS = REPO / "adapters"
# Two specialties with an active demo adapter, used wherever a case needs "two adapters".
TWO_SPECIALTIES = ("cardiology", "infectious_disease")


@dataclass
class CliResult:
    status: int
    stdout: str
    stderr: str

    def error_line(self) -> str:
        """The single `bedside: error:` line; fails the test when there is none or several."""
        lines = [line for line in self.stderr.splitlines() if line.startswith("bedside: error:")]
        assert len(lines) == 1, self.stderr
        return lines[0]


def run_bedside(*args: str) -> CliResult:
    """Run `bedside ARGS` in this process, so the models loaded by the session fixtures are reused."""
    from assistant.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        status = main([str(a) for a in args])
    return CliResult(status, out.getvalue(), err.getvalue())


def snapshot(folder: Path) -> dict[str, str]:
    """sha256 of every file under `folder`, so a test can show that nothing changed."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def copy_demo_documents(target: Path, names: list[str]) -> Path:
    target.mkdir(parents=True, exist_ok=True)
    for name in names:
        shutil.copy(DEMO_CORPUS / name, target / name)
    return target


def write_markdown(path: Path, doc_id: str, title: str, body: str, **meta: str) -> Path:
    """Write a Markdown corpus file with front matter; `meta` adds fields such as date or specialty."""
    front = {"id": doc_id, "title": title, **meta}
    lines = ["---", *(f"{key}: {json.dumps(value)}" for key, value in front.items()), "---", "", body, ""]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines), encoding="utf-8")
    return path


class RecordingGenerator:
    """Wrap a real generator and keep every conversation sent to the model, in call order.

    Everything else (model, tokenizer, adapters, fingerprints) is the wrapped generator's own.
    """

    def __init__(self, generator: object) -> None:
        self.wrapped = generator
        self.prompts: list[list[dict[str, str]]] = []

    def __getattr__(self, name: str) -> object:
        return getattr(self.wrapped, name)

    def stream(self, messages, adapter=None, settings=None):
        self.prompts.append(messages)
        return self.wrapped.stream(messages, adapter=adapter, settings=settings)

    def generate_batch(self, messages_list, adapters=None, settings=None):
        self.prompts.extend(messages_list)
        return self.wrapped.generate_batch(messages_list, adapters, settings)
