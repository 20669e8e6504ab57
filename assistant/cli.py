"""The `bedside` command: argument parsing and dispatch only.

Each command group lives in `assistant/commands/<name>.py` with a `register(subparsers, common)`
function; the work itself happens in the library modules those commands call.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
from collections.abc import Sequence

from assistant import __version__
from assistant.errors import BedsideError

# One module per command group; each registers its own subcommands.
COMMAND_MODULES = [
    "assistant.commands.index",
    "assistant.commands.search",
    "assistant.commands.ask",
    "assistant.commands.train",
    "assistant.commands.adapters",
    "assistant.commands.audit",
    "assistant.commands.users",
    "assistant.commands.draft",
    "assistant.commands.evaluate",
    "assistant.commands.scrub",
    "assistant.commands.export",
]


def common_parser() -> argparse.ArgumentParser:
    """Options every command that loads settings accepts; they override bedside.toml and BEDSIDE_*."""
    common = argparse.ArgumentParser(add_help=False)
    group = common.add_argument_group("settings")
    group.add_argument("--config", metavar="FILE", help="TOML settings file (default: ./bedside.toml if present)")
    group.add_argument("--index", dest="index_dir", metavar="DIR", help="index folder (default: index/)")
    group.add_argument("--model", metavar="NAME_OR_PATH", help="base LM: hub id, folder or .gguf file")
    group.add_argument("--embedder", metavar="NAME_OR_PATH", help="sentence-transformers model id or folder")
    group.add_argument("--device", choices=["auto", "cpu", "cuda"], help="where models run (default: auto)")
    group.add_argument("--dtype", choices=["auto", "float32", "bfloat16", "float16"],
                       help="base model dtype (default: auto = bf16 where the CPU is faster with it)")
    group.add_argument("-q", "--quiet", action="store_true", help="log warnings and errors only")
    group.add_argument("-v", "--verbose", action="store_true", help="log debug detail")
    return common


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="bedside",
        description="Clinical assistant: guideline retrieval, specialty adapters and cited answers.",
    )
    parser.add_argument("--version", action="version", version=f"bedside {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    common = common_parser()
    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as err:
            if err.name == name:
                continue
            raise
        module.register(subparsers, common)
    return parser


def configure_logging(args: argparse.Namespace) -> None:
    level = logging.INFO
    if getattr(args, "quiet", False):
        level = logging.WARNING
    if getattr(args, "verbose", False):
        level = logging.DEBUG
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    # library chatter that is not ours stays at warning level
    for noisy in ("transformers", "sentence_transformers", "httpx", "urllib3", "bm25s", "faiss", "peft"):
        logging.getLogger(noisy).setLevel(max(level, logging.WARNING))
    # Presidio warns once per recognizer of every language it does not load; bedside loads English only.
    logging.getLogger("presidio-analyzer").setLevel(max(level, logging.ERROR))
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        import transformers

        transformers.logging.set_verbosity_error()
        transformers.utils.logging.disable_progress_bar()
    except ImportError:
        pass


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help(sys.stderr)
        return 2
    configure_logging(args)
    try:
        return int(args.func(args) or 0)
    except BedsideError as err:
        print(f"bedside: error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("bedside: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 0
    except OSError as err:
        # A file operation no command checks for (a folder turned read-only, a disk filled up mid-run)
        # still ends in one line naming the file and the fix rather than a traceback.
        where = f" on {err.filename!r}" if err.filename else ""
        print(f"bedside: error: {err.strerror or err}{where}; check that the path exists and is writable and "
              "that the disk has free space, then rerun", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
