"""Start the clinician web UI: `python launch.py [--host HOST] [--port PORT] [--config FILE]`.

The server listens on 127.0.0.1 unless --host names another address, and every page needs a login from the
users file. When that file is missing, the first start on a loopback address creates one local
account and prints its random password once; any other address requires accounts made beforehand
with `bedside users add NAME`.
"""

from __future__ import annotations

import argparse
import ipaddress
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

# Gradio's usage analytics and version check would call out to the internet; answers may concern patients.
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from assistant.cli import common_parser, configure_logging  # noqa: E402
from assistant.commands import settings_from_args  # noqa: E402
from assistant.errors import BedsideError  # noqa: E402

if TYPE_CHECKING:
    from assistant.config import Settings
    from assistant.ui.auth import UserStore

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 7860


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="launch.py", parents=[common_parser()],
        description="Serve the bedside clinician UI: streamed answers with their sources, behind a login.",
    )
    parser.add_argument("--host", default=DEFAULT_HOST,
                        help="address to listen on (default: 127.0.0.1; another address needs a users file)")
    parser.add_argument("--port", type=int, default=DEFAULT_PORT, help="TCP port (default: 7860)")
    parser.add_argument("--users-file", type=Path, metavar="FILE",
                        help="login accounts (default: the users_file setting, bedside_users.json)")
    parser.add_argument("--audit-db", type=Path, metavar="FILE",
                        help="SQLite audit log (default: the audit_db setting, audit.db)")
    parser.add_argument("--no-store-text", action="store_true",
                        help="store only sha256 hashes of questions and answers in the audit log")
    parser.add_argument("--max-new-tokens", type=int, metavar="N",
                        help="generation budget per answer, in tokens (default: the max_new_tokens setting)")
    return parser


def resolve_settings(args: argparse.Namespace) -> Settings:
    """Resolve settings from the config file, BEDSIDE_* variables and this script's flags."""
    if not 0 < args.port < 65536:
        raise BedsideError(f"port {args.port} is invalid; use a number from 1 to 65535")
    return settings_from_args(
        args, users_file=args.users_file, audit_db=args.audit_db, max_new_tokens=args.max_new_tokens,
        store_text=False if args.no_store_text else None,
    )


def is_loopback(host: str) -> bool:
    """True for localhost and loopback IP addresses; other host names count as reachable from outside."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def prepare_accounts(users: UserStore, host: str) -> tuple[str, str] | None:
    """Check the users file before anything heavy loads; create the first account where allowed.

    Returns (name, password) of a newly created account, else None.
    """
    from assistant.ui.auth import create_first_account

    if users.exists():
        if not users.names():
            raise BedsideError(f"users file {str(users.path)!r} has no accounts; "
                               "add one with `bedside users add NAME`")
        return None
    if not is_loopback(host):
        raise BedsideError(f"refusing to listen on {host!r} without a users file ({str(users.path)!r}): "
                           "create accounts first with `bedside users add NAME`, or use --host 127.0.0.1")
    return create_first_account(users)


def launch(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    configure_logging(args)
    # before the model loads and the server starts its threads, so every later arena obeys the cap
    from assistant.ui.app import cap_malloc_arenas

    cap_malloc_arenas()
    try:
        settings = resolve_settings(args)
        from assistant.ui.auth import UserStore

        users = UserStore(settings.users_file)
        created = prepare_accounts(users, args.host)
        if created:
            name, password = created
            # shown this once, like a notebook server's token; the file keeps only a salted hash
            print(f"\nCreated login account {name!r} in {settings.users_file} with password:\n\n"
                  f"    {password}\n\nIt is not shown again. "
                  f"Change it with `bedside users add {name} --replace`.\n", flush=True)

        from assistant.answer.pipeline import build_assistant
        from assistant.ui.app import build_app, launch_options

        assistant = build_assistant(settings)
        app = build_app(assistant)
        try:
            app.launch(server_name=args.host, server_port=args.port, auth=users.verify,
                       auth_message="Sign in with your bedside account.", **launch_options())
        except OSError as err:
            raise BedsideError(f"cannot listen on {args.host}:{args.port} ({err}); "
                               "choose another --port or stop the program using it") from err
    except BedsideError as err:
        print(f"launch.py: error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(launch())
