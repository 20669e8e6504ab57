"""The benchmark figures contract: recording, target checks, the summary table and section placement."""

from __future__ import annotations

import json

import pytest

from benchmarks import common


@pytest.fixture
def figures_dir(tmp_path, monkeypatch):
    monkeypatch.setattr(common, "FIGURES_DIR", tmp_path / "figures")
    monkeypatch.setattr(common, "REPO", tmp_path)
    monkeypatch.delenv(common.QUICK_ENV, raising=False)
    return tmp_path / "figures"


def test_record_figure_ratio_and_target(figures_dir):
    row = common.record_figure("generation", "decode tokens/s", 90.0, "tokens/s", reference=150.0,
                               reference_name="llama.cpp", target="ratio >= 0.6")
    assert row["ratio"] == pytest.approx(0.6)
    assert row["met"] is True
    stored = json.loads((figures_dir / "generation.json").read_text())
    assert [f["name"] for f in stored["figures"]] == ["decode tokens/s"]
    assert stored["quick"] is False


def test_record_figure_value_target_missed(figures_dir):
    row = common.record_figure("retrieval_scale", "query p50", 31.0, "ms", target="value <= 30")
    assert row["met"] is False
    assert row["ratio"] is None


def test_record_figure_replaces_by_name(figures_dir):
    common.record_figure("adapters", "switch", 7.0, "ms", target="value <= 5")
    common.record_figure("adapters", "load", 0.2, "s")
    common.record_figure("adapters", "switch", 4.0, "ms", target="value <= 5")
    stored = json.loads((figures_dir / "adapters.json").read_text())
    assert [f["name"] for f in stored["figures"]] == ["switch", "load"]
    assert stored["figures"][0]["met"] is True


def test_record_figure_marks_quick_runs(figures_dir, monkeypatch):
    monkeypatch.setenv(common.QUICK_ENV, "1")
    common.record_figure("load", "requests/s", 12.0)
    assert json.loads((figures_dir / "load.json").read_text())["quick"] is True


@pytest.mark.parametrize("target", ["ratio => 3", "speed >= 1", "value <= fast", ""])
def test_invalid_target_rejected(figures_dir, target):
    with pytest.raises(ValueError, match="is invalid"):
        common.record_figure("generation", "decode", 1.0, target=target)


def test_invalid_module_name_rejected(figures_dir):
    with pytest.raises(ValueError, match="module name"):
        common.record_figure("../escape", "decode", 1.0)


def test_summary_lists_modules_in_order(figures_dir):
    common.record_figure("retrieval_scale", "query p50", 31.0, "ms", target="value <= 30")
    common.record_figure("generation", "decode tokens/s", 90.0, "tokens/s", reference=150.0,
                         reference_name="llama.cpp", target="ratio >= 0.6")
    common.clear_figures("missing_module")
    runs = {"generation": {"result": "ok", "seconds": 90.0, "peak_rss_mb": 2048.0},
            "retrieval_scale": {"result": "ok", "seconds": 30.0, "peak_rss_mb": 1024.0}}
    markdown = common.summary_markdown(["generation", "retrieval_scale"], runs, "`make bench` on a test machine")
    lines = markdown.splitlines()
    generation = next(n for n, line in enumerate(lines) if "decode tokens/s" in line)
    retrieval = next(n for n, line in enumerate(lines) if "query p50" in line)
    assert generation < retrieval
    assert "| 0.600× | ≥ 0.6× reference | yes |" in lines[generation]
    assert "| ≤ 30 ms | **no** |" in lines[retrieval]
    assert "| generation | ok | 1.5 min | 2.0 GiB |" in markdown
    assert "| **all 2 modules** | | **2.0 min** | |" in markdown
    assert "one process per module: `make bench` on a test machine" in markdown


def test_write_section_top_goes_before_first_section(figures_dir, monkeypatch):
    doc = figures_dir.parent / "benchmarks.md"
    monkeypatch.setattr(common, "DOC", doc)
    doc.write_text("# Benchmarks\n\nIntro.\n\n## Evaluation\n\nOld text.\n")
    common.write_section("summary", "## Summary\n\nFirst table.", top=True)
    common.write_section("retrieval-scale", "## Retrieval at scale\n\nFigures.")
    common.write_section("summary", "## Summary\n\nSecond table.", top=True)
    text = doc.read_text()
    assert text.index("Intro.") < text.index("Second table.") < text.index("## Evaluation")
    assert "First table." not in text
    assert text.rstrip().endswith("<!-- end retrieval-scale -->")
