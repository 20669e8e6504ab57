"""`bedside audit export`: the audit log of answers as JSON Lines or CSV."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from assistant.commands import settings_from_args


def register(subparsers: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    from assistant.audit import EXPORT_FORMATS

    audit = subparsers.add_parser("audit", help="read the audit log of answers")
    actions = audit.add_subparsers(dest="audit_command", metavar="ACTION", required=True)

    export = actions.add_parser("export", parents=[common], help="write the audit records as JSONL or CSV")
    export.add_argument("--format", choices=EXPORT_FORMATS, required=True, help="output format")
    export.add_argument("--since", metavar="DATE",
                        help="only records created at or after this date or ISO time; UTC without an offset")
    export.add_argument("--out", type=Path, metavar="FILE",
                        help="write to this file, atomically (default: standard output)")
    export.add_argument("--audit-db", type=Path, metavar="FILE",
                        help="SQLite audit log (default: the audit_db setting, audit.db)")
    export.set_defaults(func=run_export)


def run_export(args: argparse.Namespace) -> int:
    from assistant.audit import AuditLog, parse_since
    from assistant.errors import BedsideError
    from assistant.fileio import atomic_write_text

    since = parse_since(args.since) if args.since else None
    settings = settings_from_args(args, audit_db=args.audit_db)
    if not Path(settings.audit_db).is_file():
        # opening would create an empty database, hiding a mistyped path
        raise BedsideError(f"audit database {str(settings.audit_db)!r} not found; pass --audit-db FILE "
                           "or set audit_db")
    log = AuditLog(settings.audit_db)
    try:
        text = log.export(args.format, since)
    finally:
        log.close()
    if args.out:
        atomic_write_text(args.out, text)
        print(f"wrote {args.format} export to {args.out}", file=sys.stderr)
    else:
        sys.stdout.write(text)
    return 0
