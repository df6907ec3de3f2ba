"""The application firewall: the first thing every HTTP request meets after its request id.

In order: the real client address (Forwarded / X-Forwarded-* believed only from
``trusted_proxies``), the Host header (refused unless allowed when links are built
from it), source allow-lists for /admin and the login pages, token buckets per source
address (tighter on the authentication routes), then, for a request with a valid
bearer token, the client's own source allow-list and the per-client and per-user
buckets. A refusal is a FHIR OperationOutcome (400, 403 or 429 with Retry-After), a
metric, and at most one audit record and alert per bucket (or allow-list) per window.
"""

from __future__ import annotations

import base64
import binascii
import collections
import hashlib
import ipaddress
import logging
import math
import re
import time
from collections.abc import Callable, Iterable

import orjson

from fhirvault.config import Settings
from fhirvault.domain import errors
from fhirvault.domain.errors import OperationOutcomeError
from fhirvault.ports import ResourceStore
from fhirvault.services.auth import AuthService, Principal, TokenError, source_allowed
from fhirvault.services.detection import DetectionEngine
from fhirvault.services.firewall_settings import FirewallSettings, Network
from fhirvault.services.metrics import Metrics
from fhirvault.services.ratelimit import BucketLimit, RateLimiter
from fhirvault.services.repository import Repository, RequestContext
from fhirvault.web.asgi import ASGIApp, Receive, Scope, Send, send_outcome, send_response
from fhirvault.web.context import VERIFIED_KEY, request_id_of

log = logging.getLogger("fhirvault.firewall")
PEER_KEY = "fhirvault.peer"  # the TCP peer's address, when a trusted proxy's header replaced it
# SHA-256 thumbprint (base64url) of the client certificate a trusted TLS-terminating proxy verified and
# forwarded in an RFC 9440 Client-Cert header: tokens issued then are bound to it (RFC 8705 §3).
CLIENT_CERT_KEY = "fhirvault.client_cert_x5t"
RATE_LIMITED = "rate_limited"  # alert rule
_HEALTH = frozenset({"/livez", "/readyz"})
_AUTH_PATHS = frozenset({"/oauth2/token", "/oauth2/revoke", "/oauth2/introspect", "/oauth2/authorize", "/logout",
                         "/console/login", "/console/login/totp"})
_LOGIN_PATHS = frozenset({"/oauth2/authorize", "/logout"})
_WILDCARD_BINDS = frozenset({"", "0.0.0.0", "::", "[::]"})  # noqa: S104 (recognised, not bound)
_LOOPBACK_HOSTS = ("localhost", "127.0.0.1", "[::1]")
_CLIENT_CACHE_S = 10.0  # a client's allow-list is re-read this often (a CLI change applies within it)
_MAX_HEADER_HOPS = 64


# -- real client address ---------------------------------------------------------------------------

def _address(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """An IP address from a Forwarded ``for=`` / X-Forwarded-For item (ports and brackets stripped)."""
    value = text.strip().strip('"')
    if value.startswith("["):
        value = value[1:].partition("]")[0]
    elif value.count(":") == 1:  # IPv4 with a port
        value = value.partition(":")[0]
    try:
        address = ipaddress.ip_address(value)
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def _forwarded(value: str) -> list[tuple[str, str | None]]:
    """RFC 7239 elements as (for, proto), in order. Quoted commas do not occur in for/proto values."""
    hops: list[tuple[str, str | None]] = []
    for element in value.split(","):
        pairs = {}
        for pair in element.split(";"):
            key, _, val = pair.partition("=")
            pairs[key.strip().lower()] = val.strip().strip('"')
        hops.append((pairs.get("for", ""), pairs.get("proto")))
    return hops


class ProxyResolver:
    def __init__(self, trusted: tuple[Network, ...]) -> None:
        self.trusted = trusted
        self._memo: dict[str, tuple[str | None, bool]] = {}  # hop text -> (address, trusted)

    def _hop(self, text: str) -> tuple[str | None, bool]:
        """The address in a hop (None if not one) and whether it is a trusted proxy, memoised: parsing
        with ``ipaddress`` costs microseconds, and the same few peers and proxies come back all day."""
        found = self._memo.get(text)
        if found is None:
            address = _address(text)
            found = (str(address) if address is not None else None,
                     address is not None and any(address in net for net in self.trusted))
            if len(self._memo) >= 4096:  # hops can be client-written: bounded
                self._memo.clear()
            self._memo[text] = found
        return found

    def trusts(self, peer: str | None) -> bool:
        return bool(self.trusted) and peer is not None and self._hop(peer)[1]

    def resolve(self, peer: str | None, headers: Iterable[tuple[bytes, bytes]]) -> tuple[str, str | None] | None:
        """(client address, scheme or None) when ``peer`` is a trusted proxy that forwarded one, else None.

        Hops are walked right to left (nearest first), skipping trusted proxies: the first untrusted
        hop is the client. Entries left of it were written by the client itself and are ignored."""
        if not self.trusted or peer is None or not self._hop(peer)[1]:
            return None
        forwarded: list[str] = []
        xff: list[str] = []
        xfp: list[str] = []
        for name, raw in headers:
            if name == b"forwarded":
                forwarded.append(raw.decode("latin-1"))
            elif name == b"x-forwarded-for":
                xff.append(raw.decode("latin-1"))
            elif name == b"x-forwarded-proto":
                xfp.append(raw.decode("latin-1"))
        if not (forwarded or xff or xfp):
            return None
        if forwarded:  # the standard header wins over the de-facto ones
            hops = _forwarded(",".join(forwarded))
        else:
            fors = [f for f in ",".join(xff).split(",") if f.strip()] or [peer]
            protos = [p.strip() for p in ",".join(xfp).split(",") if p.strip()]
            # X-Forwarded-Proto: the value beside each hop when the lists line up, else the first (edge) one.
            if len(protos) != len(fors):
                protos = [protos[0] if protos else ""] * len(fors)
            hops = [(f, p or None) for f, p in zip(fors, protos, strict=True)]
        hops = hops[-_MAX_HEADER_HOPS:]
        if not hops:
            return None
        chosen: tuple[str, str | None] | None = None
        nearest = peer
        for hop_for, proto in reversed(hops):
            address, trusted = self._hop(hop_for)
            if address is None:  # "unknown", an obfuscated name, garbage: stop at the last proxy we know
                chosen = (nearest, proto)
                break
            if not trusted:
                chosen = (address, proto)
                break
            nearest = address
        if chosen is None:  # every hop is one of ours: the furthest is the client
            chosen = (nearest, hops[0][1])
        client, proto = chosen
        scheme = proto.lower() if proto and proto.lower() in ("http", "https") else None
        return client, scheme


def cert_thumbprint(value: bytes) -> str | None:
    """``x5t#S256`` of an RFC 9440 ``Client-Cert`` value (a structured-field byte sequence ``:b64(DER):``)."""
    text = value.strip()
    if len(text) < 3 or text[:1] != b":" or text[-1:] != b":":
        return None
    try:
        der = base64.b64decode(text[1:-1], validate=True)
    except binascii.Error:
        return None
    return base64.urlsafe_b64encode(hashlib.sha256(der).digest()).rstrip(b"=").decode() if der else None


# -- Host header ----------------------------------------------------------------------------------

def default_allowed_hosts(settings: Settings) -> tuple[str, ...] | None:
    """The Host names accepted; None: any (links never use Host when public_base_url is set)."""
    if settings.allowed_hosts is not None:
        return None if "*" in settings.allowed_hosts else settings.allowed_hosts
    if settings.public_base_url:
        return None
    bind = settings.host.lower()
    extra = () if bind in _WILDCARD_BINDS else (f"[{bind}]" if ":" in bind and not bind.startswith("[") else bind,)
    return tuple(dict.fromkeys((*_LOOPBACK_HOSTS, *extra)))


_HOST_HEADER = re.compile(r"^(?P<name>[a-z0-9.\-]{1,253}|\[[0-9a-f:.]{2,45}\])(?::[0-9]{1,5})?$")


def _host_name(host: str) -> str | None:
    """The name in a Host header without its port; None unless it is exactly name[:port]."""
    match = _HOST_HEADER.match(host.strip().lower())
    return match["name"] if match else None


def host_allowed(allowed: tuple[str, ...], host: str) -> bool:
    name = _host_name(host)
    if name is None:
        return False
    name = name.rstrip(".")
    return any(name == a or (a.startswith("*.") and name.endswith(a[1:])) for a in allowed)


def _is_local_address(scope: Scope, host: str) -> bool:
    """Host names the address the client connected to (``http://10.1.2.3:8080``): nothing an attacker
    can choose, so links built from it are safe. A server bound to every interface answers on each."""
    server = scope.get("server")
    if not server or not server[0]:
        return False
    local = str(server[0]).lower()
    return _host_name(host) == (f"[{local}]" if ":" in local else local)


# -- the middleware ---------------------------------------------------------------------------------

class Firewall:
    def __init__(self, app: ASGIApp, settings: Settings, *, auth: AuthService, store: ResourceStore,
                 repo: Repository, metrics: Metrics | None = None, detection: DetectionEngine | None = None,
                 monotonic: Callable[[], float] = time.monotonic) -> None:
        self.app = app
        fw = settings.firewall or FirewallSettings()
        self._fw = fw
        self._auth = auth
        self._store = store
        self._repo = repo
        self._metrics = metrics
        self._detection = detection
        self._now = monotonic
        self._proxies = ProxyResolver(tuple(ipaddress.ip_network(n) for n in settings.trusted_proxies))
        self._hosts = default_allowed_hosts(settings)

        def limiter(rate: float, burst: int) -> RateLimiter:
            return RateLimiter(BucketLimit(rate, burst), max_keys=fw.max_tracked, monotonic=monotonic)

        self._source = limiter(fw.source_rate, fw.source_burst)
        self._auth_source = limiter(fw.auth_rate, fw.auth_burst)
        self._client = limiter(fw.client_rate, fw.client_burst)
        self._user = limiter(fw.user_rate, fw.user_burst)
        self._client_allow: collections.OrderedDict[str, tuple[float, str | None]] = collections.OrderedDict()
        self._refusals_noted: collections.OrderedDict[str, float] = collections.OrderedDict()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        client = scope.get("client")
        peer = str(client[0]) if client else None
        scope.pop(CLIENT_CERT_KEY, None)
        if self._proxies.trusts(peer):
            cert = next((v for k, v in scope["headers"] if k == b"client-cert"), None)
            if cert is not None and (x5t := cert_thumbprint(cert)) is not None:
                scope[CLIENT_CERT_KEY] = x5t
        resolved = self._proxies.resolve(peer, scope["headers"])
        if resolved is not None:
            scope[PEER_KEY] = client[0] if client else None
            scope["client"] = (resolved[0], 0)
            if resolved[1] is not None:
                scope["scheme"] = resolved[1]
        path: str = scope["path"]
        if path in _HEALTH:  # probes: no Host, rate or source rules (they reveal nothing)
            await self.app(scope, receive, send)
            return
        try:
            await self._check(scope, path)
        except OperationOutcomeError as exc:
            if path in _OAUTH_JSON:  # OAuth clients parse RFC 6749 error bodies, not OperationOutcomes
                await send_response(send, exc.status, orjson.dumps(_oauth_error(exc)),
                                    {"Content-Type": "application/json", "Cache-Control": "no-store", **exc.headers})
                return
            await send_outcome(send, exc, scope["method"] == "HEAD")
            return
        await self.app(scope, receive, send)

    async def _check(self, scope: Scope, path: str) -> None:
        fw = self._fw
        if self._hosts is not None:
            host = next((v.decode("latin-1") for k, v in scope["headers"] if k == b"host"), "")
            if not host_allowed(self._hosts, host) and not _is_local_address(scope, host):
                self._refused("host")
                raise errors.bad_request("Unknown Host. Set public_base_url (or allowed_hosts) to serve this name.")
        client = scope.get("client")
        source = str(client[0]) if client else None
        if fw.admin_allowed_sources and (path in ("/admin", "/console") or path.startswith(("/admin/", "/console/"))):
            await self._allow_list(scope, "admin", source, fw.admin_allowed_sources)
        if fw.login_allowed_sources and (path in _LOGIN_PATHS or path.startswith("/login/")):
            await self._allow_list(scope, "login", source, fw.login_allowed_sources)
        principal = self._principal(scope)
        if principal is not None:
            if principal.cnf_x5t is not None and scope.get(CLIENT_CERT_KEY) != principal.cnf_x5t:
                await self._refuse_unbound(scope, principal)
            if not source_allowed(self._client_sources(principal.client_id), source):
                await self._refuse_source(scope, "client", f"client {principal.client_id}", principal)
        if not fw.enabled:
            return
        if source is not None:
            await self._take(scope, self._source, "source", source)
            if scope["method"] == "POST" and path in _AUTH_PATHS:  # where passwords and secrets are checked
                await self._take(scope, self._auth_source, "auth", source)
        if principal is not None:
            await self._take(scope, self._client, "client", principal.client_id, principal)
            if principal.user is not None:
                await self._take(scope, self._user, "user", principal.user, principal)

    async def _refuse_unbound(self, scope: Scope, principal: Principal) -> None:
        """RFC 8705 §3: a certificate-bound token without (or with another) client certificate."""
        self._refused("certificate")
        if self._first(f"cnf:{principal.client_id}"):
            await self._repo.audit_event(self._ctx(scope, principal), "authenticate", 401,
                                         "access token bound to another client certificate", category="security")
        exc = errors.unauthorized("The access token is bound to a client certificate this request did not present.")
        exc.headers = {"WWW-Authenticate": 'Bearer realm="fhirvault", error="invalid_token"'}
        raise exc

    def _principal(self, scope: Scope) -> Principal | None:
        """The caller of a request with a valid bearer token (verification is cached by the service)."""
        header = next((v for k, v in scope["headers"] if k == b"authorization"), None)
        if header is None or header[:7].lower() != b"bearer ":
            return None
        token = header[7:].decode("latin-1").strip()
        try:
            principal = self._auth.verify(token)
        except TokenError as exc:
            scope[VERIFIED_KEY] = (token, exc)
            return None  # the endpoint refuses it with the right 401 and audit record
        scope[VERIFIED_KEY] = (token, principal)
        return principal

    def _client_sources(self, client_id: str) -> str | None:
        now = self._now()
        cached = self._client_allow.get(client_id)
        if cached is not None and cached[0] > now:
            return cached[1]
        row = self._store.client(client_id)
        # A client that no longer exists keeps no allow-list here; its tokens die with it elsewhere.
        allowed = row.allowed_sources if row is not None else None
        self._client_allow[client_id] = (now + _CLIENT_CACHE_S, allowed)
        self._client_allow.move_to_end(client_id)
        if len(self._client_allow) > 10_000:
            self._client_allow.popitem(last=False)
        return allowed

    async def _allow_list(self, scope: Scope, kind: str, source: str | None, nets: tuple[Network, ...]) -> None:
        address = _address(source) if source is not None else None
        if address is None or not any(address in net for net in nets):
            await self._refuse_source(scope, kind, f"{kind} pages", None)

    async def _refuse_source(self, scope: Scope, kind: str, what: str, principal: Principal | None) -> None:
        self._refused(f"{kind}_source")
        client = scope.get("client")
        source = str(client[0]) if client else "-"
        if self._first(f"allow:{kind}:{source}:{principal.client_id if principal else ''}"):
            await self._repo.audit_event(self._ctx(scope, principal), "firewall", 403,
                                         f"source address not allowed for {what}", category="security")
        raise errors.forbidden("This address is not allowed to use this service.")

    async def _take(self, scope: Scope, limiter: RateLimiter, kind: str, key: str,
                    principal: Principal | None = None) -> None:
        wait = limiter.take(key)
        if wait <= 0.0:
            return
        if self._metrics is not None:
            self._metrics.rate_limited(kind)
        if limiter.first_refusal_in(key, self._fw.report_window_seconds):
            log.warning("rate limited", extra={"bucket": kind})
            await self._repo.audit_event(self._ctx(scope, principal), "rate-limit", 429,
                                         f"rate limit reached ({kind} bucket: {limiter.limit.rate:g}/s, "
                                         f"burst {limiter.limit.burst})", category="security")
            if self._detection is not None:
                who = key if kind != "user" else "a user"
                self._detection.system_alert(RATE_LIMITED, "medium", f"rate limit reached by {kind} {who[:128]}",
                                             f"ratelimit:{kind}:{key[:128]}", {"bucket": kind})
        raise errors.too_many_requests("Too many requests; slow down and retry after the delay given.",
                                       max(1, math.ceil(wait)))

    def _ctx(self, scope: Scope, principal: Principal | None) -> RequestContext:
        client = scope.get("client")
        return RequestContext(principal, request_id_of(scope), str(client[0]) if client else None)

    def _first(self, key: str) -> bool:
        """Once per report window per key (allow-list refusals; buckets keep their own)."""
        now = self._now()
        last = self._refusals_noted.get(key)
        if last is not None and now - last < self._fw.report_window_seconds:
            return False
        self._refusals_noted[key] = now
        self._refusals_noted.move_to_end(key)
        if len(self._refusals_noted) > self._fw.max_tracked:
            self._refusals_noted.popitem(last=False)
        return True

    def _refused(self, reason: str) -> None:
        if self._metrics is not None:
            self._metrics.firewall_refused(reason)


_OAUTH_JSON = frozenset({"/oauth2/token", "/oauth2/revoke", "/oauth2/introspect"})


def _oauth_error(exc: OperationOutcomeError) -> dict[str, str]:
    """The firewall's refusal as an OAuth 2.0 error (RFC 6749 section 5.2 shape)."""
    code = {429: "temporarily_unavailable", 403: "access_denied"}.get(exc.status, "invalid_request")
    return {"error": code, "error_description": "; ".join(i.diagnostics for i in exc.issues)}
