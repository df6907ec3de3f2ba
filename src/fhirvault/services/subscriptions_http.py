"""Sending rest-hook notifications: resolve, check every address, connect to the checked one.

The host name is resolved for each new connection (a connection serves one subscription's notifications
of one batch); if any of its addresses is refused (domain/subscription.py ``address_refusal``) nothing is
sent, and the connection goes to the address that was checked (pinned),
so a DNS answer that changes between the check and the connect (rebinding) cannot redirect it. TLS
still verifies the certificate against the host name (SNI). Redirects are not followed; the response
body is not read beyond a few KiB; connect and read each have a timeout.
"""

from __future__ import annotations

import http.client
import ipaddress
import socket
import ssl
import time
from collections.abc import Iterable
from dataclasses import dataclass

from fhirvault.domain.subscription import Network, address_refusal, check_endpoint

_READ_LIMIT = 8192


class EndpointRefused(Exception):
    """The endpoint may not be contacted (scheme, or an address the policy refuses): no retry helps."""


@dataclass(frozen=True, slots=True)
class Sent:
    status: int | None  # HTTP status, or None when no response came
    error: str | None  # why it failed (no URL, header or content in it)
    seconds: float

    @property
    def ok(self) -> bool:
        return self.status is not None and 200 <= self.status < 300


def resolve(host: str, port: int, allowed: Iterable[Network]) -> str:
    """The address to connect to; EndpointRefused if the name does not resolve or any address is refused."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError):
        raise EndpointRefused("the endpoint's host name does not resolve") from None
    addresses = [ipaddress.ip_address(str(info[4][0]).split("%")[0]) for info in infos]
    nets = tuple(allowed)
    for address in addresses:
        reason = address_refusal(address, nets)
        if reason is not None:
            raise EndpointRefused(reason)
    if not addresses:
        raise EndpointRefused("the endpoint's host name does not resolve")
    return str(addresses[0])


class _PinnedHTTP(http.client.HTTPConnection):
    def __init__(self, host: str, port: int, address: str, timeout: float) -> None:
        super().__init__(host, port, timeout=timeout)
        self._address = address

    def connect(self) -> None:
        self.sock = socket.create_connection((self._address, self.port), self.timeout)


class _PinnedHTTPS(http.client.HTTPSConnection):
    def __init__(self, host: str, port: int, address: str, timeout: float) -> None:
        super().__init__(host, port, timeout=timeout, context=ssl.create_default_context())
        self._address = address

    def connect(self) -> None:
        raw = socket.create_connection((self._address, self.port), self.timeout)
        self.sock = self._context.wrap_socket(raw, server_hostname=self.host)  # type: ignore[attr-defined]


def endpoint_problem(url: str, *, allow_http: bool, allowed: Iterable[Network]) -> str | None:
    """Why ``url`` cannot receive notifications now (activation check), or None."""
    try:
        _scheme, host, port, _target = check_endpoint(url, allow_http=allow_http)
        resolve(host, port, allowed)
    except EndpointRefused as exc:
        return str(exc)
    except Exception:  # an OperationOutcomeError from check_endpoint
        return "the endpoint URL is not allowed"
    return None


class Session:
    """One subscription's notifications of one batch, over one kept-alive connection to the address that
    was checked when it opened. A request that fails on a reused connection (the receiver closed it while
    idle) is tried once more on a new one."""

    def __init__(self, url: str, *, allow_http: bool, allowed: Iterable[Network], timeout: float) -> None:
        try:
            self._scheme, self._host, self._port, self._target = check_endpoint(url, allow_http=allow_http)
        except Exception:
            raise EndpointRefused("the endpoint URL is not allowed") from None
        self._allowed = tuple(allowed)
        self._timeout = timeout
        self._conn: http.client.HTTPConnection | None = None

    def _connection(self) -> http.client.HTTPConnection:
        if self._conn is None:
            address = resolve(self._host, self._port, self._allowed)
            kind = _PinnedHTTPS if self._scheme == "https" else _PinnedHTTP
            self._conn = kind(self._host, self._port, address, self._timeout)
        return self._conn

    def post(self, headers: list[tuple[str, str]], body: bytes | None) -> Sent:
        """POST ``body`` (None: no body); EndpointRefused if the address is not allowed, else never raises."""
        started = time.monotonic()
        reused = self._conn is not None
        sent = self._attempt(headers, body, started)
        if sent.status is None and reused:
            sent = self._attempt(headers, body, started)
        return sent

    def _attempt(self, headers: list[tuple[str, str]], body: bytes | None, started: float) -> Sent:
        conn = self._connection()
        try:
            conn.putrequest("POST", self._target, skip_accept_encoding=True)
            for name, value in headers:
                conn.putheader(name, value)
            conn.putheader("Content-Length", str(len(body or b"")))
            conn.endheaders(body or None)
            response = conn.getresponse()
            response.read(_READ_LIMIT)
            if not response.isclosed() or response.will_close:  # a longer body than we read, or closing anyway
                self.close()
            return Sent(response.status, None if 200 <= response.status < 300 else f"HTTP {response.status}",
                        time.monotonic() - started)
        except TimeoutError:
            self.close()
            return Sent(None, "timed out", time.monotonic() - started)
        except ssl.SSLError as exc:
            self.close()
            return Sent(None, f"TLS error ({type(exc).__name__})", time.monotonic() - started)
        except (OSError, http.client.HTTPException) as exc:
            self.close()
            return Sent(None, f"connection failed ({type(exc).__name__})", time.monotonic() - started)

    def close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.close()
