"""Real-time threat detection over the stream of durable audit records.

``observe`` runs on the event loop for every record, so each rule is a few
dict and deque operations: sliding windows are deques capped at the
threshold (the oldest of the last N events tells whether N happened within
the window), distinct-patient counts are per-actor sets reset at each fixed
window, and every per-actor table is an LRU capped at ``max_tracked_actors``.
Memory is therefore bounded whatever an attacker sends, and ``observe`` never
raises: a rule bug must not fail the request whose audit record fed it.

Windows use the record's own timestamp (event time); locks and throttles are
checked against the clock. Patient ids are only ever hashed into in-memory
sets; alerts name actors (user, client), sources, counts and rules.
"""

from __future__ import annotations

import collections
import datetime
import logging
import time
import zoneinfo
from collections.abc import Callable
from typing import TypeVar

from fhirvault.domain.policy import (
    DIRECTORY_REFUSED,
    GAIN_REFUSED,
    REFERENCE_REFUSED,
    RELATIONSHIP_CHANGE,
    SELF_ASSIGNED,
)
from fhirvault.ports import Clock
from fhirvault.services.alert_settings import DetectionSettings
from fhirvault.services.alerts import Alert, AlertService
from fhirvault.services.audit import AuditRecord

log = logging.getLogger("fhirvault.detection")

BRUTE_FORCE = "brute_force"
MASS_ACCESS = "mass_access"
CARE_RELATIONSHIP = "care_relationship_refused"
BREAK_GLASS = "break_the_glass"
RESTRICTED = "restricted_access"
AFTER_HOURS = "after_hours_bulk"
MFA_NEW_SOURCE = "new_source_after_mfa_failure"
CLOCK_SKEW = "clock_skew"
AUDIT_VERIFICATION = "audit_verification_failed"  # raised by the lead's verifier via system_alert
RELATIONSHIP_CHANGED = "relationship_change"
RELATIONSHIP_REFUSED = "relationship_write_refused"
SELF_ASSIGNMENT = "care_self_assignment"
# Refusals of writes that would have handed out care relationships (domain/policy.py spells them).
_RELATIONSHIP_REFUSALS = (DIRECTORY_REFUSED, REFERENCE_REFUSED, GAIN_REFUSED)
_WRITES = frozenset({"create", "update", "patch", "delete"})

# Failed logins: the token endpoint (client authentication), user logins, second factors. Failed
# bearer checks ("authenticate") are left out: tokens are signed, so they cannot be guessed, and
# a client looping on an expired token must not get its address locked out of the token endpoint.
_LOGIN_INTERACTIONS = frozenset({"token", "login", "mfa"})
_LOGIN_FAILURE_STATUS = frozenset({400, 401})
_BULK_INTERACTIONS = frozenset({"search", "history-instance", "history-type", "history-system", "everything"})
_MAX_ID = 128  # actor ids can be attacker-chosen (a claimed client id): bound what we keep
_KNOWN_SOURCES = 8  # recent source addresses remembered per user

K = TypeVar("K")
V = TypeVar("V")


def _touch(table: collections.OrderedDict[K, V], key: K, make: Callable[[], V], cap: int) -> V:
    """The entry for ``key`` (created if new), marked most recently used; evicts beyond ``cap``."""
    value = table.get(key)
    if value is None:
        value = make()
        table[key] = value
        if len(table) > cap:
            table.popitem(last=False)
    else:
        table.move_to_end(key)
    return value


def _label(value: str) -> str:
    """Printable, bounded: actor ids end up in e-mail subjects and syslog lines."""
    return "".join(c if c.isprintable() else "?" for c in value[:_MAX_ID])


class _MassState:
    __slots__ = ("ewma", "fired", "patients", "start", "windows")

    def __init__(self) -> None:
        self.start = -1
        self.patients: set[int] = set()
        self.windows = 0  # finished windows seen (empty ones included)
        self.ewma = 0.0
        self.fired = False


class DetectionEngine:
    def __init__(self, settings: DetectionSettings, alerts: AlertService, clock: Clock,
                 monotonic: Callable[[], float] = time.monotonic) -> None:
        self._s = settings
        self._alerts = alerts
        self._clock = clock
        self._monotonic = monotonic
        self._cap = settings.max_tracked_actors
        self._tz = zoneinfo.ZoneInfo(settings.after_hours.timezone)
        self._account_failures: collections.OrderedDict[str, collections.deque[int]] = collections.OrderedDict()
        self._source_failures: collections.OrderedDict[str, collections.deque[int]] = collections.OrderedDict()
        # account -> until ms (every source), or "account@source" -> until ms (that source only)
        self._locked: collections.OrderedDict[str, int] = collections.OrderedDict()
        self._failing_sources: collections.OrderedDict[str, collections.OrderedDict[str, int]] = (
            collections.OrderedDict())  # account -> source -> last failure ms
        self._throttled: collections.OrderedDict[str, int] = collections.OrderedDict()  # source -> until ms
        self._mass: collections.OrderedDict[str, _MassState] = collections.OrderedDict()
        self._refusals: collections.OrderedDict[str, collections.deque[int]] = collections.OrderedDict()
        self._mfa_failed: collections.OrderedDict[str, tuple[int, str | None]] = collections.OrderedDict()
        self._sources: collections.OrderedDict[str, collections.OrderedDict[str, None]] = collections.OrderedDict()
        self._last_clock: tuple[int, float] | None = None
        self.events = 0
        self.errors = 0

    # --- entry points -----------------------------------------------------------

    def observe(self, record: AuditRecord) -> None:
        """Feed one durable audit record. Cheap, bounded, never raises."""
        self.events += 1
        try:
            self._observe(record)
        except Exception as exc:
            self.errors += 1
            if self.errors <= 10 or self.errors % 1000 == 0:
                log.error("detection rule failed", extra={"error": type(exc).__name__, "errors": self.errors})

    def throttled(self, *, source_ip: str | None, client_id: str | None, user: str | None = None) -> bool:
        """True while the brute-force rule throttles this source or locks this account (for this source,
        or for every source after a distributed attack)."""
        if not (self._locked or self._throttled):
            return False
        now = self._clock.now_ms()
        if source_ip is not None and self._active_until(self._throttled, source_ip, now):
            return True
        for account in (("client:" + client_id[:_MAX_ID]) if client_id is not None else None,
                        ("user:" + user[:_MAX_ID]) if user is not None else None):
            if account is None:
                continue
            if self._active_until(self._locked, account, now):
                return True
            if source_ip is not None and self._active_until(self._locked, f"{account}@{source_ip[:64]}", now):
                return True
        return False

    def unlock(self, *, source_ip: str | None = None, client_id: str | None = None, user: str | None = None) -> None:
        """Operator override: lift a lock or throttle before it expires."""
        if source_ip is not None:
            self._throttled.pop(source_ip, None)
        for account in (("client:" + client_id[:_MAX_ID]) if client_id is not None else None,
                        ("user:" + user[:_MAX_ID]) if user is not None else None):
            if account is not None:
                for key in [k for k in self._locked if k == account or k.startswith(account + "@")]:
                    self._locked.pop(key, None)

    def system_alert(self, rule: str, severity: str, summary: str, dedup_key: str,
                     labels: dict[str, str] | None = None) -> Alert:
        """An alert from outside the audit stream (audit verification, backups…)."""
        return self._alerts.raise_alert(rule, severity, summary, dedup_key, labels)

    def check_clock(self) -> int | None:
        """Compare wall-clock and monotonic progress since the last call; returns the skew in ms."""
        wall, mono = self._clock.now_ms(), self._monotonic()
        last, self._last_clock = self._last_clock, (wall, mono)
        if last is None:
            return None
        skew = (wall - last[0]) - round((mono - last[1]) * 1000)
        rule = self._s.clock_skew
        if rule.enabled and abs(skew) > rule.max_skew_seconds * 1000:
            self._alerts.raise_alert(
                CLOCK_SKEW, rule.severity,
                f"wall clock jumped {skew / 1000:+.1f} s against the monotonic clock (bound {rule.max_skew_seconds} s)",
                "wall-clock", {"skew_ms": str(skew)})
        return skew

    # --- rules -----------------------------------------------------------------------

    def _observe(self, r: AuditRecord) -> None:
        s = self._s
        if r.status in _LOGIN_FAILURE_STATUS and r.interaction in _LOGIN_INTERACTIONS:
            if s.brute_force.enabled:
                self._login_failure(r)
            if r.interaction == "mfa" and r.user is not None and s.mfa_new_source.enabled:
                self._put(self._mfa_failed, r.user[:_MAX_ID], (r.ts_ms, r.source_ip))
            return
        actor = ("user:" + r.user[:_MAX_ID]) if r.user is not None else (
            ("client:" + r.client_id[:_MAX_ID]) if r.client_id is not None else None)
        if r.outcome == "0":
            if r.patient is not None and actor is not None and s.mass_access.enabled:
                self._mass_access(r, actor)
            if r.user is not None and r.source_ip is not None and s.mfa_new_source.enabled:
                self._new_source(r)
            if s.after_hours.enabled and (r.interaction == "export" or (
                    r.result_count is not None and r.result_count >= s.after_hours.large_search_results
                    and r.interaction in _BULK_INTERACTIONS)):
                self._after_hours(r, actor)
        elif r.status == 403 and r.detail is not None and s.care_relationship.enabled \
                and "care relationship" in r.detail.lower() and actor is not None:
            self._care_refusal(r, actor)
        if (r.purpose_of_use == "ETREAT" or r.interaction == "break-the-glass") and s.break_glass.enabled:
            self._actor_alert(r, actor, BREAK_GLASS, s.break_glass.severity, "break-the-glass access")
        if r.detail is not None and r.interaction in _WRITES:
            self._relationship_write(r, actor)
        if r.restricted and s.restricted.enabled:
            verb = "access to" if r.outcome == "0" else "refused access to"
            self._actor_alert(r, actor, RESTRICTED, s.restricted.severity, f"{verb} a restricted (R/V) record",
                              suffix=":allowed" if r.outcome == "0" else ":refused")

    def _login_failure(self, r: AuditRecord) -> None:
        rule = self._s.brute_force
        window = rule.window_seconds * 1000
        ts = r.ts_ms
        account = ("user:" + r.user[:_MAX_ID]) if r.user is not None else (
            ("client:" + r.client_id[:_MAX_ID]) if r.client_id is not None else None)
        if account is not None:
            # Failures are counted per account *and source*: someone who only knows a client id or
            # user name locks it for their own address, not for its owner (see docs/security-model.md).
            key = account if r.source_ip is None else f"{account}@{r.source_ip[:64]}"
            failures = _touch(self._account_failures, key,
                              lambda: collections.deque(maxlen=rule.failures), self._cap)
            failures.append(ts)
            kind, _, ident = account.partition(":")
            if len(failures) == rule.failures and ts - failures[0] <= window:
                if rule.lock_accounts:
                    self._extend(self._locked, key, ts + rule.lock_seconds * 1000)
                labels = {kind if kind == "user" else "client_id": _label(ident)}
                if r.source_ip is not None:
                    labels["source_ip"] = _label(r.source_ip)
                action = f"; locked for {rule.lock_seconds} s from that source" if rule.lock_accounts else ""
                self._alerts.raise_alert(
                    BRUTE_FORCE, rule.severity,
                    f"{rule.failures}+ failed logins for {kind} {_label(ident)} within {rule.window_seconds} s{action}",
                    "account:" + account, labels)
            if r.source_ip is not None:
                self._distributed(account, r.source_ip, ts)
        if r.source_ip is not None:
            failures = _touch(self._source_failures, r.source_ip,
                              lambda: collections.deque(maxlen=rule.source_failures), self._cap)
            failures.append(ts)
            if len(failures) == rule.source_failures and ts - failures[0] <= window:
                if rule.throttle_sources:
                    self._extend(self._throttled, r.source_ip, ts + rule.throttle_seconds * 1000)
                action = f"; throttled for {rule.throttle_seconds} s" if rule.throttle_sources else ""
                self._alerts.raise_alert(
                    BRUTE_FORCE, rule.severity,
                    f"{rule.source_failures}+ failed logins from {_label(r.source_ip)} within "
                    f"{rule.window_seconds} s{action}",
                    "source:" + r.source_ip, {"source_ip": _label(r.source_ip)})

    def _distributed(self, account: str, source: str, ts: int) -> None:
        """Lock the account for every source once failures came from ``lock_after_sources`` sources."""
        rule = self._s.brute_force
        window = rule.window_seconds * 1000
        sources = _touch(self._failing_sources, account, collections.OrderedDict, self._cap)
        sources[source] = ts
        sources.move_to_end(source)
        while sources and (ts - next(iter(sources.values())) > window or len(sources) > rule.lock_after_sources):
            sources.popitem(last=False)
        if len(sources) < rule.lock_after_sources:
            return
        if rule.lock_accounts:
            self._extend(self._locked, account, ts + rule.lock_seconds * 1000)
        kind, _, ident = account.partition(":")
        action = f"; locked for {rule.lock_seconds} s from every source" if rule.lock_accounts else ""
        self._alerts.raise_alert(
            BRUTE_FORCE, rule.severity,
            f"failed logins for {kind} {_label(ident)} from {len(sources)} sources within "
            f"{rule.window_seconds} s{action}",
            "distributed:" + account, {kind if kind == "user" else "client_id": _label(ident),
                                       "sources": str(len(sources))})

    def _mass_access(self, r: AuditRecord, actor: str) -> None:
        rule = self._s.mass_access
        width = rule.window_seconds * 1000
        start = r.ts_ms - r.ts_ms % width
        st = _touch(self._mass, actor, _MassState, self._cap)
        if start > st.start:
            if st.start >= 0:
                self._roll(st, (start - st.start) // width - 1)
            st.start = start
            st.patients.clear()
            st.fired = False
        patient = hash(r.patient)
        if patient in st.patients or len(st.patients) >= rule.distinct_patients:
            return
        st.patients.add(patient)
        if st.fired:
            return
        n = len(st.patients)
        if n >= rule.distinct_patients:
            reason = f"{n} distinct patients within {rule.window_seconds} s (threshold {rule.distinct_patients})"
        elif (st.windows >= rule.baseline_min_windows and n >= rule.baseline_min_patients
              and n > rule.baseline_factor * st.ewma):
            reason = (f"{n} distinct patients within {rule.window_seconds} s, over {rule.baseline_factor:g} x "
                      f"the usual {st.ewma:.1f}")
        else:
            return
        st.fired = True
        kind, _, ident = actor.partition(":")
        labels = {kind if kind == "user" else "client_id": _label(ident), "distinct_patients": str(n)}
        if r.role is not None:
            labels["role"] = _label(r.role)
        self._alerts.raise_alert(MASS_ACCESS, rule.severity, f"mass access by {kind} {_label(ident)}: {reason}",
                                 "actor:" + actor, labels)

    def _roll(self, st: _MassState, empty_windows: int) -> None:
        """Fold the finished window (and the empty ones since) into the actor's usual rate."""
        rule = self._s.mass_access
        count = float(len(st.patients))
        if st.windows == 0:
            st.ewma = count
        else:
            if st.windows >= rule.baseline_min_windows:  # learn slowly from anomalous windows
                count = min(count, rule.baseline_factor * max(st.ewma, 1.0))
            st.ewma += rule.baseline_alpha * (count - st.ewma)
        st.windows += 1
        if empty_windows > 0:
            st.ewma *= (1.0 - rule.baseline_alpha) ** min(empty_windows, 10_000)
            st.windows += empty_windows

    def _care_refusal(self, r: AuditRecord, actor: str) -> None:
        rule = self._s.care_relationship
        refusals = _touch(self._refusals, actor, lambda: collections.deque(maxlen=rule.refusals), self._cap)
        refusals.append(r.ts_ms)
        if len(refusals) == rule.refusals and r.ts_ms - refusals[0] <= rule.window_seconds * 1000:
            kind, _, ident = actor.partition(":")
            self._alerts.raise_alert(
                CARE_RELATIONSHIP, rule.severity,
                f"{rule.refusals}+ accesses refused for lack of a care relationship, {kind} {_label(ident)}, "
                f"within {rule.window_seconds} s",
                "actor:" + actor, self._actor_labels(r, actor))

    def _relationship_write(self, r: AuditRecord, actor: str | None) -> None:
        """Care relationships written (or refused): every change is an event, a refusal and a user
        naming themselves in a patient's care are alerts."""
        s, detail = self._s, r.detail or ""
        what = _label((r.entity or "?").partition("/")[0])  # the type only: alerts never name a patient
        if r.outcome == "0" and detail.startswith(RELATIONSHIP_CHANGE) and s.relationship_change.enabled:
            self._actor_alert(r, actor, RELATIONSHIP_CHANGED, s.relationship_change.severity,
                              f"care relationship changed ({_label(r.interaction)} of a {what})")
        elif r.status == 403 and any(x in detail for x in _RELATIONSHIP_REFUSALS) and s.relationship_refused.enabled:
            self._actor_alert(r, actor, RELATIONSHIP_REFUSED, s.relationship_refused.severity,
                              f"refused write of a care relationship or directory entry ({_label(detail)})")
        if SELF_ASSIGNED in detail and s.self_assignment.enabled:
            verb = "added themselves" if r.outcome == "0" else "tried to add themselves"
            self._actor_alert(r, actor, SELF_ASSIGNMENT, s.self_assignment.severity,
                              f"a user {verb} to a patient's care (through a {what})",
                              suffix=":allowed" if r.outcome == "0" else ":refused")

    def _after_hours(self, r: AuditRecord, actor: str | None) -> None:
        rule = self._s.after_hours
        local = datetime.datetime.fromtimestamp(r.ts_ms / 1000, self._tz)
        if local.weekday() in rule.days and rule.start_hour <= local.hour < rule.end_hour:
            return
        what = "bulk export" if r.interaction == "export" else f"{r.interaction} returning {r.result_count} entries"
        self._actor_alert(r, actor, AFTER_HOURS, rule.severity,
                          f"{what} outside working hours ({local.strftime('%a %H:%M')} {rule.timezone})")

    def _new_source(self, r: AuditRecord) -> None:
        assert r.user is not None and r.source_ip is not None
        user = r.user[:_MAX_ID]
        known = _touch(self._sources, user, collections.OrderedDict, self._cap)
        source = r.source_ip
        if source in known:
            known.move_to_end(source)
            return
        failed = self._mfa_failed.get(user)
        known[source] = None
        if len(known) > _KNOWN_SOURCES:
            known.popitem(last=False)
        rule = self._s.mfa_new_source
        if failed is None or r.ts_ms - failed[0] > rule.window_seconds * 1000 or failed[1] == source:
            return
        self._alerts.raise_alert(
            MFA_NEW_SOURCE, rule.severity,
            f"user {_label(user)} active from a new source {_label(source)} after a failed second factor",
            "user:" + user, {"user": _label(user), "source_ip": _label(source)})

    # --- helpers -------------------------------------------------------------------------

    def _actor_alert(self, r: AuditRecord, actor: str | None, rule_name: str, severity: str, what: str,
                     suffix: str = "") -> None:
        if actor is None:
            who, key = "an unidentified caller", "anonymous"
        else:
            kind, _, ident = actor.partition(":")
            who, key = f"{kind} {_label(ident)}", "actor:" + actor
        self._alerts.raise_alert(rule_name, severity, f"{what} by {who}", key + suffix, self._actor_labels(r, actor))

    @staticmethod
    def _actor_labels(r: AuditRecord, actor: str | None) -> dict[str, str]:
        labels: dict[str, str] = {}
        if r.user is not None:
            labels["user"] = _label(r.user)
        if r.client_id is not None:
            labels["client_id"] = _label(r.client_id)
        if r.role is not None:
            labels["role"] = _label(r.role)
        if r.source_ip is not None:
            labels["source_ip"] = _label(r.source_ip)
        labels["interaction"] = _label(r.interaction)
        return labels

    def _put(self, table: collections.OrderedDict[str, V], key: str, value: V) -> None:
        table[key] = value
        table.move_to_end(key)
        if len(table) > self._cap:
            table.popitem(last=False)

    def _extend(self, table: collections.OrderedDict[str, int], key: str, until: int) -> None:
        self._put(table, key, max(until, table.get(key, 0)))

    @staticmethod
    def _active_until(table: collections.OrderedDict[str, int], key: str, now: int) -> bool:
        until = table.get(key)
        if until is None:
            return False
        if until > now:
            return True
        table.pop(key, None)  # expired
        return False
