"""Shared machinery for the ``bench/`` load generators.

Kept deliberately small and cheap per request, because the load generator
usually shares a 2-core machine with the server under test:

* one aiohttp ``ClientSession``/``TCPConnector`` per process (keep-alive,
  ``limit`` = virtual users of that process), uvloop when importable;
* latencies recorded with ``time.perf_counter_ns`` into ``array('q')`` buffers
  (8 bytes a sample, exact percentiles, cheap to ship between processes);
* OAuth2 ``client_credentials`` token fetch + background refresh;
* a multiprocessing runner that splits virtual users over ``P`` spawned
  processes, starts them together (barrier) and merges their samples.

This module has no knowledge of FHIR resources: see ``crud.py``.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import gc
import json
import math
import multiprocessing as mp
import queue
import sys
import time
from array import array
from collections.abc import Callable, Coroutine, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
from yarl import URL

try:
    import orjson

    def dumps(obj: Any) -> bytes:
        return orjson.dumps(obj)

    def loads(data: bytes | str) -> Any:
        return orjson.loads(data)

    JSON_LIB = "orjson"
except ImportError:  # pragma: no cover - orjson is a fhirvault dependency

    def dumps(obj: Any) -> bytes:
        return json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode()

    def loads(data: bytes | str) -> Any:
        return json.loads(data)

    JSON_LIB = "json"

FHIR_JSON = "application/fhir+json"
USER_AGENT = "fhirvault-bench/0.1"
NEVER = 1 << 62  # "no deadline", in perf_counter_ns units
MAX_ERROR_SAMPLES = 32
BODY_SNIPPET = 200

perf_counter_ns = time.perf_counter_ns


# ---------------------------------------------------------------------------
# Recording
# ---------------------------------------------------------------------------


class Op:
    """One (operation kind, resource type) pair: its latency samples and errors."""

    __slots__ = ("errors", "key", "kind", "resource", "samples")

    def __init__(self, kind: str, resource: str) -> None:
        self.kind = kind
        self.resource = resource
        self.key = f"{kind} {resource}"
        self.samples: array[int] = array("q")  # latencies in ns, measured window only
        self.errors = 0  # errors in the measured window


class Recorder:
    """Per-process bookkeeping of the measured window, samples and errors."""

    def __init__(self, ops: Iterable[Op]) -> None:
        self.ops = list(ops)
        self.measure_start = NEVER  # perf_counter_ns; set by start()
        self.measure_end = NEVER
        self.last_end = 0  # end of the last request counted in the window
        self.outside_errors = 0  # errors during warmup / drain
        self.error_samples: dict[str, list[Any]] = {}  # "op|status" -> [count, snippet]

    def start(self, now_ns: int, warmup_s: float, duration_s: float) -> None:
        self.measure_start = now_ns + int(warmup_s * 1e9)
        self.measure_end = self.measure_start + int(duration_s * 1e9) if duration_s > 0 else NEVER
        self.last_end = self.measure_start

    def stop(self, now_ns: int) -> None:
        """Close the measured window early: later requests (e.g. cleanup) are not counted.

        Requests made before ``start()`` (e.g. a setup phase) are not counted either.
        """
        self.measure_end = min(self.measure_end, max(now_ns, self.measure_start))

    def sample(self, op: Op, t0: int, t1: int) -> bool:
        """Record one request; return True if it falls in the measured window."""
        if self.measure_start <= t0 < self.measure_end:
            op.samples.append(t1 - t0)
            if t1 > self.last_end:
                self.last_end = t1
            return True
        return False

    def error(self, op: Op, in_window: bool, status: str, body: bytes | str) -> None:
        if in_window:
            op.errors += 1
        else:
            self.outside_errors += 1
        key = f"{op.key}|{status}"
        entry = self.error_samples.get(key)
        if entry is not None:
            entry[0] += 1
        elif len(self.error_samples) < MAX_ERROR_SAMPLES:
            text = body.decode("utf-8", "replace") if isinstance(body, bytes) else body
            self.error_samples[key] = [1, text[:BODY_SNIPPET]]

    def result(self, iterations: int, cpu_s: float, wall_s: float) -> dict[str, Any]:
        """Picklable summary shipped back to the parent process."""
        return {
            "samples": {op.key: op.samples.tobytes() for op in self.ops},
            "errors": {op.key: op.errors for op in self.ops},
            "outside_errors": self.outside_errors,
            "error_samples": self.error_samples,
            "iterations": iterations,
            "elapsed_ns": max(0, self.last_end - self.measure_start),
            "cpu_s": cpu_s,
            "wall_s": wall_s,
        }


# ---------------------------------------------------------------------------
# Authentication
# ---------------------------------------------------------------------------


class TokenError(RuntimeError):
    pass


class Auth:
    """Holds the request header dicts; fetches/refreshes a client_credentials token.

    The header dicts are replaced (never mutated) on refresh, so in-flight
    requests keep a consistent view.
    """

    def __init__(
        self,
        *,
        token: str | None = None,
        client_file: str | None = None,
        token_url: str | None = None,
        scope: str = "system/*.cruds",
        timeout_s: float = 30.0,
    ) -> None:
        self._static_token = token
        self._client: tuple[str, str] | None = None
        if client_file:
            data = json.loads(Path(client_file).read_text())
            try:
                self._client = (str(data["client_id"]), str(data["client_secret"]))
            except (KeyError, TypeError) as exc:
                raise TokenError(
                    f"{client_file}: expected {{'client_id': ..., 'client_secret': ...}}"
                ) from exc
            if not token_url:
                raise TokenError("--client-file needs --token-url")
        self._token_url = token_url
        self._scope = scope
        self._timeout = aiohttp.ClientTimeout(total=timeout_s)
        self._session: aiohttp.ClientSession | None = None
        self._task: asyncio.Task[None] | None = None
        self._wake = asyncio.Event()
        self._fetched_at = 0.0
        self.refreshes = 0
        self.plain_headers: dict[str, str] = {}
        self.body_headers: dict[str, str] = {}
        self._set_token(token)

    def _set_token(self, token: str | None) -> None:
        plain = {"Accept": FHIR_JSON}
        if token:
            plain["Authorization"] = f"Bearer {token}"
        self.plain_headers = plain
        self.body_headers = {**plain, "Content-Type": FHIR_JSON}

    async def start(self) -> None:
        if self._client is None:
            return
        self._session = aiohttp.ClientSession(
            timeout=self._timeout, headers={"User-Agent": USER_AGENT}
        )
        expires_in = await self._fetch()
        self._task = asyncio.create_task(self._refresher(expires_in))

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self._session is not None:
            await self._session.close()

    def invalidate(self) -> None:
        """Ask for an early refresh (e.g. after a 401); rate-limited to one per 5 s."""
        if self._client is not None and time.monotonic() - self._fetched_at > 5.0:
            self._wake.set()

    async def _fetch(self) -> float:
        assert self._session is not None and self._client is not None
        assert self._token_url is not None
        client_id, secret = self._client
        basic = base64.b64encode(f"{client_id}:{secret}".encode()).decode()
        async with self._session.post(
            self._token_url,
            data={"grant_type": "client_credentials", "scope": self._scope},
            headers={"Authorization": f"Basic {basic}", "Accept": "application/json"},
        ) as resp:
            body = await resp.read()
            if resp.status != 200:
                raise TokenError(
                    f"token endpoint {self._token_url} answered {resp.status}: "
                    f"{body[:BODY_SNIPPET].decode('utf-8', 'replace')}"
                )
        try:
            doc = loads(body)
            token = str(doc["access_token"])
        except (ValueError, KeyError, TypeError) as exc:
            raise TokenError(f"bad token response: {body[:BODY_SNIPPET]!r}") from exc
        expires_in = float(doc.get("expires_in") or 300)
        self._set_token(token)
        self._fetched_at = time.monotonic()
        self.refreshes += 1
        return expires_in

    async def _refresher(self, expires_in: float) -> None:
        while True:
            # Refresh before expiry: 20 % of the lifetime early, at most 30 s early.
            delay = max(1.0, expires_in - min(30.0, expires_in * 0.2))
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), timeout=delay)
            try:
                expires_in = await self._fetch()
            except Exception as exc:
                print(f"warning: token refresh failed: {exc}", file=sys.stderr)
                expires_in = 12.5  # i.e. retry in 10 s


# ---------------------------------------------------------------------------
# HTTP
# ---------------------------------------------------------------------------


class Client:
    """Thin timed wrapper around one shared aiohttp session."""

    def __init__(self, session: aiohttp.ClientSession, auth: Auth, rec: Recorder) -> None:
        self.session = session
        self.auth = auth
        self.rec = rec

    async def call(
        self, op: Op, method: str, url: URL, body: bytes | None
    ) -> tuple[int, bytes, str | None] | None:
        """Send one request.

        Returns (status, body, Location header) on 2xx, None on error (already recorded).
        """
        headers = self.auth.plain_headers if body is None else self.auth.body_headers
        t0 = perf_counter_ns()
        try:
            async with self.session.request(method, url, data=body, headers=headers) as resp:
                data = await resp.read()
                status = resp.status
                location = resp.headers.get("Location")
        except Exception as exc:
            in_window = self.rec.sample(op, t0, perf_counter_ns())
            self.rec.error(op, in_window, type(exc).__name__, str(exc) or repr(exc))
            return None
        in_window = self.rec.sample(op, t0, perf_counter_ns())
        if 200 <= status < 300:
            return status, data, location
        if status == 401:
            self.auth.invalidate()
        self.rec.error(op, in_window, f"HTTP {status}", data)
        return None

    def fail(self, op: Op, t0: int, reason: str, body: bytes) -> None:
        """Count a 2xx answer that was unusable (e.g. no id) as an error."""
        self.rec.error(op, self.rec.measure_start <= t0 < self.rec.measure_end, reason, body)


def make_session(n_users: int, timeout_s: float) -> aiohttp.ClientSession:
    connector = aiohttp.TCPConnector(
        limit=n_users, limit_per_host=n_users, keepalive_timeout=75, ttl_dns_cache=None
    )
    return aiohttp.ClientSession(
        connector=connector,
        timeout=aiohttp.ClientTimeout(total=timeout_s),
        headers={"User-Agent": USER_AGENT},
        cookie_jar=aiohttp.DummyCookieJar(),
    )


# ---------------------------------------------------------------------------
# Processes
# ---------------------------------------------------------------------------


@dataclass(slots=True)
class WorkerSpec:
    """What one process runs: a contiguous slice of the virtual users."""

    index: int
    first_user: int
    n_users: int
    options: dict[str, Any] = field(default_factory=dict)


Barrier = Any  # multiprocessing.synchronize.Barrier (not constructible for typing)
Worker = Callable[[WorkerSpec, Barrier], dict[str, Any]]


def split_users(clients: int, processes: int) -> list[tuple[int, int]]:
    """(first_user, n_users) per process, as even as possible."""
    processes = max(1, min(processes, clients))
    base, extra = divmod(clients, processes)
    out: list[tuple[int, int]] = []
    first = 0
    for i in range(processes):
        n = base + (1 if i < extra else 0)
        out.append((first, n))
        first += n
    return out


def _child(worker: Worker, spec: WorkerSpec, barrier: Barrier, results: Any) -> None:
    try:
        results.put((spec.index, worker(spec, barrier), None))
    except BaseException as exc:
        with contextlib.suppress(Exception):
            barrier.abort()
        results.put((spec.index, None, f"{type(exc).__name__}: {exc}"))


def run_processes(worker: Worker, specs: Sequence[WorkerSpec]) -> list[dict[str, Any]]:
    """Run ``worker`` once per spec, in-process for one spec, else in spawned processes."""
    if len(specs) == 1:
        return [worker(specs[0], None)]
    ctx = mp.get_context("spawn")
    barrier = ctx.Barrier(len(specs))
    results = ctx.Queue()
    procs = [
        ctx.Process(target=_child, args=(worker, spec, barrier, results), daemon=True)
        for spec in specs
    ]
    for p in procs:
        p.start()
    out: dict[int, dict[str, Any]] = {}
    failures: list[str] = []
    pending = len(procs)
    while pending:
        try:
            index, result, err = results.get(timeout=1.0)
        except queue.Empty:
            dead = [p for p in procs if p.exitcode not in (None, 0)]
            if dead:
                failures.append(f"worker process died with exit code {dead[0].exitcode}")
                break
            continue
        pending -= 1
        if err is not None:
            failures.append(f"process {index}: {err}")
        else:
            out[index] = result
    for p in procs:
        p.join(timeout=10)
        if p.is_alive():
            p.terminate()
    if failures:
        raise RuntimeError("; ".join(dict.fromkeys(failures)))
    return [out[i] for i in sorted(out)]


def uvloop_available() -> bool:
    try:
        import uvloop  # noqa: F401
    except ImportError:
        return False
    return True


def run_async(main: Coroutine[Any, Any, dict[str, Any]], use_uvloop: bool = True) -> dict[str, Any]:
    if use_uvloop:
        try:
            import uvloop
        except ImportError:
            pass
        else:
            result: dict[str, Any] = uvloop.run(main)
            return result
    return asyncio.run(main)


def tune_gc() -> None:
    """Cheaper GC during the run: freeze setup objects, collect young gen less often."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(20_000, 50, 100)


# ---------------------------------------------------------------------------
# Statistics
# ---------------------------------------------------------------------------


def percentile(sorted_ns: Sequence[int], p: float) -> float:
    """Nearest-rank percentile, in milliseconds."""
    if not sorted_ns:
        return 0.0
    idx = max(0, math.ceil(p / 100.0 * len(sorted_ns)) - 1)
    return sorted_ns[idx] / 1e6


def summarize(samples: array[int], errors: int, elapsed_s: float) -> dict[str, Any]:
    data = sorted(samples)
    n = len(data)
    return {
        "count": n,
        "rps": round(n / elapsed_s, 2) if elapsed_s > 0 else 0.0,
        "mean_ms": round(sum(data) / n / 1e6, 3) if n else 0.0,
        "p50_ms": round(percentile(data, 50), 3),
        "p95_ms": round(percentile(data, 95), 3),
        "p99_ms": round(percentile(data, 99), 3),
        "max_ms": round(data[-1] / 1e6, 3) if n else 0.0,
        "errors": errors,
    }


@dataclass(slots=True)
class Merged:
    samples: dict[str, array[int]]
    errors: dict[str, int]
    outside_errors: int
    error_samples: dict[str, list[Any]]
    iterations: int
    elapsed_s: float
    cpu_s: float
    wall_s: float
    token_fetches: int


def merge(results: Sequence[dict[str, Any]]) -> Merged:
    samples: dict[str, array[int]] = {}
    errors: dict[str, int] = {}
    error_samples: dict[str, list[Any]] = {}
    for r in results:
        for key, raw in r["samples"].items():
            samples.setdefault(key, array("q")).frombytes(raw)
        for key, n in r["errors"].items():
            errors[key] = errors.get(key, 0) + n
        for key, (count, snippet) in r["error_samples"].items():
            if key in error_samples:
                error_samples[key][0] += count
            else:
                error_samples[key] = [count, snippet]
    return Merged(
        samples=samples,
        errors=errors,
        outside_errors=sum(r["outside_errors"] for r in results),
        error_samples=error_samples,
        iterations=sum(r["iterations"] for r in results),
        elapsed_s=max((r["elapsed_ns"] for r in results), default=0) / 1e9,
        cpu_s=sum(r["cpu_s"] for r in results),
        wall_s=max((r["wall_s"] for r in results), default=0.0),
        token_fetches=sum(r.get("token_fetches", 0) for r in results),
    )


def group(merged: Merged, keys: Iterable[str]) -> tuple[array[int], int]:
    """Concatenate the samples and add the errors of several op keys."""
    out: array[int] = array("q")
    errors = 0
    for key in keys:
        out.extend(merged.samples.get(key, array("q")))
        errors += merged.errors.get(key, 0)
    return out, errors


HEADER = f"{'':<26}{'count':>9}{'req/s':>10}{'p50 ms':>9}{'p95 ms':>9}{'p99 ms':>9}{'max ms':>9}{'errors':>8}"


def format_row(label: str, s: dict[str, Any]) -> str:
    return (
        f"{label:<26}{s['count']:>9}{s['rps']:>10.1f}{s['p50_ms']:>9.2f}{s['p95_ms']:>9.2f}"
        f"{s['p99_ms']:>9.2f}{s['max_ms']:>9.2f}{s['errors']:>8}"
    )


def add_server_args(p: argparse.ArgumentParser) -> None:
    """The options every benchmark shares: where the server is and how to get a token."""
    p.add_argument("--base-url", required=True, help="FHIR base, e.g. http://127.0.0.1:8080/fhir")
    auth = p.add_mutually_exclusive_group()
    auth.add_argument("--token", help="static bearer token")
    auth.add_argument(
        "--client-file",
        help='JSON {"client_id": ..., "client_secret": ...} for the client_credentials grant',
    )
    p.add_argument(
        "--token-url",
        help="OAuth2 token endpoint for --client-file (default: <origin of --base-url>/oauth2/token)",
    )
    p.add_argument(
        "--scope", default="system/*.cruds", help="scope requested (default: %(default)s)"
    )
