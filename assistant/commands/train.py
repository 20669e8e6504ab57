"""`bedside train`: LoRA, QLoRA or full fine-tuning of the base model on a JSONL file."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from assistant.commands import SETTING_FLAGS
from assistant.tuning.launch import add_launcher_arguments, relaunch_if_requested

if TYPE_CHECKING:
    from assistant.tuning.config import TrainConfig


def register(subparsers: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    # "resolve" lets this command's --config (a YAML training recipe) replace the shared TOML --config
    train = subparsers.add_parser(
        "train", parents=[common], conflict_handler="resolve",
        help="train a specialty adapter (lora, qlora) or a fully fine-tuned model (full)",
        description="Train on a JSONL file of chat ({\"messages\": [...]}) or instruction ({\"instruction\", "
                    "\"input\", \"output\"}) records; the loss covers the answer tokens only. Settings resolve as "
                    "defaults, then --config FILE.yaml, then flags. bedside settings (adapters folder, model) "
                    "come from ./bedside.toml and BEDSIDE_* variables.",
    )
    shared_config = next(a for a in common._actions if "--config" in a.option_strings)
    train.add_argument("--config", metavar="FILE.yaml", help="training settings in YAML; flags override them")
    # "resolve" strips --config from the action shared with every other command; give it back
    shared_config.option_strings[:] = ["--config"]

    # what to train on, and where the output goes
    train.add_argument("--specialty", help="specialty the output serves, e.g. cardiology")
    train.add_argument("--data", metavar="FILE.jsonl", help="training examples, one JSON object a line")
    train.add_argument("--method", choices=["lora", "qlora", "full"],
                       help="lora (default), qlora (4-bit base, CUDA only) or full (update every weight)")
    train.add_argument("--base", metavar="MODEL", help="base model: hub id, folder or .gguf (default: the model "
                                                       "setting, embedded SmolLM2-135M)")
    train.add_argument("--out", metavar="DIR", help="output folder (default: adapters/NAME; full: models/NAME)")
    train.add_argument("--name", help="adapter name (default: SPECIALTY-METHOD-vN)")

    # optimisation
    train.add_argument("--max-steps", type=int, help="stop after N optimizer steps (default: use --epochs)")
    train.add_argument("--epochs", type=float, help="passes over the training split (default: 3)")
    train.add_argument("--seed", type=int, help="random seed (default: 42)")
    train.add_argument("--lr", type=float, help="peak learning rate (default: 2e-4 adapters, 2e-5 full)")
    train.add_argument("--batch-size", type=int, help="examples per step (default: 4)")
    train.add_argument("--grad-accum", type=int, help="gradient accumulation steps (default: 1)")
    train.add_argument("--max-seq-length", type=int, help="tokens per example; longer ones are cut (default: 512)")
    train.add_argument("--eval-fraction", type=float, help="share of examples held out (default: 0.1)")

    # LoRA
    train.add_argument("--lora-r", type=int, help="LoRA rank r (default: 16)")
    train.add_argument("--lora-alpha", type=int, help="LoRA alpha; scaling is alpha / r (default: 32)")
    train.add_argument("--lora-dropout", type=float, help="LoRA dropout (default: 0.05)")
    train.add_argument("--target-modules", nargs="+", metavar="MODULE",
                       help="module names LoRA wraps (default for llama-style models: q_proj k_proj v_proj "
                            "o_proj gate_proj up_proj down_proj)")

    train.add_argument("--gradient-checkpointing", action=argparse.BooleanOptionalAction, default=None,
                       help="recompute activations in the backward pass to save memory")
    train.add_argument("--register", action=argparse.BooleanOptionalAction, default=None,
                       help="add the adapter to adapters/registry.json as a candidate (default: yes)")
    train.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    train.add_argument("--scrub", action="store_true",
                       help="de-identify the training data first and train on the scrubbed copy")
    train.add_argument("--scrub-out", metavar="FILE.jsonl",
                       help="where --scrub writes the scrubbed copy (default: DATA.scrubbed.jsonl beside "
                            "--data)")
    add_launcher_arguments(train)
    train.set_defaults(func=run_train)


def train_config_from_args(args: argparse.Namespace) -> TrainConfig:
    """Resolve the training recipe: defaults, then the YAML file of --config, then flags."""
    from assistant.tuning.config import load_train_config

    overrides = {
        "specialty": args.specialty, "data": args.data, "method": args.method, "base": args.base or args.model,
        "out": args.out, "name": args.name, "max_steps": args.max_steps, "epochs": args.epochs, "seed": args.seed,
        "lr": args.lr, "batch_size": args.batch_size, "grad_accum": args.grad_accum,
        "max_seq_length": args.max_seq_length, "eval_fraction": args.eval_fraction, "lora_r": args.lora_r,
        "lora_alpha": args.lora_alpha, "lora_dropout": args.lora_dropout, "target_modules": args.target_modules,
        "gradient_checkpointing": args.gradient_checkpointing, "register": args.register,
        "device": args.device, "dtype": args.dtype,
    }
    return load_train_config(Path(args.config) if args.config else None, overrides)


def run_train(args: argparse.Namespace) -> int:
    from assistant.config import load_settings
    from assistant.tuning.data import load_examples
    from assistant.tuning.recipes import train

    config = train_config_from_args(args)
    settings = load_settings(None, {name: getattr(args, name, None) for name in SETTING_FLAGS})

    # several processes: the same command is started again under `accelerate launch`
    status = relaunch_if_requested(args)
    if status is not None:
        return status

    if args.scrub:
        scrub_out = Path(args.scrub_out) if args.scrub_out else None
        config.data = str(scrub_training_data(Path(config.data), scrub_out))

    # report bad lines before the model loads; a file with no valid line raises here
    report = load_examples(Path(config.data))
    for number, reason in report.problems:
        print(f"bedside: {config.data}:{number} skipped: {reason}", file=sys.stderr)

    result = train(config, settings, progress=not args.no_progress)
    metrics = result.metrics
    heldout = (f"held-out loss {metrics['heldout_loss']:.4f} (perplexity {metrics['heldout_perplexity']:.2f}; "
               f"base {metrics['base_heldout_loss']:.4f})" if metrics["heldout_loss"] is not None
               else "no held-out examples")
    print(f"trained {result.name} ({result.method}, {result.specialty}): {metrics['steps']} steps in "
          f"{metrics['train_seconds']:.0f} s, {heldout}")
    print(f"saved to {result.output}")
    if result.entry is not None:
        print(f"registered as a candidate; serve it with `bedside adapters promote {result.name}`")
    elif result.method == "full":
        print(f"use it as a base with `bedside train --base {result.output} ...` or `--model {result.output}`")
    return 0


def scrub_training_data(data: Path, target: Path | None) -> Path:
    """Write a de-identified copy of the training data and print what kinds were replaced, how often.

    The copy goes beside the data unless `target` is given. Training and its record then use the
    copy, so the adapter's training record names the file it really learned from.
    """
    from assistant.safety.scrub import scrub_jsonl_file

    target = target or data.with_name(f"{data.stem}.scrubbed.jsonl")
    problems: list[tuple[int, str]] = []
    report = scrub_jsonl_file(data, target, problems)
    for number, reason in problems:
        print(f"bedside: {data}:{number} skipped: {reason}", file=sys.stderr)
    print(f"scrubbed {data} into {target}: {report.summary()}")
    return target
