"""Run `bedside train` on several processes under `accelerate launch`: DDP, FSDP or DeepSpeed.

`bedside train ... --launcher accelerate --num-processes N` re-invokes the same command line, less
the launcher flags, as N processes started by `accelerate launch` with a preset from
`configs/accelerate/`. Each process runs the ordinary training recipe. The transformers Trainer in
it joins the process group that the launcher set up (gloo on CPU, NCCL on CUDA) and gives each
process its own share of the training data. The artifact and registry entry therefore have the
same format as a single-process run.

Each process runs `python -m assistant.tuning.launch train ...` (see `main`). Rank 0 writes the
artifact and the registry entry where the command asked. The other ranks write theirs to a
temporary folder that is deleted afterwards, so two processes never race to rename or register
the same adapter.
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import socket
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

from assistant.errors import BedsideError

logger = logging.getLogger(__name__)

LAUNCHERS = ("none", "accelerate")
# Presets ship in the repository, next to the package; an installed wheel has none, so pass a file.
PRESET_DIR = Path(__file__).resolve().parents[2] / "configs" / "accelerate"
CPU_PRESET = "ddp_cpu.yaml"
CUDA_PRESET = "ddp_gpu.yaml"
LAUNCHER_FLAGS_WITH_VALUE = ("--launcher", "--num-processes", "--accelerate-config")


def add_launcher_arguments(parser: argparse.ArgumentParser) -> None:
    """Add --launcher, --num-processes and --accelerate-config to the `train` parser."""
    parser.add_argument(
        "--launcher",
        choices=LAUNCHERS,
        default="none",
        help="none: train in this process (default); accelerate: start --num-processes "
        "processes under `accelerate launch`",
    )
    parser.add_argument(
        "--num-processes",
        type=int,
        default=2,
        metavar="N",
        help="processes for --launcher accelerate: CPU processes or GPUs (default: 2)",
    )
    parser.add_argument(
        "--accelerate-config",
        type=Path,
        metavar="FILE.yaml",
        help="accelerate config for --launcher accelerate (default: configs/accelerate/"
        f"{CPU_PRESET} on CPU, {CUDA_PRESET} on CUDA)",
    )


def relaunch_if_requested(args: argparse.Namespace, argv: Sequence[str] | None = None) -> int | None:
    """Run the command under `accelerate launch` when --launcher accelerate was given; return its exit status.

    Returns None when the command should train in this process. `argv` is the full command line after
    the program name (default: `sys.argv[1:]`).
    """
    if getattr(args, "launcher", "none") != "accelerate":
        return None
    return relaunch(
        list(sys.argv[1:] if argv is None else argv),
        args.num_processes,
        args.accelerate_config,
        getattr(args, "device", None) or "auto",
    )


def relaunch(
    argv: list[str], num_processes: int, config_file: Path | None = None, device: str = "auto"
) -> int:
    """Start `accelerate launch` on `bedside <argv>` (less the launcher flags) and wait for it."""
    import importlib.util

    # settings first: nothing heavy starts before they are known to be valid
    if num_processes < 1:
        raise BedsideError(f"--num-processes {num_processes} is invalid; use a whole number of at least 1")
    if importlib.util.find_spec("accelerate") is None:
        raise BedsideError(
            "--launcher accelerate needs the accelerate package; install it with `pip install "
            "accelerate` or drop --launcher"
        )
    cpu = _runs_on_cpu(device)
    if config_file is not None:
        config = Path(config_file)
    else:
        config = PRESET_DIR / (CPU_PRESET if cpu else CUDA_PRESET)
    if not config.is_file():
        raise BedsideError(
            f"accelerate config {str(config)!r} not found; pass one with --accelerate-config "
            "(presets are in configs/accelerate/ of the bedside repository)"
        )
    argv = strip_launcher_flags(argv)
    if not argv or argv[0] != "train":
        raise BedsideError("--launcher accelerate applies to `bedside train` only")

    # launch
    command = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--config_file",
        str(config),
        "--num_processes",
        str(num_processes),
        "--main_process_port",
        str(_free_port()),
        "-m",
        "assistant.tuning.launch",
        *argv,
    ]
    env = dict(os.environ)
    if cpu:
        # accelerate 1.16 starts MULTI_CPU runs through mpirun only, so the CPU preset goes through
        # torchrun instead. This variable then makes each process join a gloo group on the CPU.
        env["ACCELERATE_USE_CPU"] = "true"
        env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // num_processes)))
    logger.info("starting %d training processes: %s", num_processes, " ".join(command))
    try:
        completed = subprocess.run(command, env=env, check=False)
    except OSError as err:
        raise BedsideError(
            f"could not start accelerate launch ({err}); check that {sys.executable} runs"
        ) from err
    if completed.returncode != 0:
        raise BedsideError(
            f"`accelerate launch` with {num_processes} processes failed with exit status "
            f"{completed.returncode}; the processes' errors are printed above"
        )
    return 0


def strip_launcher_flags(argv: Sequence[str]) -> list[str]:
    """Return `argv` without the launcher flags, in both the `--flag value` and `--flag=value` forms."""
    out: list[str] = []
    skip = False
    for item in argv:
        if skip:
            skip = False
            continue
        if item in LAUNCHER_FLAGS_WITH_VALUE:
            skip = True
            continue
        if item.startswith(tuple(flag + "=" for flag in LAUNCHER_FLAGS_WITH_VALUE)):
            continue
        out.append(item)
    return out


def _runs_on_cpu(device: str) -> bool:
    if device == "cpu":
        return True
    import torch

    return not torch.cuda.is_available()


def _free_port() -> int:
    # accelerate's default rendezvous port 29500 collides when two runs share a machine
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def process_rank() -> int:
    """This process's global rank under torchrun/accelerate (0 when not distributed)."""
    return int(os.environ.get("RANK", os.environ.get("LOCAL_RANK", "0")))


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of each launched process: run `bedside train`, writing outputs from rank 0 only."""
    from assistant.cli import main as cli_main

    argv = list(sys.argv[1:] if argv is None else argv)
    rank = process_rank()
    if rank == 0:
        return cli_main(argv)

    # the other ranks train identically but keep nothing: their copy goes to a folder deleted below
    scratch = Path(tempfile.mkdtemp(prefix=f"bedside-rank{rank}-"))
    try:
        return cli_main([*argv, "--out", str(scratch / "output"), "--no-register"])
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
