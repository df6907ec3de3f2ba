"""``fhirvault register ...``: the compliance registers from the command line (DPO, security officer).

* ``register incident open --alert ID --reason TEXT`` (or ``--title TEXT [--detected ISO]``), ``incident update
  --id ID --reason TEXT [--status notified|closed] [--breach yes|no] [--notified ISO] [--authority-ref REF]``,
  ``incident list``, ``incident show --id ID``;
* ``register request open --type access --subject TEXT --reason TEXT [--received ISO] [--patient Patient/ID]``,
  ``request update --id ID --reason TEXT [--status extended|done|refused] [--outcome TEXT]``, ``request list``,
  ``request show --id ID``;
* ``register processing|actors|residency``: the generated registers, as JSON.

Every change is audited with its reason and ``--by`` (default: the login name running the command).
"""

from __future__ import annotations

import argparse
import getpass
import json
import sys
from collections.abc import Callable
from typing import Any

from fhirvault.config import Settings


def register(sub: Any, settings_options: Callable[[argparse.ArgumentParser], None]) -> None:
    p = sub.add_parser("register", help="compliance registers: incidents, data-subject requests, art. 30 record")
    rsub = p.add_subparsers(dest="register_command", required=True)
    for name, text in (("processing", "the record of processing (GDPR art. 30), generated, as JSON"),
                       ("actors", "processors and subcontractors (art. 28) with what they reach, as JSON"),
                       ("residency", "every destination with its country, and the outbound allow-list, as JSON")):
        settings_options(rsub.add_parser(name, help=text))

    def change_options(q: argparse.ArgumentParser) -> None:
        settings_options(q)
        q.add_argument("--reason", required=True, help="why (recorded in the entry and the audit trail)")
        q.add_argument("--by", default=None, help="who makes the change (default: the login name)")

    inc = rsub.add_parser("incident", help="the breach / incident register (72-hour notification clock)")
    isub = inc.add_subparsers(dest="entry_command", required=True)
    q = isub.add_parser("open", help="open an incident from an alert id (or by hand with --title)")
    change_options(q)
    q.add_argument("--alert", help="the alert id (its first detection starts the 72-hour clock)")
    q.add_argument("--title", help="a title (required without --alert)")
    q.add_argument("--detected", help="detection time, ISO 8601 (default: the alert's, or now)")
    q = isub.add_parser("update", help="add a note; change status or breach assessment")
    change_options(q)
    q.add_argument("--id", required=True, help="the incident id (inc-…)")
    q.add_argument("--status", choices=["notified", "closed"], help="notified: the authority was told; closed:"
                   " assessed, nothing (more) to notify")
    q.add_argument("--breach", choices=["yes", "no"], help="is it a personal-data breach?")
    q.add_argument("--notified", help="when the authority was notified, ISO 8601 (default: now)")
    q.add_argument("--authority-ref", dest="authority_ref", help="the authority's notification reference")

    req = rsub.add_parser("request", help="data-subject requests (one-month deadline)")
    qsub = req.add_subparsers(dest="entry_command", required=True)
    q = qsub.add_parser("open", help="record a request received")
    change_options(q)
    q.add_argument("--type", required=True, choices=["access", "rectification", "erasure", "portability",
                                                      "restriction", "objection"],
                   help="the right exercised (GDPR art. 15-21)")
    q.add_argument("--subject", required=True, help="who asked (name or reference; stored encrypted)")
    q.add_argument("--received", help="when it was received, ISO 8601 (default: now)")
    q.add_argument("--patient", help="Patient/<id> when known")
    q = qsub.add_parser("update", help="add a note; extend (two months, once) or close")
    change_options(q)
    q.add_argument("--id", required=True, help="the request id (dsr-…)")
    q.add_argument("--status", choices=["extended", "done", "refused"],
                   help="extended: two more months (once; --reason is the justification); done or refused: closed")
    q.add_argument("--outcome", help="what was done (closing)")
    for parent in (isub, qsub):
        q = parent.add_parser("list", help="list the entries, newest first")
        settings_options(q)
        q.add_argument("--status", help="only the entries with this status")
        q.add_argument("--json", action="store_true", help="one JSON object per line")
        q = parent.add_parser("show", help="one entry as JSON")
        settings_options(q)
        q.add_argument("--id", required=True, help="the entry id")


def _fail(message: str) -> int:
    print(f"fhirvault: error: {message}", file=sys.stderr)
    return 2


def run(args: argparse.Namespace, settings: Settings) -> int:
    from fhirvault.container import build
    from fhirvault.services.registers import RegisterError

    container = build(settings)
    try:
        return _run(args, container)
    except RegisterError as exc:
        return _fail(str(exc))
    finally:
        container.close()


def _print(doc: Any) -> int:
    print(json.dumps(doc, indent=2, ensure_ascii=False))
    return 0


def _run(args: argparse.Namespace, c: Any) -> int:
    from fhirvault.services.registers import RegisterService, actors_register, record_of_processing
    from fhirvault.services.residency import allowed_hosts, destinations

    command = args.register_command
    if command == "processing":
        return _print(record_of_processing(c))
    if command == "actors":
        return _print({"actors": actors_register(c)})
    if command == "residency":
        return _print({"country": c.settings.country, "destinations": [d.to_json() for d in destinations(c.settings)],
                       "outbound_allowed": sorted(allowed_hosts(c.settings))})
    svc = RegisterService(c)
    now = c.clock.now_ms()
    sub = args.entry_command
    by = getattr(args, "by", None) or f"cli:{getpass.getuser()}"
    if command == "incident":
        if sub == "open":
            return _print(svc.open_incident(actor=by, reason=args.reason, alert_id=args.alert, title=args.title,
                                            detected=args.detected).to_json(now))
        if sub == "update":
            breach = None if args.breach is None else args.breach == "yes"
            return _print(svc.update_incident(args.id, actor=by, reason=args.reason, status=args.status,
                                              personal_data_breach=breach, notified=args.notified,
                                              authority_reference=args.authority_ref).to_json(now))
        if sub == "show":
            return _print(svc.incident(args.id).to_json(now))
        rows = [i.to_json(now) for i in svc.incidents(args.status)]
        return _list(rows, args.json, ("id", "status", "detected", "notificationDue", "overdue", "title"))
    if sub == "open":
        return _print(svc.open_request(actor=by, type=args.type, subject=args.subject, reason=args.reason,
                                       received=args.received, patient=args.patient).to_json(now))
    if sub == "update":
        return _print(svc.update_request(args.id, actor=by, reason=args.reason, status=args.status,
                                         outcome=args.outcome).to_json(now))
    if sub == "show":
        return _print(svc.request(args.id).to_json(now))
    rows = [r.to_json(now) for r in svc.requests(args.status)]
    return _list(rows, args.json, ("id", "type", "status", "received", "due", "overdue"))


def _list(rows: list[dict[str, Any]], as_json: bool, columns: tuple[str, ...]) -> int:
    if as_json:
        for row in rows:
            print(json.dumps(row, ensure_ascii=False))
        return 0
    print("\t".join(c.upper() for c in columns))
    for row in rows:
        print("\t".join("OVERDUE" if c == "overdue" and row[c] else "" if c == "overdue" else str(row.get(c) or "-")
                        for c in columns))
    return 0
