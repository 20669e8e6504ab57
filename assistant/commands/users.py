"""`bedside users add | list | remove`: login accounts for the web UI."""

from __future__ import annotations

import argparse
import getpass
import sys
from pathlib import Path

from assistant.commands import settings_from_args
from assistant.errors import BedsideError


def register(subparsers: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    users = subparsers.add_parser("users", help="manage login accounts of the web UI")
    actions = users.add_subparsers(dest="users_command", metavar="ACTION", required=True)
    file_flag = argparse.ArgumentParser(add_help=False)
    file_flag.add_argument("--users-file", type=Path, metavar="FILE",
                           help="accounts file (default: the users_file setting, bedside_users.json)")

    add = actions.add_parser("add", parents=[common, file_flag],
                             help="create an account (prompts for its password)")
    add.add_argument("name", help="login name: letters, digits, '.', '_', '@' or '-'")
    add.add_argument("--password-stdin", action="store_true",
                     help="read the password from the first line of standard input instead of prompting")
    add.add_argument("--replace", action="store_true", help="set a new password for an existing account")
    add.set_defaults(func=run_add)

    listing = actions.add_parser("list", parents=[common, file_flag], help="print the account names")
    listing.set_defaults(func=run_list)

    remove = actions.add_parser("remove", parents=[common, file_flag], help="delete an account")
    remove.add_argument("name")
    remove.set_defaults(func=run_remove)


def _store(args: argparse.Namespace):
    from assistant.ui.auth import UserStore

    return UserStore(settings_from_args(args, users_file=args.users_file).users_file)


def read_password(from_stdin: bool) -> str:
    """Read the new password from stdin's first line, or prompt twice on the terminal."""
    if from_stdin:
        line = sys.stdin.readline()
        return line.rstrip("\r\n")
    if not sys.stdin.isatty():
        raise BedsideError("no terminal to prompt for the password; pass --password-stdin and pipe it in")
    first = getpass.getpass("New password: ")
    if getpass.getpass("Repeat the password: ") != first:
        raise BedsideError("the two passwords differ; run the command again")
    return first


def run_add(args: argparse.Namespace) -> int:
    from assistant.ui.auth import validate_username

    validate_username(args.name)
    store = _store(args)
    store.set_password(args.name, read_password(args.password_stdin), replace=args.replace)
    print(f"{'updated' if args.replace else 'added'} user {args.name!r} in {store.path}")
    return 0


def run_list(args: argparse.Namespace) -> int:
    store = _store(args)
    if not store.exists():
        raise BedsideError(f"users file {str(store.path)!r} not found; create an account with "
                           "`bedside users add NAME`")
    for name in store.names():
        print(name)
    return 0


def run_remove(args: argparse.Namespace) -> int:
    store = _store(args)
    store.remove(args.name)
    print(f"removed user {args.name!r} from {store.path}")
    return 0
