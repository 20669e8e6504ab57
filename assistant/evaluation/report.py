"""The comparison report: report.json (every number), report.md (tables and the decision) and PNG plots.

The Markdown is generated from the numbers alone, so a rerun on other data rewrites the whole
argument, including which method each dimension favours.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from assistant.corpus.text import markdown_table
from assistant.fileio import atomic_write_json, atomic_write_text

logger = logging.getLogger(__name__)

PLOTS = {"quality_vs_cost": "quality_vs_cost.png", "loss_curves": "loss_curves.png",
         "memorization": "memorization.png"}
METRIC_NAMES = {"accuracy": "decision accuracy", "rougeL_f1": "ROUGE-L F1"}
COLORS = {"base": "tab:gray", "full": "tab:blue", "lora": "tab:orange", "qlora": "tab:green"}


def write_report(report: dict[str, Any], out: Path) -> None:
    """Write report.json, the three plots and report.md into `out`."""
    out = Path(out)
    report["plots"] = write_plots(report, out)
    atomic_write_json(out / "report.json", report)
    atomic_write_text(out / "report.md", render_markdown(report))
    logger.info("comparison report written to %s", out / "report.md")


# plots

def write_plots(report: dict[str, Any], out: Path) -> dict[str, str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    results = report["results"]
    methods = [m for m in results if m != "base"]
    metric = results["base"]["task"]["metric"]
    paths = {}

    # quality against training cost, the base drawn at zero cost
    figure, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    for name, row in results.items():
        seconds = row["training"]["train_seconds"] if name != "base" else 0.0
        params = row["training"]["trainable_parameters"] if name != "base" else 1
        left.scatter(seconds, row["task"]["value"], s=60, color=COLORS.get(name))
        left.annotate(name, (seconds, row["task"]["value"]), textcoords="offset points", xytext=(5, 5))
        if name != "base":
            right.scatter(params, row["heldout"]["loss"], s=60, color=COLORS.get(name))
            right.annotate(name, (params, row["heldout"]["loss"]), textcoords="offset points", xytext=(5, 5))
    right.axhline(results["base"]["heldout"]["loss"], color="grey", linestyle="--", label="base (untrained)")
    left.set_xlabel("training wall time (s)")
    left.set_ylabel(METRIC_NAMES.get(metric, metric))
    left.set_title("task quality vs training time")
    right.set_xscale("log")
    right.set_xlabel("trainable parameters")
    right.set_ylabel("held-out loss (answer tokens)")
    right.set_title("held-out loss vs trainable parameters")
    right.legend()
    figure.tight_layout()
    paths["quality_vs_cost"] = _save(figure, out / PLOTS["quality_vs_cost"])

    # training loss per step
    figure, axis = plt.subplots(figsize=(6, 4))
    for name in methods:
        history = results[name]["training"].get("loss_history") or []
        if history:
            axis.plot([step for step, _ in history], [loss for _, loss in history], marker=".", label=name,
                      color=COLORS.get(name))
    axis.set_xlabel("optimizer step")
    axis.set_ylabel("training loss")
    axis.set_title("training loss (same data, seed and budget)")
    axis.legend()
    figure.tight_layout()
    paths["loss_curves"] = _save(figure, out / PLOTS["loss_curves"])

    # exposure of each canary, per model
    figure, axis = plt.subplots(figsize=(6, 4))
    planted = report["canaries"]["planted"]
    names = list(results)
    width = 0.8 / max(len(planted), 1)
    for k, canary in enumerate(planted):
        values = [results[n]["memorization"]["canaries"][k]["exposure"] for n in names]
        axis.bar([i + k * width for i in range(len(names))], values, width, label=f"{canary['kind']} canary")
    if planted:
        maximum = results["base"]["memorization"]["canaries"][0]["max_exposure"]
        axis.axhline(maximum, color="grey", linestyle="--", label="maximum (rank 1)")
    axis.set_xticks([i + width * (len(planted) - 1) / 2 for i in range(len(names))], names)
    axis.set_ylabel("exposure (bits)")
    axis.set_title(f"canary exposure ({report['canaries']['repeats']} copies each in the training file,\n"
                   f"about {report['canaries']['expected_copies_seen']:g} within the step budget)")
    axis.legend()
    figure.tight_layout()
    paths["memorization"] = _save(figure, out / PLOTS["memorization"])
    return paths


def _save(figure: Any, path: Path) -> str:
    import matplotlib.pyplot as plt

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.png")
    figure.savefig(tmp, dpi=110)
    plt.close(figure)
    tmp.replace(path)
    return path.name


# markdown

def _mb(value: float | None) -> str:
    return "—" if value is None else f"{value:,.0f}"


def _size(value: int) -> str:
    return f"{value / 2**20:,.1f} MB" if value >= 2**20 else f"{value / 2**10:,.1f} KB"


def results_table(report: dict[str, Any]) -> str:
    results = report["results"]
    metric = results["base"]["task"]["metric"]
    header = ["model", "trainable params", "train time (s)", "s/step", "peak RSS (MB)", "peak CUDA (MB)",
              "artifact", "held-out loss", "held-out ppl", METRIC_NAMES.get(metric, metric),
              "general-text ppl (Δ vs base)", "mean exposure (bits)", "extracted"]
    rows = [header]
    base_ppl = results["base"]["general_text"]["perplexity"]
    for name, row in results.items():
        training = row.get("training", {})
        memo = row["memorization"]
        delta = row["general_text"]["perplexity"] - base_ppl
        rows.append([
            name,
            f"{training['trainable_parameters']:,}" if training else "0",
            f"{training['train_seconds']:.0f}" if training else "—",
            f"{training['seconds_per_step']:.2f}" if training else "—",
            _mb(training.get("peak_rss_mb")),
            _mb(training.get("peak_cuda_mb")),
            _size(row["artifact"]["bytes"]) if "artifact" in row else "—",
            f"{row['heldout']['loss']:.4f}",
            f"{row['heldout']['perplexity']:.2f}",
            f"{row['task']['value']:.3f}",
            f"{row['general_text']['perplexity']:.2f} ({delta:+.2f})",
            f"{memo['mean_exposure']:.2f}" if memo else "—",
            f"{sum(c['extracted'] for c in memo['canaries'])}/{len(memo['canaries'])}" if memo else "—",
        ])
    return markdown_table(rows)


def _winner(methods: list[str], value: Any, lowest: bool = True) -> str:
    """Name the method with the lowest (or highest) value, or say that they tie."""
    values = {m: value(m) for m in methods}
    target = min(values.values()) if lowest else max(values.values())
    best = [m for m in methods if values[m] == target]
    return best[0] if len(best) == 1 else "tie (" + ", ".join(best) + ")"


def decision_lines(report: dict[str, Any]) -> list[str]:
    """One bullet per decision dimension, each stating the measured numbers and which method they favour."""
    results = report["results"]
    methods = [m for m in results if m != "base"]
    base = results["base"]
    metric = METRIC_NAMES.get(base["task"]["metric"], base["task"]["metric"])
    lines = []

    best_task = _winner(methods, lambda m: results[m]["task"]["value"], lowest=False)
    best_loss = _winner(methods, lambda m: results[m]["heldout"]["loss"])

    def quality_of(name: str) -> str:
        task = results[name]["task"]
        extra = f", macro-F1 {task['macro_f1']:.3f}" if "macro_f1" in task else ""
        return f"{name} {task['value']:.3f} (loss {results[name]['heldout']['loss']:.4f}{extra})"

    examples = base["task"]["examples"]
    resolution = (f" One example moves {metric} by {100 / examples:.1f} points, so smaller differences are noise."
                  if base["task"]["metric"] == "accuracy" else "")
    lines.append(f"**Quality.** {metric} on {examples} held-out examples: "
                 f"{', '.join(quality_of(n) for n in ['base', *methods])}. Best task score: {best_task}; "
                 f"lowest held-out loss: {best_loss}.{resolution}")

    forgetting = ", ".join(
        f"{m} {results[m]['general_text']['perplexity'] - base['general_text']['perplexity']:+.2f}" for m in methods)
    least = _winner(methods, lambda m: results[m]["general_text"]["perplexity"])
    lines.append(f"**Forgetting.** Change in perplexity on the general-English set "
                 f"(base {base['general_text']['perplexity']:.2f}): {forgetting}. Least forgetting: {least}.")

    cost = ", ".join(f"{m} {results[m]['training']['seconds_per_step']:.2f} s/step, peak RSS "
                     f"{_mb(results[m]['training']['peak_rss_mb'])} MB" for m in methods)
    cheapest = _winner(methods, lambda m: results[m]["training"]["seconds_per_step"])
    lines.append(f"**Compute cost.** {cost}. Cheaper per step: {cheapest}.")

    speed = ", ".join(f"{m} {results[m]['training']['wall_seconds']:.0f} s from start to saved artifact"
                      for m in methods)
    fastest = _winner(methods, lambda m: results[m]["training"]["wall_seconds"])
    lines.append(f"**Iteration speed.** {speed}. Faster turnaround: {fastest}.")

    rollback = []
    for m in methods:
        kind = "whole model loaded from disk" if m == "full" else "adapter attached to the loaded base"
        rollback.append(f"{m}: {results[m]['load_seconds']:.2f} s ({kind})")
    lines.append("**Rollback.** Switching back or forward means " + "; ".join(rollback) + ". An adapter is "
                 "swapped per request beside the base model; a fully fine-tuned model replaces the base for "
                 "every specialty at once.")

    audit = ", ".join(f"{m} {_size(results[m]['artifact']['bytes'])} (sha256 "
                      f"`{results[m]['artifact']['sha256'][:16]}…`)" for m in methods)
    lines.append(f"**Audit.** Artifact size and digest: {audit}. The smaller artifact is cheaper to hash, "
                 "store per version and review.")

    memo = base["memorization"]
    if memo:
        privacy = ", ".join(f"{m} {results[m]['memorization']['mean_exposure']:.2f} bits "
                            f"({sum(c['extracted'] for c in results[m]['memorization']['canaries'])} of "
                            f"{len(memo['canaries'])} extracted)" for m in methods)
        safest = _winner(methods, lambda m: results[m]["memorization"]["mean_exposure"])
        lines.append(f"**Privacy.** Mean canary exposure (base {memo['mean_exposure']:.2f} bits, maximum "
                     f"{memo['canaries'][0]['max_exposure']:.2f}): {privacy}. Lower exposure: {safest}.")
    return lines


def render_markdown(report: dict[str, Any]) -> str:
    config = report["config"]
    data = report["data"]
    budget = report["budget"]
    canaries = report["canaries"]
    base = report["results"]["base"]
    methods = [m for m in report["results"] if m != "base"]
    lr = ", ".join(f"{m} {report['results'][m]['training']['learning_rate']:g}" for m in methods)
    parts = [
        f"# Full fine-tuning vs parameter-efficient tuning: {', '.join(methods)}",
        "",
        f"Base model {report['base']['name']} (`{report['base']['fingerprint'][:23]}…`), "
        f"bedside {report['bedside_version']}, {report['created_at']}.",
        "",
    ]
    if config.get("command"):
        parts += ["Command:", "", "```", config["command"], "```", ""]
    parts += [
        "## Setup",
        "",
        f"- Training data: `{data['train']['path']}` ({data['train']['examples']} examples, sha256 "
        f"`{data['train']['sha256'][:16]}…`), plus {len(canaries['planted'])} canaries × {canaries['repeats']} "
        f"copies = {data['train_with_canaries']['examples']} examples, "
        f"{data['train_with_canaries']['tokens']['all']:,} tokens ({data['train_with_canaries']['tokens']['answer']:,} "
        "answer tokens carry the loss).",
        f"- Budget, identical for every method: {budget['max_steps']} optimizer steps × batch {budget['batch_size']} "
        f"= {budget['examples_seen']} examples ({budget['epochs']} epochs), sequences cut at "
        f"{budget['max_seq_length']} tokens, seed {budget['seed']}. Learning rates: {lr}.",
        f"- Held-out set: `{data['eval']['path']}`, {data['eval']['examples_scored']} examples scored; task "
        f"metric: {METRIC_NAMES.get(base['task']['metric'], base['task']['metric'])}.",
        f"- Forgetting set: `{data['general_text']['path']}` ({data['general_text']['lines']} lines of general "
        "English written for bedside), scored as plain text without the chat template.",
        f"- Canaries: {', '.join(c['kind'] for c in canaries['planted']) or 'none'}; exposure ranks each secret "
        f"among {canaries['candidates']} candidates of its shape; about {canaries['expected_copies_seen']} copies "
        "of each were expected within the training budget.",
        f"- Machine: {report['machine']['cpu_count']} CPUs, {report['machine']['torch_threads']} torch threads, "
        f"device {report['machine']['device']}, torch {report['machine']['torch']}. Total run "
        f"{report['total_seconds']:.0f} s.",
        "",
        "## Results",
        "",
        results_table(report),
        "",
        "Train time is the optimizer loop alone; peak RSS is the training process's maximum resident memory "
        "(each method trains in its own process). Held-out loss is the mean cross-entropy over answer tokens.",
        "",
        "## What the numbers say for the decision",
        "",
    ]
    parts += [f"- {line}" for line in decision_lines(report)]
    parts += [
        "",
        "## Plots",
        "",
        f"![quality vs cost]({PLOTS['quality_vs_cost']})",
        "",
        f"![loss curves]({PLOTS['loss_curves']})",
        "",
        f"![memorization]({PLOTS['memorization']})",
        "",
        "## Artifacts",
        "",
    ]
    for m in methods:
        artifact = report["results"][m]["artifact"]
        parts.append(f"- {m}: `{artifact['path']}`, {_size(artifact['bytes'])}, digest `{artifact['sha256']}`")
        for name, digest in artifact["files"].items():
            parts.append(f"  - `{name}` sha256 `{digest}`")
    parts += ["", "Every number above is in `report.json`.", ""]
    return "\n".join(parts)
