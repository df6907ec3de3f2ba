"""The live compliance report: HDS 2.0, ISO/IEC 27001:2022 Annex A and GDPR art. 32 controls, each with
evidence read from the running instance (not from a questionnaire).

``build_report(container) -> Report`` reads the instance: key versions and ages, users' MFA, backups and
drills (audit trail, drill reports), audit verification, open alerts, registers, residency, retention,
separation of duties, break-the-glass reviews. ``render_html(report, lang)`` and ``render_pdf(report, lang)``
format it in French or English. Each line: control ids, requirement, status (met / partial / not met /
not available) and the evidence with where it is read (an admin endpoint or a metric), so an auditor can
check it on the instance.

The CLI (``fhirvault compliance report``) and ``GET /admin/compliance/report(.html|.pdf)`` use these.
Optional sources from other parts of the software are read if present and shown as "not available"
otherwise: access reviews (``fhirvault.services.access_reviews.latest_review(container)``) and clinical
retention settings (``settings.retention``).
"""

from __future__ import annotations

import dataclasses
import html
import json
import re
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from fhirvault import __version__

if TYPE_CHECKING:
    from fhirvault.container import Container

MET, PARTIAL, NOT_MET, NOT_AVAILABLE = "met", "partial", "not met", "not available"
KEY_MAX_AGE_DAYS = 365  # a tenant key older than this is due for rotation
BACKUP_MAX_AGE_S = 48 * 3600  # without a schedule, a backup older than this is stale
DRILL_MAX_AGE_S = 35 * 86400  # a restore drill at least monthly (plus some slack)
_AUDIT_SCAN = 20_000  # newest audit entries read for the last backup/drill events


@dataclass(frozen=True, slots=True)
class Evidence:
    text: str  # a value read from the instance (language-neutral: numbers, ids, dates)
    source: str  # where it is read: an admin endpoint, a metric, a file


@dataclass(frozen=True, slots=True)
class Control:
    key: str
    refs: tuple[str, ...]  # e.g. ("ISO 27001 A.8.24", "HDS 2.0", "GDPR 32(1)(a)")
    requirement: dict[str, str]  # lang -> text
    status: str
    evidence: tuple[Evidence, ...]


@dataclass(frozen=True, slots=True)
class Report:
    generated_ms: int
    instance: str
    version: str
    mode: str
    tenant: str
    controls: tuple[Control, ...]
    facts: dict[str, Any] = field(default_factory=dict)

    def counts(self) -> dict[str, int]:
        out = {MET: 0, PARTIAL: 0, NOT_MET: 0, NOT_AVAILABLE: 0}
        for c in self.controls:
            out[c.status] += 1
        return out

    def to_json(self) -> dict[str, Any]:
        return {"generated": _iso(self.generated_ms), "instance": self.instance, "version": self.version,
                "mode": self.mode, "tenant": self.tenant, "summary": self.counts(),
                "controls": [{"key": c.key, "refs": list(c.refs), "requirement": c.requirement, "status": c.status,
                              "evidence": [{"text": e.text, "source": e.source} for e in c.evidence]}
                             for c in self.controls]}


def _iso(ms: float | None) -> str:
    return "-" if ms is None else datetime.fromtimestamp(ms / 1000, UTC).strftime("%Y-%m-%d %H:%M UTC")


def _days(ms: float) -> float:
    return round(ms / 86_400_000, 1)


# -- evidence gathering ------------------------------------------------------------------------------

def _keys(c: Container, now: int) -> Control:
    rows = c.store.tenant_keys(c.settings.tenant)
    ev = [Evidence(f"root key id {c.root.active_key_id} (file {c.settings.root_key_path.name})",
                   "fhirvault keys rotate --level root")]
    status = NOT_MET
    if rows:
        active = rows[-1]
        age = now - active.created_ms if active.created_ms > 0 else None
        ev.append(Evidence(f"tenant key version {active.version} of {len(rows)}, created {_iso(active.created_ms)}"
                           + (f", age {_days(age)} days" if age is not None else ""),
                           "metric fhirvault_key_age_seconds"))
        if len(rows) > 1:
            ev.append(Evidence(f"last rotation {_iso(active.created_ms)} (previous version created"
                               f" {_iso(rows[-2].created_ms)})", "metric fhirvault_key_age_seconds"))
        status = MET if age is not None and age <= KEY_MAX_AGE_DAYS * 86_400_000 else PARTIAL
    ev.append(Evidence("AES-256-GCM per-patient data keys; blind-index search tags", "docs/security-model.md"))
    return Control("encryption", ("HDS 2.0 (chiffrement)", "ISO 27001 A.8.24", "GDPR 32(1)(a)"),
                   {"en": f"Data encrypted at rest; keys rotated at least every {KEY_MAX_AGE_DAYS} days",
                    "fr": f"Données chiffrées au repos ; clés renouvelées au moins tous les {KEY_MAX_AGE_DAYS} jours"},
                   status, tuple(ev))


def _mfa(c: Container) -> Control:
    from fhirvault.services.identity_types import MFA_REQUIRED

    staff = [u for u in c.store.users(c.settings.tenant) if not u.disabled and u.role in MFA_REQUIRED]
    totp = sum(1 for u in staff if u.totp is not None)
    federated = sum(1 for u in staff if u.totp is None and u.password_hash is None)
    covered = totp + federated
    status = MET if covered == len(staff) else PARTIAL if covered else NOT_MET
    ev = (Evidence(f"{covered} of {len(staff)} active professional accounts with a second factor ({totp} TOTP,"
                   f" {federated} through an identity provider)", "fhirvault user list"),
          Evidence(f"{len(c.settings.identity_providers)} identity provider(s) configured", "fhirvault.toml"))
    return Control("mfa", ("HDS 2.0 (authentification forte)", "ISO 27001 A.8.5", "GDPR 32(1)(b)"),
                   {"en": "Strong (multi-factor) authentication of every professional account",
                    "fr": "Authentification forte (multifacteur) de chaque compte professionnel"}, status, ev)


def _system_events(c: Container, interactions: set[str]) -> dict[str, dict[str, Any]]:
    """The newest audit system event of each interaction (successful ones), scanning recent entries."""
    from fhirvault.ports import AuditQuery

    found: dict[str, dict[str, Any]] = {}
    before: int | None = None
    scanned = 0
    while scanned < _AUDIT_SCAN and len(found) < len(interactions):
        rows = c.store.audit_find(AuditQuery(c.settings.tenant, before_seq=before, descending=True, limit=1000))
        if not rows:
            break
        for row in rows:
            doc = c.audit.decrypt(row.seq, row.ts_ms, row.blob)
            name = doc.get("interaction")
            if name in interactions and name not in found and int(doc.get("status", 500)) < 400:
                found[name] = {**doc, "ts_ms": row.ts_ms}
        scanned += len(rows)
        before = rows[-1].seq
    return found


def _drill_reports(c: Container) -> list[dict[str, Any]]:
    folder = c.settings.data_dir / "dr-drills"
    out = []
    for path in sorted(folder.glob("dr-drill-*.json")) if folder.is_dir() else ():
        try:
            out.append({**json.loads(path.read_text()), "_file": path.name})
        except (OSError, ValueError):
            continue
    return out


def _backups(c: Container, now: int, events: dict[str, dict[str, Any]]) -> list[Control]:
    b = c.settings.backup
    last = events.get("backup")
    ev = [Evidence(f"{len(b.targets)} target(s): " + ", ".join(f"{n} ({t.location})" for n, t in b.targets.items())
                   if b is not None and b.targets else "no backup target configured", "fhirvault.toml [backup]")]
    interval = b.schedule.interval_seconds if b is not None else 0
    ev.append(Evidence(f"schedule every {interval // 60} min" if interval else "no schedule in the server",
                       "fhirvault.toml [backup]"))
    if last is not None:
        ev.append(Evidence(f"last backup {_iso(last['ts_ms'])}: {last.get('detail', '')}",
                           "audit trail (AuditEvent, interaction backup); metric"
                           " fhirvault_backup_last_success_timestamp_seconds"))
    else:
        ev.append(Evidence(f"no successful backup among the newest {_AUDIT_SCAN} audit entries",
                           "audit trail (AuditEvent, interaction backup)"))
    limit = max(2 * interval, 3600) if interval else BACKUP_MAX_AGE_S
    fresh = last is not None and (now - last["ts_ms"]) / 1000 <= limit
    status = MET if fresh and b is not None and b.targets else PARTIAL if last is not None or b else NOT_MET
    backup = Control("backup", ("HDS 2.0 (sauvegarde)", "ISO 27001 A.8.13", "GDPR 32(1)(c)"),
                     {"en": "Encrypted backups, recent, on declared targets",
                      "fr": "Sauvegardes chiffrées, récentes, sur des cibles déclarées"}, status, tuple(ev))
    reports = _drill_reports(c)
    drill_ev: list[Evidence] = []
    ok = [r for r in reports if r.get("ok")]
    if ok:
        r = ok[-1]
        drill_ev.append(Evidence(f"last passed drill {r.get('started')}: backup {r.get('backup_id')} restored,"
                                 f" RPO {float(r.get('rpo_seconds', 0)):.1f} s, RTO {float(r.get('rto_seconds', 0)):.1f} s,"
                                 f" {r.get('resources')} resources, counts match {r.get('served_counts_match')}",
                                 f"DATA_DIR/dr-drills/{r['_file']}; metrics fhirvault_dr_drill_rpo_seconds,"
                                 " fhirvault_dr_drill_rto_seconds"))
    failed = [r for r in reports if not r.get("ok")]
    if failed:
        drill_ev.append(Evidence(f"{len(failed)} failed drill(s), last {failed[-1].get('started')}",
                                 f"DATA_DIR/dr-drills/{failed[-1]['_file']}"))
    drill_event = events.get("dr-drill")
    if drill_event is not None:
        drill_ev.append(Evidence(f"{_iso(drill_event['ts_ms'])}: {drill_event.get('detail', '')}",
                                 "audit trail (AuditEvent, interaction dr-drill)"))
    if not drill_ev:
        drill_ev.append(Evidence("no restore drill recorded", "fhirvault dr drill"))
    last_ok_ms = _parse_started(ok[-1].get("started")) if ok else None
    recent = last_ok_ms is not None and now - last_ok_ms <= DRILL_MAX_AGE_S * 1000
    drill_status = MET if recent and (not failed or reports[-1].get("ok")) else PARTIAL if ok else NOT_MET
    drill = Control("restore-drill", ("HDS 2.0 (continuité)", "ISO 27001 A.5.30", "ISO 27001 A.8.13",
                                      "GDPR 32(1)(c)(d)"),
                    {"en": "Restores tested regularly (drill with measured RPO/RTO, at least monthly)",
                     "fr": "Restaurations testées régulièrement (exercice avec RPO/RTO mesurés, au moins mensuel)"},
                    drill_status, tuple(drill_ev))
    return [backup, drill]


def _parse_started(raw: Any) -> int | None:
    if not isinstance(raw, str):
        return None
    try:
        t = datetime.fromisoformat(raw.replace("Z", "+00:00"))
    except ValueError:
        return None
    return int((t if t.tzinfo else t.replace(tzinfo=UTC)).timestamp() * 1000)


def _audit(c: Container) -> Control:
    from fhirvault.services.audit_monitor import VERIFIED_META

    verified = c.health.audit_verified
    raw = c.store.get_meta(VERIFIED_META)
    cp = c.store.latest_audit_checkpoint()
    ev = [Evidence(f"log size {c.store.audit_size()} entries; latest signed checkpoint "
                   + (f"at size {cp.size}, {_iso(cp.ts_ms)}, witnessed {cp.witnessed}" if cp else "none"),
                   "metrics fhirvault_audit_tree_size, fhirvault_audit_checkpoint_age_seconds"),
          Evidence(f"fully verified up to checkpoint size {int(raw) if raw else 0}",
                   "fhirvault audit verify; metric fhirvault_audit_last_verification_timestamp_seconds"),
          Evidence("verification in this process: " + {True: "passed", False: "FAILED", None: "pending"}[verified]
                   + (f" ({c.health.audit_failure})" if c.health.audit_failure else ""),
                   "/readyz (checks.audit); metric fhirvault_audit_verified"),
          Evidence(f"{len(c.settings.audit_witness_specs)} witness(es): "
                   + ", ".join(s.split("://")[0] for s in c.settings.audit_witness_specs), "fhirvault.toml")]
    status = NOT_MET if verified is False else MET if verified is True or raw else PARTIAL
    return Control("audit-log", ("HDS 2.0 (traçabilité)", "ISO 27001 A.8.15", "GDPR 32(1)(b)"),
                   {"en": "Tamper-evident audit trail of every access, verified",
                    "fr": "Traçabilité infalsifiable de chaque accès, vérifiée"}, status, tuple(ev))


def _alerts(c: Container) -> Control:
    alerts = c.alerts
    if alerts is None:
        from fhirvault.container import alert_store

        store = alert_store(c.settings)
        try:
            open_alerts = store.active()
        finally:
            store.close()
    else:
        open_alerts = [*alerts.list(state="open", limit=10_000), *alerts.list(state="acknowledged", limit=10_000)]
    by_sev: dict[str, int] = {}
    for a in open_alerts:
        by_sev[a.severity] = by_sev.get(a.severity, 0) + 1
    sinks = c.settings.alerts.sinks if c.settings.alerts is not None else ()
    serious = by_sev.get("critical", 0) + by_sev.get("high", 0)
    ev = (Evidence(f"{len(open_alerts)} open alert(s)" + (": " + ", ".join(f"{n} {s}" for s, n in sorted(by_sev.items()))
                                                           if by_sev else ""), "metric fhirvault_alerts_open"),
          Evidence(f"{len(sinks) or 1} alert sink(s) configured", "fhirvault.toml [alerts]"))
    return Control("monitoring", ("HDS 2.0 (détection)", "ISO 27001 A.8.16", "GDPR 32(1)(b)"),
                   {"en": "Security events detected and alerted; no serious alert left open",
                    "fr": "Événements de sécurité détectés et alertés ; aucune alerte grave laissée ouverte"},
                   MET if serious == 0 else PARTIAL, ev)


def _incidents(c: Container, now: int) -> list[Control]:
    from fhirvault.services.registers import RegisterService

    svc = RegisterService(c)
    incidents = svc.incidents()
    overdue = [i for i in incidents if i.overdue(now)]
    open_ = [i for i in incidents if i.status == "open"]
    inc = Control("incidents", ("ISO 27001 A.5.24-A.5.26", "GDPR 33", "HDS 2.0 (incidents)"),
                  {"en": "Incidents registered; personal-data breaches notified within 72 hours",
                   "fr": "Incidents enregistrés ; violations notifiées à la CNIL sous 72 heures"},
                  NOT_MET if overdue else MET,
                  (Evidence(f"{len(incidents)} incident(s), {len(open_)} open, {len(overdue)} past the 72-hour"
                            " deadline" + (": " + ", ".join(i.id for i in overdue[:5]) if overdue else ""),
                            "/admin/registers/incidents"),))
    reqs = svc.requests()
    late = [r for r in reqs if r.overdue(now)]
    pending = [r for r in reqs if r.status in ("open", "extended")]
    dsr = Control("subject-rights", ("GDPR 12-22", "ISO 27001 A.5.34"),
                  {"en": "Data-subject requests answered within one month (three when extended)",
                   "fr": "Demandes des personnes traitées sous un mois (trois en cas de prolongation)"},
                  NOT_MET if late else MET,
                  (Evidence(f"{len(reqs)} request(s), {len(pending)} pending, {len(late)} overdue",
                            "/admin/registers/requests"),))
    return [inc, dsr]


def _residency(c: Container) -> Control:
    from fhirvault.services.residency import allowed_hosts, destinations

    dests = destinations(c.settings)
    undeclared = [d for d in dests if d.country is None and d.host is not None]
    outside = [d for d in dests if d.eea is False]
    ev = [Evidence(f"{d.setting}: {d.host or 'this machine'} in {d.country or 'undeclared'}"
                   + (f" (outside the EEA, accepted: {d.override})" if d.eea is False else ""),
                   "/admin/registers/residency") for d in dests]
    ev.append(Evidence(f"outbound allow-list: {len(allowed_hosts(c.settings))} host(s) besides loopback",
                       "/admin/registers/residency"))
    status = PARTIAL if undeclared or outside or c.settings.country is None else MET
    return Control("residency", ("HDS 2.0 (localisation)", "GDPR 44-49", "ISO 27001 A.5.34"),
                   {"en": "Data kept in declared countries of the EEA; transfers justified",
                    "fr": "Données hébergées dans des pays déclarés de l'EEE ; transferts justifiés"},
                   status, tuple(ev))


def _retention(c: Container) -> Control:
    retention = getattr(c.settings, "retention", None)  # [retention], when this build has it
    b = c.settings.backup
    ev: list[Evidence] = []
    if retention is None:
        ev.append(Evidence("clinical records retention: not available in this version or not configured",
                           "fhirvault.toml [retention]"))
    else:
        fields = dataclasses.asdict(retention) if dataclasses.is_dataclass(retention) \
            and not isinstance(retention, type) else {"rules": repr(retention)}
        ev.append(Evidence("clinical records: " + ", ".join(f"{k} {v}" for k, v in fields.items()),
                           "fhirvault.toml [retention]"))
    if b is not None:
        r = b.retention
        ev.append(Evidence(f"backups: all {r.keep_all_days} d, daily {r.daily_days} d, monthly {r.monthly_months}"
                           " months", "fhirvault.toml [backup.retention]"))
    applied = getattr(retention, "auto_erase", True)
    status = NOT_AVAILABLE if retention is None else MET if applied and b is not None else PARTIAL
    return Control("retention", ("GDPR 5(1)(e)", "ISO 27001 A.5.33", "HDS 2.0"),
                   {"en": "Retention periods configured and applied",
                    "fr": "Durées de conservation configurées et appliquées"}, status, tuple(ev))


def _separation(c: Container) -> Control:
    from fhirvault.services.client_owners import clients_missing_owner
    from fhirvault.services.registers import client_rows

    clients = [r for r in client_rows(c) if not r["disabled"]]
    clinical = [r for r in clients if r["clinical"] and r["kind"] == "service"]
    missing = clients_missing_owner(c.store, c.settings.tenant)
    ev = (Evidence(f"mode {c.settings.mode}", "fhirvault.toml (mode)"),
          Evidence(f"{len(clinical)} backend client(s) with clinical scopes, {len(missing)} without owner/purpose"
                   + (": " + ", ".join(missing[:5]) if missing else ""), "/admin/registers/processing (recipients)"))
    production = c.settings.mode == "production"
    status = NOT_MET if missing and production else PARTIAL if missing or not production else MET
    return Control("separation-of-duties", ("ISO 27001 A.5.3", "ISO 27001 A.8.2", "HDS 2.0"),
                   {"en": "Clinical access only through owned, purpose-bound clients; none at bootstrap",
                    "fr": "Accès cliniques uniquement par des clients attribués et finalisés ; aucun à l'installation"},
                   status, ev)


def _access_reviews(c: Container) -> Control:
    req = {"en": "User access rights reviewed periodically (at least every six months)",
           "fr": "Revue périodique des droits d'accès (au moins semestrielle)"}
    refs = ("ISO 27001 A.5.18", "HDS 2.0", "GDPR 32(1)(b)")
    try:  # the console's access review campaigns, when this build has them
        from fhirvault.services.access_reviews import (  # type: ignore[import-not-found,unused-ignore]
            AccessReviews,
        )
    except ImportError:
        return Control("access-review", refs, req, NOT_AVAILABLE,
                       (Evidence("access reviews are not available in this version", "-"),))
    now = c.clock.now_ms()
    campaigns = list(AccessReviews(c.store, c.clock, tenant=c.settings.tenant).campaigns())
    closed = [x for x in campaigns if x.status == "closed"]
    overdue = [x for x in campaigns if x.overdue(now)]
    ev = [Evidence(f"{len(campaigns)} campaign(s), {len(campaigns) - len(closed)} open, {len(overdue)} overdue",
                   "/console (access reviews)")]
    done_ms = None
    if closed:
        last = closed[0]  # newest first
        decided = [i.decided_ms for i in last.items if i.decided_ms]
        done_ms = max(decided) if decided else last.created_ms
        revoked = sum(1 for i in last.items if i.decision == "revoke")
        ev.append(Evidence(f"last completed campaign \"{last.name}\": {len(last.items)} accounts and clients"
                           f" reviewed, {revoked} revoked, completed {_iso(done_ms)}", "/console (access reviews)"))
    recent = done_ms is not None and now - done_ms <= 190 * 86_400_000
    status = MET if recent and not overdue else PARTIAL if closed else NOT_MET
    return Control("access-review", refs, req, status, tuple(ev))


def _break_glass(c: Container) -> Control:
    grants = c.repository.break_glass.queue("open")
    now = c.clock.now_ms()
    stale = [g for g in grants if now - g.created_ms > 7 * 86_400_000]
    notify = c.settings.patient_notifications
    ev = (Evidence(f"{len(grants)} emergency access(es) awaiting review, {len(stale)} older than 7 days",
                   "/admin/break-glass?status=open"),
          Evidence("patients notified by " + " and ".join(
              n for n, on in (("webhook", notify and notify.webhook_url), ("e-mail", notify and notify.smtp_host)) if on)
              if notify else "patients are not notified (no [patient_notifications])", "fhirvault.toml"))
    return Control("break-glass", ("ISO 27001 A.8.2", "ISO 27001 A.5.15", "HDS 2.0"),
                   {"en": "Emergency access reviewed and the patient informed",
                    "fr": "Accès d'urgence contrôlés et patient informé"},
                   MET if not stale and notify else PARTIAL, ev)


def _transport(c: Container) -> Control:
    s = c.settings
    tls = s.tls_cert is not None
    public = s.public_base_url or ""
    ev = (Evidence("HTTPS served by fhirvault (TLS 1.2+)" if tls else "HTTP on " + s.host + ": TLS expected at a proxy",
                   "fhirvault.toml (tls_cert)"),
          Evidence(f"public base URL {public or 'not set'}", "/.well-known/smart-configuration"))
    status = MET if tls or public.startswith("https://") else PARTIAL
    return Control("transport", ("ISO 27001 A.8.20", "ISO 27001 A.8.24", "GDPR 32(1)(a)"),
                   {"en": "Encrypted transport for every client connection",
                    "fr": "Transport chiffré pour toute connexion"}, status, ev)


def build_report(container: Container) -> Report:
    """Read the instance and evaluate every control."""
    from fhirvault.container import instance_id

    c = container
    now = c.clock.now_ms()
    events = _system_events(c, {"backup", "dr-drill"})
    controls = [_keys(c, now), _transport(c), _mfa(c), _access_reviews(c), _separation(c), _audit(c), _alerts(c),
                *_backups(c, now, events), *_incidents(c, now), _residency(c), _retention(c), _break_glass(c)]
    return Report(now, instance_id(c.store), __version__, c.settings.mode, c.settings.tenant, tuple(controls))


# -- rendering ------------------------------------------------------------------------------------------

_LABELS = {
    "en": {"title": "fhirvault compliance report", "generated": "Generated", "instance": "Instance",
           "version": "Version", "mode": "Mode", "control": "Control", "requirement": "Requirement",
           "status": "Status", "evidence": "Evidence (where it is read)", "summary": "Summary",
           MET: "met", PARTIAL: "partial", NOT_MET: "not met", NOT_AVAILABLE: "not available",
           "note": "Generated from the live instance; every value can be checked at the source shown."},
    "fr": {"title": "Rapport de conformité fhirvault", "generated": "Généré le", "instance": "Instance",
           "version": "Version", "mode": "Mode", "control": "Contrôle", "requirement": "Exigence",
           "status": "Statut", "evidence": "Preuve (où elle est lue)", "summary": "Synthèse",
           MET: "conforme", PARTIAL: "partiel", NOT_MET: "non conforme", NOT_AVAILABLE: "non disponible",
           "note": "Généré depuis l'instance en service ; chaque valeur se vérifie à la source indiquée."},
}
_COLOURS = {MET: "#1b7f3b", PARTIAL: "#b26a00", NOT_MET: "#b00020", NOT_AVAILABLE: "#666666"}


# Evidence is stated in English where it is gathered (values, ids, dates, quoted audit details kept as
# recorded); the French report rewrites the fixed wording around the values.
_FR: tuple[tuple[re.Pattern[str], str], ...] = tuple((re.compile(a), b) for a, b in (
    (r"^root key id (\S+) \(file (.+)\)$", r"clé racine \1 (fichier \2)"),
    (r"^tenant key version (\d+) of (\d+), created (.+?)(?:, age ([\d.]+) days)?$",
     r"clé du tenant version \1 sur \2, créée le \3, âge \4 jours"),
    (r"^last rotation (.+) \(previous version created (.+)\)$", r"dernière rotation \1 (version précédente créée le \2)"),
    (r"^AES-256-GCM per-patient data keys; blind-index search tags$",
     "AES-256-GCM, une clé de données par patient ; index de recherche aveugles"),
    (r"^(\d+) of (\d+) active professional accounts with a second factor \((\d+) TOTP, (\d+) through an identity"
     r" provider\)$", r"\1 comptes professionnels actifs sur \2 avec un second facteur (\3 TOTP, \4 par un fournisseur"
     r" d'identité)"),
    (r"^(\d+) identity provider\(s\) configured$", r"\1 fournisseur(s) d'identité configuré(s)"),
    (r"^(\d+) target\(s\): ", r"\1 cible(s) : "),
    (r"^no backup target configured$", "aucune cible de sauvegarde configurée"),
    (r"^schedule every (\d+) min$", r"planification toutes les \1 min"),
    (r"^no schedule in the server$", "pas de planification dans le serveur"),
    (r"^last backup (\S+ \S+ UTC): ", r"dernière sauvegarde \1 : "),
    (r"^no successful backup among the newest (\d+) audit entries$",
     r"aucune sauvegarde réussie parmi les \1 dernières entrées d'audit"),
    (r"^last passed drill (\S+): backup (\S+) restored, RPO ([\d.]+) s, RTO ([\d.]+) s, (\S+) resources, counts"
     r" match (\S+)$", r"dernier exercice réussi \1 : sauvegarde \2 restaurée, RPO \3 s, RTO \4 s, \5 ressources,"
     r" décomptes identiques \6"),
    (r"^(\d+) failed drill\(s\), last ", r"\1 exercice(s) en échec, dernier "),
    (r"^no restore drill recorded$", "aucun exercice de restauration enregistré"),
    (r"^log size (\d+) entries; latest signed checkpoint at size (\d+), (.+), witnessed (\S+)$",
     r"journal de \1 entrées ; dernier point de contrôle signé à la taille \2, \3, témoigné \4"),
    (r"^log size (\d+) entries; latest signed checkpoint none$", r"journal de \1 entrées ; aucun point de contrôle"),
    (r"^fully verified up to checkpoint size (\d+)$", r"entièrement vérifié jusqu'à la taille \1"),
    (r"^verification in this process: passed", "vérification dans ce processus : réussie"),
    (r"^verification in this process: FAILED", "vérification dans ce processus : ÉCHEC"),
    (r"^verification in this process: pending", "vérification dans ce processus : en cours"),
    (r"^(\d+) witness\(es\): ", r"\1 témoin(s) : "),
    (r"^(\d+) open alert\(s\)", r"\1 alerte(s) ouverte(s)"),
    (r"^(\d+) alert sink\(s\) configured$", r"\1 destination(s) d'alerte configurée(s)"),
    (r"^(\d+) incident\(s\), (\d+) open, (\d+) past the 72-hour deadline",
     r"\1 incident(s), \2 ouvert(s), \3 au-delà du délai de 72 heures"),
    (r"^(\d+) request\(s\), (\d+) pending, (\d+) overdue$", r"\1 demande(s), \2 en cours, \3 en retard"),
    (r"^([^:]+): this machine in ", r"\1 : cette machine, en "),
    (r"^([^:]+): (\S+) in ", r"\1 : \2, en "),
    (r" \(outside the EEA, accepted: ", " (hors EEE, accepté : "),
    (r"^outbound allow-list: (\d+) host\(s\) besides loopback$",
     r"liste des connexions sortantes : \1 hôte(s) en plus de la boucle locale"),
    (r"^clinical records retention: not available in this version or not configured$",
     "conservation des dossiers : non disponible dans cette version ou non configurée"),
    (r"^clinical records: ", "dossiers : "),
    (r"^backups: all (\d+) d, daily (\d+) d, monthly (\d+) months$",
     r"sauvegardes : toutes \1 j, quotidiennes \2 j, mensuelles \3 mois"),
    (r"^(\d+) backend client\(s\) with clinical scopes, (\d+) without owner/purpose",
     r"\1 client(s) applicatif(s) avec des droits cliniques, \2 sans responsable ni finalité"),
    (r"^access reviews are not available in this version$", "revues d'accès non disponibles dans cette version"),
    (r"^(\d+) campaign\(s\), (\d+) open, (\d+) overdue$", r"\1 campagne(s), \2 ouverte(s), \3 en retard"),
    (r"^last completed campaign (\".*\"): (\d+) accounts and clients reviewed, (\d+) revoked, completed (.+)$",
     r"dernière campagne terminée \1 : \2 comptes et clients revus, \3 révoqué(s), terminée le \4"),
    (r"^(\d+) emergency access\(es\) awaiting review, (\d+) older than 7 days$",
     r"\1 accès d'urgence à contrôler, \2 depuis plus de 7 jours"),
    (r"^patients notified by ", "patients informés par "),
    (r"^patients are not notified \(no \[patient_notifications\]\)$",
     "patients non informés (pas de [patient_notifications])"),
    (r"^HTTPS served by fhirvault \(TLS 1.2\+\)$", "HTTPS servi par fhirvault (TLS 1.2+)"),
    (r"^HTTP on (\S+): TLS expected at a proxy$", r"HTTP sur \1 : TLS attendu sur un mandataire"),
    (r"^public base URL not set$", "URL publique non définie"),
    (r"^public base URL ", "URL publique "),
))


def evidence_text(ev: Evidence, lang: str) -> str:
    """The evidence line in ``lang`` (values unchanged)."""
    if lang != "fr":
        return ev.text
    text = ev.text
    for pattern, replacement in _FR:
        text = pattern.sub(replacement, text)
    return text.replace(", âge  jours", "")


def _labels(lang: str) -> dict[str, str]:
    if lang not in _LABELS:
        raise ValueError("lang: fr or en")
    return _LABELS[lang]


def _source_html(source: str) -> str:
    """An admin endpoint becomes a link (relative: the report is served by the same server)."""
    if source.startswith("/"):
        path = source.split(" ", 1)[0]
        return f"<a href=\"{html.escape(path)}\">{html.escape(source)}</a>"
    return html.escape(source)


def render_html(report: Report, lang: str = "en") -> str:
    """A self-contained HTML page (inline style, no script)."""
    t = _labels(lang)
    e = html.escape
    counts = report.counts()
    rows = []
    for c in report.controls:
        evidence = "".join(f"<li>{e(evidence_text(ev, lang))} <span class=src>[{_source_html(ev.source)}]</span></li>"
                           for ev in c.evidence)
        rows.append(f"<tr id=\"{e(c.key)}\"><td><b>{e(c.key)}</b><br><small>{e(' · '.join(c.refs))}</small></td>"
                    f"<td>{e(c.requirement[lang])}</td><td class=st style=\"color:{_COLOURS[c.status]}\">"
                    f"{e(t[c.status])}</td><td><ul>{evidence}</ul></td></tr>")
    summary = ", ".join(f"{n} {e(t[s])}" for s, n in counts.items())
    return (f"<!doctype html><html lang=\"{lang}\"><head><meta charset=\"utf-8\"><title>{e(t['title'])}</title>"
            "<style>body{font-family:sans-serif;margin:2em}table{border-collapse:collapse;width:100%}"
            "td,th{border:1px solid #ccc;padding:.4em;vertical-align:top;text-align:left}.st{font-weight:bold}"
            ".src{color:#555;font-size:.85em}ul{margin:0;padding-left:1.2em}</style></head><body>"
            f"<h1>{e(t['title'])}</h1><p>{e(t['generated'])}: {e(_iso(report.generated_ms))} · {e(t['instance'])}:"
            f" {e(report.instance)} ({e(report.tenant)}) · {e(t['version'])}: {e(report.version)} · {e(t['mode'])}:"
            f" {e(report.mode)}</p><p><b>{e(t['summary'])}</b>: {summary}</p><p><i>{e(t['note'])}</i></p>"
            f"<table><thead><tr><th>{e(t['control'])}</th><th>{e(t['requirement'])}</th><th>{e(t['status'])}</th>"
            f"<th>{e(t['evidence'])}</th></tr></thead><tbody>{''.join(rows)}</tbody></table></body></html>\n")


_PDF_REPLACE = str.maketrans({"\u2019": "'", "\u2018": "'", "\u201c": '"', "\u201d": '"', "\u2013": "-",
                              "\u2014": "-", "\u2026": "...", "\u00b7": "-", "\u2264": "<=", "\u2265": ">=",
                              "\u00a0": " ", "\u00ab": '"', "\u00bb": '"'})


def _latin1(text: str) -> str:
    # The PDF's core fonts (Helvetica) cover Latin-1, which has every French letter.
    return text.translate(_PDF_REPLACE).encode("latin-1", "replace").decode("latin-1")


def render_pdf(report: Report, lang: str = "en") -> bytes:
    """The same report as a PDF (fpdf2, core fonts: no font files shipped)."""
    from fpdf import FPDF

    t = _labels(lang)
    pdf = FPDF(orientation="P", unit="mm", format="A4")
    pdf.set_title(t["title"])
    pdf.set_creator(f"fhirvault {report.version}")
    pdf.set_creation_date(datetime.fromtimestamp(report.generated_ms / 1000, UTC))
    pdf.set_auto_page_break(auto=True, margin=15)
    pdf.add_page()
    width = pdf.w - pdf.l_margin - pdf.r_margin
    pdf.set_font("Helvetica", "B", 16)
    pdf.multi_cell(width, 8, _latin1(t["title"]), new_x="LMARGIN", new_y="NEXT")
    pdf.set_font("Helvetica", "", 9)
    pdf.multi_cell(width, 5, _latin1(f"{t['generated']}: {_iso(report.generated_ms)} - {t['instance']}: "
                                     f"{report.instance} ({report.tenant}) - {t['version']}: {report.version} - "
                                     f"{t['mode']}: {report.mode}"), new_x="LMARGIN", new_y="NEXT")
    summary = ", ".join(f"{n} {t[s]}" for s, n in report.counts().items())
    pdf.multi_cell(width, 5, _latin1(f"{t['summary']}: {summary}"), new_x="LMARGIN", new_y="NEXT")
    pdf.set_font("Helvetica", "I", 8)
    pdf.multi_cell(width, 4, _latin1(t["note"]), new_x="LMARGIN", new_y="NEXT")
    for c in report.controls:
        pdf.ln(3)
        pdf.set_font("Helvetica", "B", 11)
        r, g, b = (int(_COLOURS[c.status][i:i + 2], 16) for i in (1, 3, 5))
        pdf.set_text_color(r, g, b)
        pdf.multi_cell(width, 6, _latin1(f"{c.key}: {t[c.status].upper()}"), new_x="LMARGIN", new_y="NEXT")
        pdf.set_text_color(0, 0, 0)
        pdf.set_font("Helvetica", "", 8)
        pdf.multi_cell(width, 4, _latin1(" - ".join(c.refs)), new_x="LMARGIN", new_y="NEXT")
        pdf.set_font("Helvetica", "", 10)
        pdf.multi_cell(width, 5, _latin1(f"{t['requirement']}: {c.requirement[lang]}"), new_x="LMARGIN", new_y="NEXT")
        pdf.set_font("Helvetica", "", 9)
        for ev in c.evidence:
            pdf.multi_cell(width, 4.5, _latin1(f"- {evidence_text(ev, lang)} [{ev.source}]"), new_x="LMARGIN",
                           new_y="NEXT")
    out = pdf.output()
    return bytes(out)


def report_filename(report: Report, fmt: str) -> str:
    return f"fhirvault-compliance-{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime(report.generated_ms / 1000))}.{fmt}"


__all__ = ["MET", "NOT_AVAILABLE", "NOT_MET", "PARTIAL", "Control", "Evidence", "Report", "build_report",
           "render_html", "render_pdf", "report_filename"]
