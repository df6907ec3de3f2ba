"""``fhirvault retention run`` and ``fhirvault patient erase|restrict|unrestrict|hold|release|status``.

The same rules as the HTTP operations (services/erasure.py): a reason is required, erasure is refused
under a retention rule or a legal hold (exit 3, naming the rule and the date), and every change is
recorded in the audit trail as a system event of the operator named by ``--operator``.
"""

from __future__ import annotations

import argparse
import getpass
import json
import sys
from collections.abc import Callable
from typing import Any

from fhirvault.config import Settings

COMMANDS = ("retention", "patient")
REFUSED = 3


def register(sub: Any, settings_options: Callable[[argparse.ArgumentParser], None]) -> None:
    p = sub.add_parser("retention", help="retention of records: run the retention job")
    rsub = p.add_subparsers(dest="retention_command", required=True)
    run = rsub.add_parser("run", help="find records past retention; erase them if [retention] auto_erase is on")
    settings_options(run)
    run.add_argument("--dry-run", action="store_true", help="report only: erase nothing")
    run.add_argument("--json", action="store_true", help="print the report as JSON")

    p = sub.add_parser("patient", help="GDPR lifecycle of one patient: erase, restrict, legal hold")
    psub = p.add_subparsers(dest="patient_command", required=True)
    for name, text in (("erase", "erase the patient by crypto-shredding their data key (irreversible)"),
                       ("restrict", "restrict processing (GDPR art. 18): stored, not read by clinical clients"),
                       ("unrestrict", "lift the restriction of processing"),
                       ("hold", "put the patient's record under a legal hold (blocks erasure and purge)"),
                       ("release", "release the legal hold"),
                       ("status", "show the patient's restriction, legal hold and retention date")):
        c = psub.add_parser(name, help=text)
        settings_options(c)
        c.add_argument("--id", dest="patient_id", required=True, help="the Patient resource id")
        if name != "status":
            c.add_argument("--reason", required=True, help="why (10 to 2000 characters; audited)")
            c.add_argument("--operator", default=None, help="who asks (default: the OS user); audited")
        if name == "erase":
            c.add_argument("--override-retention", action="store_true",
                           help="erase although a retention rule still runs (the law allows it, e.g. unlawful"
                                " processing); a legal hold is never overridden")


def run(args: argparse.Namespace, settings: Settings) -> int:
    from fhirvault.container import build
    from fhirvault.domain.errors import OperationOutcomeError
    from fhirvault.domain.instants import instant
    from fhirvault.services.erasure import ErasureRefused

    container = build(settings)
    try:
        lc = container.lifecycle
        assert lc is not None
        if args.command == "retention":
            from fhirvault.services.retention import RetentionJob

            report = RetentionJob(container.store, lc, container.audit, container.clock, lc.rules).run(
                dry_run=args.dry_run)
            if args.json:
                print(json.dumps(report.__dict__))
            else:
                print(report.summary())
                for due in report.patients_due:
                    print(f"  past retention: Patient/{due}")
            return 0
        pid: str = args.patient_id
        if args.patient_command == "status":
            state, kept = lc.state(pid), lc.retention(pid)
            print(json.dumps({"patient": f"Patient/{pid}", "restricted": state.restricted,
                              "legal_hold": state.legal_hold, "details": state.details,
                              "retained_until": instant(kept.until_ms) if kept else None,
                              "retention_rule": kept.rule if kept else None}, indent=2))
            return 0
        return _change(container, pid, args)
    except ErasureRefused as exc:
        print(f"fhirvault: refused: {exc.issues[0].diagnostics}", file=sys.stderr)
        return REFUSED
    except OperationOutcomeError as exc:
        print(f"fhirvault: error: {exc.issues[0].diagnostics}", file=sys.stderr)
        return 2
    finally:
        container.close()


def _change(container: Any, pid: str, args: argparse.Namespace) -> int:
    import asyncio

    from fhirvault.services.audit import AuditRecord
    from fhirvault.services.erasure import HOLD, RESTRICTED, check_reason

    lc = container.lifecycle
    reason = check_reason(args.reason)
    operator = args.operator or getpass.getuser()
    now = container.clock.now_ms()
    interaction = "gdpr-" + args.patient_command
    entity = f"Patient/{pid}"

    def record(detail: str) -> AuditRecord:
        return AuditRecord(now, interaction, "0", 200, "cli", entity=entity, patient=entity, user=operator,
                           detail=detail, category="system")

    if args.patient_command == "erase":
        forced = " (retention overridden)" if args.override_retention else ""
        result = lc.erase_sync(pid, lambda r: record(f"erased{forced}: key {r.key_id}, {r.resources} resources,"
                                                     f" {r.versions} versions; reason: {reason}"),
                               override_retention=args.override_retention)
        if result.key_id is None:
            print(f"Patient/{pid} has no data in this tenant: nothing to erase")
        else:
            print(f"Patient/{pid} erased: data key {result.key_id} destroyed, {result.resources} resources and "
                  f"{result.versions} versions deleted; the erasure ledger now lists the key")
        return 0
    flag, on = {"restrict": (RESTRICTED, True), "unrestrict": (RESTRICTED, False), "hold": (HOLD, True),
                "release": (HOLD, False)}[args.patient_command]
    what = "restriction" if flag == RESTRICTED else "legal hold"
    state = asyncio.run(lc.set_flag(pid, flag, on, reason, operator,
                                    record(f"{what} {'on' if on else 'off'}: {reason}")))
    print(f"Patient/{pid}: restricted={state.restricted} legal_hold={state.legal_hold}")
    return 0
