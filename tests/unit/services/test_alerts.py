"""AlertService: deduplication, states, durable storage, and delivery that never blocks the caller."""

from __future__ import annotations

import http.server
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest

from fhirvault.adapters.alert_sinks import SIGNATURE_HEADER, TIMESTAMP_HEADER, WebhookSink, verify
from fhirvault.adapters.sqlite_alerts import MemoryAlertStore, SqliteAlertStore
from fhirvault.services.alert_settings import WebhookSinkSettings
from fhirvault.services.alerts import (
    ACKNOWLEDGED,
    CLOSED,
    FIRING,
    OPEN,
    RESOLVED,
    Alert,
    AlertService,
)


class FakeClock:
    def __init__(self, ms: int = 1_764_000_000_000) -> None:
        self.ms = ms

    def now_ms(self) -> int:
        return self.ms

    def advance(self, seconds: float) -> None:
        self.ms += int(seconds * 1000)


class RecordingSink:
    def __init__(self, name: str = "rec", min_severity: str = "info", fail_times: int = 0,
                 block: threading.Event | None = None) -> None:
        self.name = name
        self.min_severity = min_severity
        self.sent: list[tuple[Alert, str]] = []
        self.fail_times = fail_times
        self.attempts = 0
        self.block = block
        self.got = threading.Semaphore(0)

    def send(self, alert: Alert, event: str) -> None:
        self.attempts += 1
        if self.block is not None:
            self.block.wait(30)
        if self.attempts <= self.fail_times:
            raise ConnectionError("receiver down")
        self.sent.append((alert, event))
        self.got.release()

    def close(self) -> None:
        pass


def service(*sinks: Any, store: Any = None, clock: FakeClock | None = None, **kw: Any) -> AlertService:
    kw.setdefault("retry_initial_seconds", 0.01)
    kw.setdefault("retry_max_seconds", 0.05)
    return AlertService(store or MemoryAlertStore(), list(sinks), clock or FakeClock(), **kw)


def test_dedup_counts_repeats_and_renotifies_after_interval() -> None:
    clock = FakeClock()
    sink = RecordingSink()
    alerts = service(sink, clock=clock, renotify_seconds=60)
    try:
        first = alerts.raise_alert("brute_force", "high", "s1", "account:client:x", {"client_id": "x"})
        clock.advance(1)
        second = alerts.raise_alert("brute_force", "high", "s2", "account:client:x")
        other = alerts.raise_alert("brute_force", "high", "s", "source:10.0.0.1")
        assert second.id == first.id and second.count == 2 and second.last_ms == first.last_ms + 1000
        assert second.labels == {"client_id": "x"} and second.summary == "s2"
        assert other.id != first.id
        assert alerts.wait_delivered(5)
        assert [(a.id, e) for a, e in sink.sent] == [(first.id, FIRING), (other.id, FIRING)]
        clock.advance(60)
        third = alerts.raise_alert("brute_force", "high", "s3", "account:client:x")
        assert alerts.wait_delivered(5)
        assert len(sink.sent) == 3 and sink.sent[-1][0].count == third.count == 3
        [stored] = alerts.list(rule="brute_force", state=OPEN, limit=1)
        assert stored.id in (first.id, other.id)
        assert alerts.get(first.id) == third
    finally:
        alerts.close()


def test_severity_only_escalates_and_an_escalation_is_delivered() -> None:
    sink = RecordingSink()
    alerts = service(sink)
    try:
        alerts.raise_alert("r", "medium", "s", "k")
        alerts.raise_alert("r", "medium", "s", "k")
        assert alerts.raise_alert("r", "critical", "s", "k").severity == "critical"
        assert alerts.raise_alert("r", "low", "s", "k").severity == "critical"
        with pytest.raises(ValueError):
            alerts.raise_alert("r", "urgent", "s", "k")
        assert alerts.wait_delivered(5)
        assert [(a.severity, a.count) for a, _ in sink.sent] == [("medium", 1), ("critical", 3)]
    finally:
        alerts.close()


def test_acknowledge_then_close_then_new_alert() -> None:
    clock = FakeClock()
    sink = RecordingSink()
    alerts = service(sink, clock=clock, renotify_seconds=10)
    try:
        a = alerts.raise_alert("mass_access", "high", "s", "actor:user:u")
        acked = alerts.acknowledge(a.id, "admin", "looking")
        assert acked is not None and acked.state == ACKNOWLEDGED and acked.updated_by == "admin"
        clock.advance(20)
        repeat = alerts.raise_alert("mass_access", "high", "s", "actor:user:u")
        assert repeat.id == a.id and repeat.count == 2 and repeat.state == ACKNOWLEDGED
        closed = alerts.close_alert(a.id, "admin", "false positive")
        assert closed is not None and closed.state == CLOSED and closed.count == 2 and closed.note == "false positive"
        assert alerts.close_alert(a.id, "admin") is None  # already closed
        assert alerts.acknowledge("nope", "admin") is None
        clock.advance(1)
        fresh = alerts.raise_alert("mass_access", "high", "s", "actor:user:u")
        assert fresh.id != a.id and fresh.count == 1 and fresh.state == OPEN
        assert alerts.wait_delivered(5)
        # no re-notification while acknowledged; the close is delivered as "resolved"
        assert [(x.id, e) for x, e in sink.sent] == [(a.id, FIRING), (a.id, RESOLVED), (fresh.id, FIRING)]
        assert [x.state for x in alerts.list(rule="mass_access")] == [OPEN, CLOSED]
        assert alerts.open_counts() == {("mass_access", "high"): 1}
    finally:
        alerts.close()


def test_state_survives_restart_and_dedups_against_stored(tmp_path: Path) -> None:
    path = tmp_path / "alerts.sqlite3"
    alerts = service(store=SqliteAlertStore(path))
    a = alerts.raise_alert("break_the_glass", "high", "s", "actor:user:u")
    for _ in range(10):
        alerts.raise_alert("break_the_glass", "high", "s", "actor:user:u")
    alerts.close()
    again = service(store=SqliteAlertStore(path))
    try:
        assert again.get(a.id) is not None and again.get(a.id).count == 11  # type: ignore[union-attr]
        assert again.raise_alert("break_the_glass", "high", "s", "actor:user:u").count == 12
    finally:
        again.close()


def test_min_severity_and_failing_sink_is_retried_without_blocking_others() -> None:
    flaky = RecordingSink("flaky", fail_times=3)
    pager = RecordingSink("pager", min_severity="critical")
    hung_gate = threading.Event()
    hung = RecordingSink("hung", block=hung_gate)
    alerts = service(flaky, pager, hung)
    try:
        start = time.perf_counter()
        alerts.raise_alert("r", "high", "s", "k1")
        alerts.raise_alert("r", "critical", "s", "k2")
        elapsed = time.perf_counter() - start
        assert elapsed < 0.5, elapsed  # never waits for a sink (the hung one blocks for 30 s)
        assert flaky.got.acquire(timeout=5) and flaky.got.acquire(timeout=5)
        assert pager.got.acquire(timeout=5)
        assert [a.dedup_key for a, _ in pager.sent] == ["k2"]
        assert flaky.attempts == 5 and alerts.sink_stats()["flaky"].failed_attempts == 3
        assert not hung.sent  # still stuck, and it held nobody up
    finally:
        hung_gate.set()
        alerts.close()
    assert len(hung.sent) == 2  # close() drained it


def test_gives_up_after_attempts_and_drops_oldest_when_full() -> None:
    dead = RecordingSink("dead", fail_times=10**9)
    gate = threading.Event()
    slow = RecordingSink("slow", block=gate)
    alerts = service(dead, slow, queue_size=2, retry_attempts=2)
    try:
        alerts.raise_alert("r", "high", "s", "k0")
        deadline = time.monotonic() + 5
        while slow.attempts == 0 and time.monotonic() < deadline:  # "slow" is now stuck sending k0
            time.sleep(0.005)
        for i in range(1, 6):
            alerts.raise_alert("r", "high", "s", f"k{i}")
        gate.set()
        assert alerts.wait_delivered(5)
        stats = alerts.sink_stats()
        assert stats["dead"].given_up + stats["dead"].dropped_queue_full == 6
        assert stats["dead"].failed_attempts == 2 * stats["dead"].given_up
        # "slow" held k0 when the queue filled: k1..k3 were dropped, the newest two kept
        assert stats["slow"].dropped_queue_full == 3
        assert [a.dedup_key for a, _ in slow.sent] == ["k0", "k4", "k5"]
    finally:
        alerts.close()


def test_on_fired_callbacks_and_a_failing_callback() -> None:
    seen: list[tuple[str, int]] = []
    alerts = service()

    def boom(alert: Alert) -> None:
        raise RuntimeError("metrics down")

    alerts.on_fired(boom)
    alerts.on_fired(lambda a: seen.append((a.rule, a.count)))
    try:
        alerts.raise_alert("r", "low", "s", "k")
        alerts.raise_alert("r", "low", "s", "k")
        assert seen == [("r", 1), ("r", 2)]
    finally:
        alerts.close()


def test_flood_of_repeats_is_cheap_and_coalesced(tmp_path: Path) -> None:
    alerts = service(store=SqliteAlertStore(tmp_path / "a.sqlite3"))
    try:
        start = time.perf_counter()
        for _ in range(20_000):
            alerts.raise_alert("brute_force", "high", "s", "source:10.0.0.1")
        per_call = (time.perf_counter() - start) / 20_000
        print(f"\nraise_alert (repeat, SQLite store): {per_call * 1e6:.1f} us per call")
        assert per_call < 0.001  # no fsync on the caller's thread
        [stored] = alerts.list()
        assert stored.count == 20_000
    finally:
        alerts.close()


# --- a real receiver that is down, then comes back ------------------------------------

SECRET = b"k" * 32


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Receiver:
    def __init__(self, port: int) -> None:
        self.received: list[dict[str, Any]] = []
        self.got = threading.Event()
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                ok = verify(SECRET, self.headers[TIMESTAMP_HEADER], body, self.headers[SIGNATURE_HEADER])
                self.send_response(204 if ok else 401)
                self.end_headers()
                if ok:
                    outer.received.append(orjson.loads(body))
                    outer.got.set()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", port), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def port() -> Iterator[int]:
    yield free_port()


def test_receiver_down_then_back_gets_the_alert(port: int) -> None:
    sink = WebhookSink(WebhookSinkSettings(url=f"http://127.0.0.1:{port}/hook", secret=SECRET, timeout_seconds=1))
    alerts = AlertService(MemoryAlertStore(), [sink], FakeClock(), retry_initial_seconds=0.1,
                          retry_max_seconds=0.5, retry_attempts=50)
    receiver: Receiver | None = None
    try:
        start = time.perf_counter()
        alerts.raise_alert("brute_force", "high", "s", "source:10.0.0.1")
        assert time.perf_counter() - start < 0.5
        time.sleep(0.5)
        assert alerts.sink_stats()[sink.name].failed_attempts >= 1
        receiver = Receiver(port)
        assert receiver.got.wait(10)
        assert receiver.received[0]["alert"]["rule"] == "brute_force"
    finally:
        alerts.close()
        if receiver is not None:
            receiver.stop()
