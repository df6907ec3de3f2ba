#!/usr/bin/env python3
"""Cost of the application firewall per request, in process (no network, no server noise).

Builds a fresh data directory and the firewall in front of an app that does nothing, then times
requests through it: an anonymous one (Host check, source bucket), one behind a trusted proxy
(X-Forwarded-For walk), and one with a bearer token (cached token check, client allow-list, client
bucket). Prints microseconds per request for each, against the do-nothing app alone.

Usage: python bench/firewall.py [--requests 50000]
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import tempfile
import time
from pathlib import Path
from typing import Any

from fhirvault.bootstrap import initialise
from fhirvault.config import load_settings
from fhirvault.container import build
from fhirvault.services.firewall_settings import FirewallSettings
from fhirvault.web.firewall import Firewall

_HUGE = FirewallSettings(source_rate=1e7, source_burst=10_000_000, client_rate=1e7, client_burst=10_000_000,
                         user_rate=1e7, user_burst=10_000_000)


async def _nothing(scope: Any, receive: Any, send: Any) -> None:
    return None


async def _receive() -> dict[str, Any]:
    return {"type": "http.request", "body": b""}


async def _send(message: Any) -> None:
    return None


def _scope(peer: str, headers: list[tuple[bytes, bytes]]) -> dict[str, Any]:
    return {"type": "http", "method": "GET", "path": "/fhir/Patient", "scheme": "http", "query_string": b"",
            "client": (peer, 40000), "server": ("127.0.0.1", 8080),
            "headers": [(b"host", b"127.0.0.1:8080"), *headers]}


async def _time(app: Any, peer: str, headers: list[tuple[bytes, bytes]], n: int) -> float:
    start = time.perf_counter()
    for _ in range(n):
        await app(_scope(peer, headers), _receive, _send)
    return (time.perf_counter() - start) / n * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=50_000)
    n = parser.parse_args().requests
    with tempfile.TemporaryDirectory() as tmp:
        base = load_settings({"data_dir": Path(tmp) / "data"}, environ={})
        creds = json.loads(initialise(base).read_text())
        settings = dataclasses.replace(base, firewall=_HUGE, trusted_proxies=("10.0.0.0/8",))
        container = build(settings)
        try:
            row = container.store.client(creds["client_id"])
            assert row is not None
            token = container.auth.issue(row, None)["access_token"]
            firewall = Firewall(_nothing, settings, auth=container.auth, store=container.store,
                                repo=container.repository)
            bearer = [(b"authorization", f"Bearer {token}".encode())]
            forwarded = [(b"x-forwarded-for", b"198.51.100.1, 203.0.113.5, 10.1.1.1")]
            cases = [("do-nothing app alone", _nothing, "192.0.2.1", []),
                     ("anonymous", firewall, "192.0.2.1", []),
                     ("behind a trusted proxy", firewall, "10.0.0.1", forwarded),
                     ("bearer token", firewall, "192.0.2.1", bearer)]
            for name, app, peer, headers in cases:
                asyncio.run(_time(app, peer, headers, 1000))  # warm caches
                print(f"{name:24s} {asyncio.run(_time(app, peer, headers, n)):7.2f} us/request")
        finally:
            container.close()


if __name__ == "__main__":
    main()
