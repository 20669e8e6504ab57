"""`bedside adapters list | promote | rollback | remove | sync`: the adapter registry.

With the vllm backend configured, `promote` and `rollback` also load and unload adapters in the
running vLLM server, so the served adapters follow the registry without a restart.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from assistant.commands import settings_from_args
from assistant.config import Settings
from assistant.errors import BedsideError


def register(subparsers: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    adapters = subparsers.add_parser("adapters",
                                     help="list, promote, roll back, remove and sync specialty adapters")
    actions = adapters.add_subparsers(dest="adapters_command", metavar="ACTION", required=True)

    listing = actions.add_parser("list", parents=[common], help="show registered adapters")
    listing.add_argument("--json", action="store_true", help="print the registry entries as JSON")
    listing.set_defaults(func=run_list)

    promote = actions.add_parser(
        "promote", parents=[common],
        help="score a candidate against the active adapter (or the base) on held-out data and activate it",
    )
    promote.add_argument("name", help="registered adapter name")
    promote.add_argument("--force", action="store_true", help="activate it even if it scores worse")
    promote.add_argument("--heldout", type=Path, metavar="FILE.jsonl",
                         help="score on these examples instead of the candidate's held-out split")
    add_backend_argument(promote)
    promote.set_defaults(func=run_promote)

    rollback = actions.add_parser(
        "rollback", parents=[common],
        help="retire the active adapter of a specialty and reactivate the one it replaced",
    )
    rollback.add_argument("specialty")
    add_backend_argument(rollback)
    rollback.set_defaults(func=run_rollback)

    sync = actions.add_parser("sync", parents=[common],
                              help="make the vLLM server at vllm_url serve exactly the active adapters")
    sync.set_defaults(func=run_sync)

    remove = actions.add_parser("remove", parents=[common], help="delete a candidate or retired adapter")
    remove.add_argument("name")
    remove.add_argument("--keep-files", action="store_true", help="drop the registry entry but keep its folder")
    remove.set_defaults(func=run_remove)


def add_backend_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--backend", choices=["local", "vllm"],
                        help="with vllm, also load and unload the adapters in the running vLLM server at "
                             "vllm_url (default: the backend setting)")


def run_list(args: argparse.Namespace) -> int:
    from assistant.tuning.registry import AdapterRegistry

    settings = settings_from_args(args)
    entries = AdapterRegistry(settings.adapters_dir).entries()
    if args.json:
        print(json.dumps(entries, indent=2, ensure_ascii=False))
        return 0
    if not entries:
        print(f"no adapters registered in {settings.adapters_dir}")
        return 0
    header = f"{'name':32} {'specialty':20} {'method':6} {'ver':>3} {'status':9} {'held-out loss':>13}  created"
    print(header)
    for entry in entries:
        loss = entry.get("metrics", {}).get("heldout_loss")
        shown = f"{loss:.4f}" if isinstance(loss, (int, float)) else "-"
        print(f"{entry['name']:32} {entry['specialty']:20} {entry['method']:6} {entry.get('version', ''):>3} "
              f"{entry['status']:9} {shown:>13}  {entry.get('created_at', '')}")
    return 0


def run_promote(args: argparse.Namespace) -> int:
    from assistant.tuning.promotion import promote

    settings = settings_from_args(args, backend=args.backend)
    result = promote(settings, args.name, force=args.force, heldout_file=args.heldout)
    incumbent = result.incumbent or "base model"
    note = " (forced: it scores worse)" if result.forced else ""
    print(f"promoted {result.candidate}{note}: held-out loss {result.candidate_score['loss']:.4f} against "
          f"{result.incumbent_score['loss']:.4f} for {incumbent} on {result.evaluation['examples']} examples")
    if settings.backend == "vllm":
        sync_vllm(settings, f"the promotion of {result.candidate}")
    return 0


def run_rollback(args: argparse.Namespace) -> int:
    from assistant.tuning.registry import AdapterRegistry

    settings = settings_from_args(args, backend=args.backend)
    retired, restored = AdapterRegistry(settings.adapters_dir).rollback(args.specialty)
    print(f"{args.specialty}: retired {retired['name']}, active again: {restored['name']}")
    if settings.backend == "vllm":
        sync_vllm(settings, f"the rollback of {args.specialty}")
    return 0


def run_sync(args: argparse.Namespace) -> int:
    sync_vllm(settings_from_args(args), "the active adapters")
    return 0


def sync_vllm(settings: Settings, change: str) -> None:
    """Load and unload adapters in the vLLM server at `settings.vllm_url` to match the registry's active ones.

    Each load and unload is written to the audit log. The registry has already changed when this
    runs, so a server that cannot be reached leaves the two out of step until `bedside adapters sync`.
    """
    from assistant.answer.vllm_backend import VLLMError, sync_adapters
    from assistant.audit import AuditLog
    from assistant.tuning.registry import AdapterRegistry

    audit = AuditLog(settings.audit_db, store_text=settings.store_text)
    try:
        registry = AdapterRegistry(settings.adapters_dir)
        report = sync_adapters(settings.vllm_url, registry, audit=audit, user="cli")
    except VLLMError as err:
        raise BedsideError(
            f"the registry records {change}, but the vLLM server at {settings.vllm_url} was not "
            f"updated: {err}. When the server is reachable, run `bedside adapters sync`"
        ) from err
    finally:
        audit.close()
    if report.changed:
        print(f"vLLM at {settings.vllm_url}: loaded {', '.join(report.loaded) or 'none'}; reloaded "
              f"{', '.join(report.reloaded) or 'none'}; unloaded {', '.join(report.unloaded) or 'none'}")
    else:
        print(f"vLLM at {settings.vllm_url} already serves the active adapters")


def run_remove(args: argparse.Namespace) -> int:
    from assistant.tuning.registry import AdapterRegistry

    settings = settings_from_args(args)
    entry = AdapterRegistry(settings.adapters_dir).remove(args.name, delete_files=not args.keep_files)
    print(f"removed {entry['name']} ({entry['specialty']}, {entry['status']})")
    return 0
