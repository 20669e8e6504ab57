"""Field case 11: model output containing [9] when 5 sources were given, and [2] repeated.

Expected: [9] is removed and flagged; each remaining marker opens exactly its own source, in the
page and in `bedside ask --json`. The model's output is the input of this case, so the generator
here replays it instead of sampling.
"""

from __future__ import annotations

import json
import re

import pytest
from field_helpers import run_bedside

pytest_plugins = ["field_support"]

QUESTION = "How is severe hyperkalaemia with ECG changes treated?"
MODEL_OUTPUT = ("Give intravenous calcium to protect the heart [2]. Shift potassium into cells with "
                "insulin and glucose [9]. Recheck the potassium level after treatment [2][2]. Consider "
                "dialysis when it stays high [1].")


@pytest.fixture
def replayed_output(monkeypatch):
    """Make the local generator stream MODEL_OUTPUT word by word; prompt building stays real."""
    from assistant.answer.generation import LocalGenerator

    def stream(self, messages, adapter=None, settings=None):
        self.encode([messages])
        yield from re.findall(r"\S+\s*", MODEL_OUTPUT)

    monkeypatch.setattr(LocalGenerator, "stream", stream)


def check_markers(record: dict) -> None:
    retrieved = record["retrieved"]
    assert len(retrieved) == 5
    assert "[9]" not in record["answer"]
    invalid = [f for f in record["flags"] if f["type"] == "invalid_citation"]
    assert [f["marker"] for f in invalid] == [9]
    assert "only 5 were given" in invalid[0]["detail"]
    markers = [c["marker"] for c in record["citations"]]
    assert len(markers) == len(set(markers))
    # a sentence left without a marker may get the closest source attached, with an auto_cited flag
    auto = {f["marker"] for f in record["flags"] if f["type"] == "auto_cited"}
    assert {1, 2} <= set(markers) <= {1, 2} | auto
    for citation in record["citations"]:
        source = retrieved[citation["marker"] - 1]
        assert citation["chunk_id"] == source["chunk_id"]
        assert citation["doc_id"] == source["doc_id"]
    assert "[2][2]" not in record["answer"]


def test_ask_json_resolves_each_marker(isolated, demo_index_dir, replayed_output):
    result = run_bedside("ask", QUESTION, "--json", "--index", demo_index_dir, "--dtype", "float32",
                         "--device", "cpu")

    assert result.status == 0, result.stderr
    check_markers(json.loads(result.stdout))


def test_page_opens_each_marker_on_its_source(demo_assistant, replayed_output):
    from assistant.ui import handlers

    answer = demo_assistant.ask(QUESTION)
    record = answer.to_dict()
    check_markers(record)

    page = handlers.render_answer(answer, 3)
    panel = handlers.render_turn_sources(answer, 3)
    links = {int(n) for n in re.findall(r'href="#source-3-(\d+)"', page)}
    assert links == {c["marker"] for c in record["citations"]}
    assert "Removed citation [9]" in page
    for marker in links:
        # exactly one panel entry per marker, holding the chunk of that source
        assert panel.count(f'id="source-3-{marker}"') == 1
        entry = panel.split(f'id="source-3-{marker}"')[1].split("</article>")[0]
        chunk_id = record["retrieved"][marker - 1]["chunk_id"]
        assert f"Chunk {handlers.escape(chunk_id)}" in entry
    assert 'id="source-3-9"' not in panel
