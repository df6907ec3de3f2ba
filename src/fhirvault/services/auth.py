"""Built-in OAuth 2.0 authorization server (client credentials) and token checks.

* Clients authenticate with ``client_secret_basic``, ``client_secret_post`` or
  ``private_key_jwt`` (SMART Backend Services: a JWT signed with a key from the
  client's registered JWK Set, ``iss``=``sub``=client id, ``aud``=token URL,
  short ``exp``, single-use ``jti``).
* Secrets are stored as Argon2id hashes (argon2-cffi); an unknown client costs
  the same hash as a known one, so timing does not reveal which ids exist.
* Access tokens are short-lived ES256 JWTs signed with a server key that is
  kept wrapped by the root key. Verified tokens are cached until they expire.
* Revocation: every check consults the revoked-jti set (after the cache, so a cached token is
  refused at once). Revocations made by this process are added to the set before the revoking
  call returns; other processes on the same database (server workers, the CLI) publish theirs,
  picked up at the next request (``before_check``: services/coherence.py); a direct write to
  ``revoked_jtis`` at most ``REVOCATION_POLL_S`` later.
"""

from __future__ import annotations

import base64
import dataclasses
import ipaddress
import secrets
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import orjson
from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError, VerifyMismatchError
from joserfc import jwt
from joserfc.errors import JoseError
from joserfc.jwk import ECKey, KeySet

from fhirvault.domain.scopes import (
    Grants,
    ResourceScope,
    ScopeError,
    narrow,
    operational_scopes,
    parse_scope,
    parse_scopes,
)
from fhirvault.ports import (
    AppRow,
    ClientRow,
    Clock,
    ResourceStore,
    RootKeyProvider,
    UserRow,
    WriteTx,
)
from fhirvault.services.crypto import DecryptionError, associated_data

JWT_BEARER_ASSERTION = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
ASSERTION_ALGORITHMS = ["RS384", "ES384", "RS256", "ES256", "PS384", "PS256"]
_ACCESS_ALG = "ES256"
SIGNING_META = "token-signing-key"
_TOKEN_CACHE_MAX = 50_000
_MAX_ASSERTION_LIFETIME_S = 300
REVOCATION_POLL_S = 1.0
# A revocation entry named ``client-cutoff:<client id>:<seconds>`` kills every token of that client
# issued at or before that second (client disabled or secret rotated); random jtis never contain ":".
_CUTOFF_PREFIX = "client-cutoff:"
# Non-resource scopes a SMART app may be registered for and request.
APP_SCOPES = frozenset({"openid", "fhirUser", "profile", "launch/patient", "offline_access", "online_access"})


class OAuthError(Exception):
    """An RFC 6749 §5.2 error response."""

    def __init__(self, error: str, description: str, status: int = 400) -> None:
        super().__init__(description)
        self.error = error
        self.description = description
        self.status = status

    def body(self) -> dict[str, str]:
        return {"error": self.error, "error_description": self.description}


class TokenError(Exception):
    """An access token was refused. The message is safe to show; it never includes the token."""


@dataclass(frozen=True, slots=True)
class Principal:
    """Who is calling: the client, and (for tokens issued after a user login) the user behind it.

    Claims in our access tokens: ``sub`` (user id, or the client id for client_credentials),
    ``client_id``, ``scope``, and for user tokens ``role`` (practitioner, nurse, admin_staff, patient,
    auditor, security_officer, platform_admin), ``fhirUser`` (e.g. ``Practitioner/123``), ``patient``
    (SMART launch context: the patient id a patient/ scope is bound to), ``org`` (the user's
    Organization id), ``sid`` (login session, for logout/revocation) and ``clearance`` (list of
    confidentiality codes, e.g. ``["R"]``, the user may read beyond normal data).
    """

    client_id: str
    tenant: str
    scope: str
    grants: Grants
    expires_at: int
    token_id: str
    user: str | None = None
    role: str | None = None
    fhir_user: str | None = None
    patient: str | None = None
    organization: str | None = None
    session_id: str | None = None
    # Confidentiality codes (v3 Confidentiality: R, V) this user may see beyond normal (N) data.
    clearances: frozenset[str] = frozenset()
    issued_at: int = 0  # seconds; tokens of a client issued before it was disabled or re-keyed die
    # RFC 8705: the token is bound to the client certificate with this SHA-256 thumbprint (cnf.x5t#S256).
    cnf_x5t: str | None = None


@dataclass(frozen=True, slots=True)
class NewClient:
    client_id: str
    client_secret: str | None
    name: str
    scope: str
    allowed_sources: str | None = None


_hasher = PasswordHasher()  # Argon2id, RFC 9106 low-memory profile defaults
_DUMMY_HASH = _hasher.hash(secrets.token_urlsafe(16))


def _signing_aad() -> bytes:
    return associated_data("token-signing-key")


class AuthService:
    def __init__(self, store: ResourceStore, root: RootKeyProvider, clock: Clock, *,
                 issuer: str, tenant: str, token_ttl_seconds: int) -> None:
        self._store = store
        self._root = root
        self._clock = clock
        self.issuer = issuer
        self.audience = issuer + "/fhir"
        self._tenant = tenant
        self._ttl = token_ttl_seconds
        self._key = self._load_signing_key()
        public = self._key.as_dict(private=False)
        self.kid = self._key.thumbprint()
        public.update({"kid": self.kid, "use": "sig", "alg": _ACCESS_ALG})
        self.jwks: dict[str, Any] = {"keys": [public]}
        self._verify_keys = KeySet.import_key_set(self.jwks)  # type: ignore[arg-type]
        self._cache: OrderedDict[str, Principal] = OrderedDict()
        self._cache_lock = threading.Lock()
        self._revoked: dict[str, int] = {}  # jti -> expiry (s)
        self._revoked_seq = 0
        self._revoked_polled = float("-inf")
        self._cutoffs: dict[str, tuple[int, int]] = {}  # client id -> (cut-off, entry expiry), seconds
        # Run first by every token check: with several server processes, applies what the others changed.
        self.before_check: Callable[[], None] | None = None

    # -- server signing key ---------------------------------------------------
    def _load_signing_key(self) -> ECKey:
        meta = self._store.get_meta(SIGNING_META)
        if meta is None:
            raise RuntimeError("token signing key missing; run 'fhirvault init'")
        doc = orjson.loads(meta)
        try:
            pem = self._root.unwrap(doc["root_key_id"], bytes.fromhex(doc["wrapped"]), _signing_aad())
        except DecryptionError:
            raise RuntimeError("token signing key does not unwrap with this root key") from None
        return ECKey.import_key(pem)

    @staticmethod
    def create_signing_key(tx: WriteTx, root: RootKeyProvider) -> None:
        pem = ECKey.generate_key("P-256").as_pem(private=True)
        root_id, wrapped = root.wrap(pem, _signing_aad())
        tx.set_meta(SIGNING_META, orjson.dumps({"root_key_id": root_id, "wrapped": wrapped.hex()}))

    @staticmethod
    def rewrap_signing_key(tx: WriteTx, old: RootKeyProvider, new: RootKeyProvider, meta: bytes) -> None:
        doc = orjson.loads(meta)
        pem = old.unwrap(doc["root_key_id"], bytes.fromhex(doc["wrapped"]), _signing_aad())
        root_id, wrapped = new.wrap(pem, _signing_aad())
        tx.set_meta(SIGNING_META, orjson.dumps({"root_key_id": root_id, "wrapped": wrapped.hex()}))

    # -- clients ----------------------------------------------------------------
    def register_client(self, name: str, scope: str, *, jwks: Mapping[str, Any] | None = None,
                        with_secret: bool = True, allowed_sources: Sequence[str] = ()) -> NewClient:
        """A backend client (client credentials). ``allowed_sources``: CIDRs it may call from
        (the token endpoint and every request with its tokens); empty: anywhere."""
        allowed = normalise_sources(allowed_sources)
        scopes = parse_scopes(scope)  # raises ScopeError with a clear message
        operational = operational_scopes(scope)
        if not scopes and not operational:
            raise ScopeError("at least one resource scope (e.g. system/*.cruds) or operational scope"
                             " (fhirvault/metrics.read) is required")
        if any(s.context != "system" for s in scopes):
            raise ScopeError("clients registered here use system/ scopes (user/ and patient/ need a login)")
        if jwks is not None:
            try:
                KeySet.import_key_set(dict(jwks))  # type: ignore[arg-type]
            except (JoseError, ValueError, TypeError, KeyError):
                raise ScopeError("the JWK Set is not valid") from None
        if not with_secret and jwks is None:
            raise ScopeError("a client without a secret needs a JWK Set")
        client_id = "fv-" + secrets.token_hex(10)
        secret = secrets.token_urlsafe(32) if with_secret else None
        row = ClientRow(
            client_id=client_id,
            tenant=self._tenant,
            name=name,
            secret_hash=_hasher.hash(secret) if secret else None,
            scopes=" ".join([*(str(s) for s in scopes), *operational]),
            jwks=orjson.dumps(dict(jwks)).decode() if jwks is not None else None,
            created_ms=self._clock.now_ms(),
            allowed_sources=allowed,
        )
        self._store.write_sync("clients.create", lambda tx: tx.insert_client(row))
        return NewClient(client_id, secret, name, row.scopes, allowed)

    def set_client_disabled(self, client_id: str, disabled: bool,
                            also: Callable[[WriteTx, ClientRow], None] | None = None) -> ClientRow:
        """Disable (its live tokens die within REVOCATION_POLL_S in every process) or enable a client.

        ``also`` runs in the same transaction (the audit record). Raises KeyError for an unknown client."""
        def job(tx: WriteTx) -> ClientRow:
            row = self._client_for_update(tx, client_id)
            row = dataclasses.replace(row, disabled=disabled)
            tx.update_client(row)
            if disabled:
                self._cut_off(tx, client_id)
            if also is not None:
                also(tx, row)
            return row

        row = self._store.write_sync("clients.disable" if disabled else "clients.enable", job)
        self._after_cut_off()
        return row

    def rotate_client_secret(self, client_id: str,
                             also: Callable[[WriteTx, ClientRow], None] | None = None) -> str:
        """A new secret (returned once, stored as a hash); tokens issued with the old one die."""
        secret = secrets.token_urlsafe(32)
        hashed = _hasher.hash(secret)

        def job(tx: WriteTx) -> None:
            row = self._client_for_update(tx, client_id)
            if row.secret_hash is None:
                raise ValueError(f"client {client_id} authenticates with a JWK Set, not a secret")
            row = dataclasses.replace(row, secret_hash=hashed)
            tx.update_client(row)
            self._cut_off(tx, client_id)
            if also is not None:
                also(tx, row)

        self._store.write_sync("clients.rotate-secret", job)
        self._after_cut_off()
        return secret

    def _client_for_update(self, tx: WriteTx, client_id: str) -> ClientRow:
        row = tx.client_for_update(client_id)
        if row is None or row.tenant != self._tenant:
            raise KeyError(client_id)
        return row

    def _after_cut_off(self) -> None:
        """Refuse the old tokens here at once, and return only once the clock is past the cut-off
        second: a token issued afterwards (new secret, client enabled again) must not fall under it.
        Blocks up to 1 s: for the CLI and threads, not for an event loop."""
        self.poll_revocations()
        wait_ms = 1000 - self._clock.now_ms() % 1000
        time.sleep(wait_ms / 1000)

    def _cut_off(self, tx: WriteTx, client_id: str) -> None:
        now_ms = self._clock.now_ms()
        # Kept until every token issued before now has expired (user tokens share the TTL).
        expires_ms = now_ms + (self._ttl + 60) * 1000
        tx.revoke_jti(f"{_CUTOFF_PREFIX}{client_id}:{now_ms // 1000}", expires_ms, now_ms)


    def register_app(self, name: str, scope: str, redirect_uris: list[str], *, public: bool,
                     jwks: Mapping[str, Any] | None = None) -> NewClient:
        """A SMART app (authorization code + PKCE): user/ and patient/ scopes plus openid, fhirUser,
        launch/patient, offline_access, online_access; exact redirect URIs."""
        scopes = parse_scopes(scope)
        if not scopes:
            raise ScopeError("at least one user/ or patient/ resource scope is required")
        if any(s.context == "system" for s in scopes):
            raise ScopeError("apps acting for a person use user/ and patient/ scopes, not system/")
        extra = [s for s in scope.split() if parse_scope_or_none(s) is None]
        unknown = [s for s in extra if s not in APP_SCOPES]
        if unknown:
            raise ScopeError(f"unsupported scope: {unknown[0]} (allowed besides resource scopes: "
                             f"{', '.join(sorted(APP_SCOPES))})")
        if not redirect_uris:
            raise ScopeError("at least one --redirect-uri is required")
        for uri in redirect_uris:
            parsed = urlsplit(uri)
            loopback = parsed.hostname in ("127.0.0.1", "localhost", "::1")
            if parsed.fragment or not parsed.netloc or (
                    parsed.scheme != "https" and not (parsed.scheme == "http" and loopback)):
                raise ScopeError(f"redirect URI must be https (or http on a loopback address), without a"
                                 f" fragment: {uri}")
        if jwks is not None:
            try:
                KeySet.import_key_set(dict(jwks))  # type: ignore[arg-type]
            except (JoseError, ValueError, TypeError, KeyError):
                raise ScopeError("the JWK Set is not valid") from None
        client_id = "fv-" + secrets.token_hex(10)
        secret = None if public or jwks is not None else secrets.token_urlsafe(32)
        row = ClientRow(
            client_id=client_id, tenant=self._tenant, name=name,
            secret_hash=_hasher.hash(secret) if secret else None,
            scopes=" ".join([*(str(s) for s in scopes), *dict.fromkeys(extra)]),
            jwks=orjson.dumps(dict(jwks)).decode() if jwks is not None else None,
            created_ms=self._clock.now_ms(),
        )
        app = AppRow(client_id, tuple(redirect_uris), public)

        def create(tx: WriteTx) -> None:
            tx.insert_client(row)
            tx.upsert_app(app)

        self._store.write_sync("clients.create", create)
        return NewClient(client_id, secret, name, row.scopes)

    # -- token endpoint ------------------------------------------------------
    def authenticate_client(self, form: Mapping[str, str], basic: tuple[str, str] | None,
                            token_url: str) -> tuple[ClientRow, str | None]:
        """Identify the client. Returns the row and, for private_key_jwt, the assertion's jti+exp."""
        assertion = form.get("client_assertion")
        if assertion is not None or "client_assertion_type" in form:
            if basic is not None or "client_secret" in form:
                raise OAuthError("invalid_request", "use exactly one client authentication method")
            if form.get("client_assertion_type") != JWT_BEARER_ASSERTION or not assertion:
                raise OAuthError("invalid_client", "unsupported client_assertion_type", 401)
            return self._check_assertion(assertion, token_url)
        if basic is not None:
            if "client_secret" in form:
                raise OAuthError("invalid_request", "use exactly one client authentication method")
            client_id, secret = basic
        else:
            client_id, secret = form.get("client_id", ""), form.get("client_secret", "")
        if not client_id or not secret:
            raise OAuthError("invalid_client", "client authentication required", 401)
        row = self._store.client(client_id) if len(client_id) <= 128 else None
        try:
            _hasher.verify(row.secret_hash if row and row.secret_hash else _DUMMY_HASH, secret)
        except (VerifyMismatchError, VerificationError, InvalidHashError):
            row = None
        else:
            if row is None or row.secret_hash is None:
                row = None
        if row is None or row.disabled:
            raise OAuthError("invalid_client", "client authentication failed", 401)
        return row, None

    def _check_assertion(self, assertion: str, token_url: str) -> tuple[ClientRow, str]:
        failed = OAuthError("invalid_client", "client assertion rejected", 401)
        claims = unverified_claims(assertion)
        client_id = claims.get("iss")
        if not isinstance(client_id, str) or claims.get("sub") != client_id or len(client_id) > 128:
            raise failed
        row = self._store.client(client_id)
        if row is None or row.disabled or row.jwks is None:
            raise failed
        now = self._clock.now_ms() // 1000
        try:
            keys = KeySet.import_key_set(orjson.loads(row.jwks))
            token = jwt.decode(assertion, keys, algorithms=ASSERTION_ALGORITHMS)
            jwt.JWTClaimsRegistry(
                now=now, leeway=30,
                iss={"essential": True, "value": client_id},
                sub={"essential": True, "value": client_id},
                aud={"essential": True, "value": token_url},
                exp={"essential": True},
                jti={"essential": True},
            ).validate(token.claims)
        except (JoseError, ValueError, TypeError):
            raise failed from None
        exp = int(token.claims["exp"])
        if exp > now + _MAX_ASSERTION_LIFETIME_S:
            raise OAuthError("invalid_client", "client assertion lives too long (max 5 minutes)", 401)
        return row, f"{client_id}:{token.claims['jti']}:{exp}"

    def issue(self, client: ClientRow, requested_scope: str | None, *, cnf_x5t: str | None = None) -> dict[str, Any]:
        """A client-credentials access token; ``cnf_x5t`` binds it to the client's certificate (RFC 8705)."""
        allowed = parse_scopes(client.scopes, strict=False)
        allowed_ops = operational_scopes(client.scopes)
        if requested_scope:
            try:
                requested = parse_scopes(requested_scope)
            except ScopeError as exc:
                raise OAuthError("invalid_scope", str(exc)) from None
            granted = narrow(requested, allowed)
            granted_ops = [s for s in operational_scopes(requested_scope) if s in allowed_ops]
        else:
            granted, granted_ops = allowed, allowed_ops
        if not granted and not granted_ops:
            raise OAuthError("invalid_scope", "none of the requested scopes is allowed for this client")
        scope = " ".join([*(str(s) for s in granted), *granted_ops])
        now = self._clock.now_ms() // 1000
        jti = secrets.token_urlsafe(16)
        claims = {
            "iss": self.issuer, "aud": self.audience, "sub": client.client_id, "client_id": client.client_id,
            "tenant": client.tenant, "scope": scope, "iat": now, "nbf": now, "exp": now + self._ttl, "jti": jti,
        }
        if cnf_x5t is not None:
            claims["cnf"] = {"x5t#S256": cnf_x5t}
        token = jwt.encode({"alg": _ACCESS_ALG, "kid": self.kid, "typ": "at+jwt"}, claims, self._key,
                           algorithms=[_ACCESS_ALG])
        return {"access_token": token, "token_type": "Bearer", "expires_in": self._ttl, "scope": scope}

    # -- resource server side ------------------------------------------------
    def verify(self, token: str) -> Principal:
        if self.before_check is not None:
            self.before_check()  # other processes' revocations and cache invalidations (coherence.py)
        now = self._clock.now_ms() // 1000
        with self._cache_lock:
            cached = self._cache.get(token)
        if cached is not None:
            if cached.expires_at > now:
                if self.is_revoked(cached.token_id, now) or self._client_cut_off(cached.client_id, cached.issued_at):
                    raise TokenError("access token revoked")
                return cached
            with self._cache_lock:
                self._cache.pop(token, None)
            raise TokenError("access token expired")
        if len(token) > 4096:
            raise TokenError("access token malformed")
        try:
            decoded = jwt.decode(token, self._verify_keys, algorithms=[_ACCESS_ALG])
            if decoded.header.get("typ") != "at+jwt":
                raise TokenError("access token malformed")
            jwt.JWTClaimsRegistry(
                now=now, leeway=5,
                iss={"essential": True, "value": self.issuer},
                aud={"essential": True, "value": self.audience},
                exp={"essential": True}, nbf={"essential": True},
                tenant={"essential": True, "value": self._tenant},
                sub={"essential": True}, scope={"essential": True}, jti={"essential": True},
            ).validate(decoded.claims)
        except JoseError:
            raise TokenError("access token invalid or expired") from None
        except (ValueError, TypeError, KeyError):
            raise TokenError("access token malformed") from None
        claims = decoded.claims
        client_id = str(claims.get("client_id") or claims["sub"])
        try:
            issued_at = int(claims.get("iat") or 0)
        except (ValueError, TypeError):
            raise TokenError("access token malformed") from None
        if self.is_revoked(str(claims["jti"]), now) or self._client_cut_off(client_id, issued_at):
            raise TokenError("access token revoked")

        def opt(name: str) -> str | None:
            value = claims.get(name)
            return str(value) if value is not None else None

        principal = Principal(
            client_id=client_id,
            tenant=str(claims["tenant"]),
            scope=str(claims["scope"]),
            grants=Grants(tuple(parse_scopes(str(claims["scope"]), strict=False))),
            expires_at=int(claims["exp"]),
            token_id=str(claims["jti"]),
            user=str(claims["sub"]) if opt("role") is not None else None,
            role=opt("role"),
            fhir_user=opt("fhirUser"),
            patient=opt("patient"),
            organization=opt("org"),
            session_id=opt("sid"),
            clearances=frozenset(str(c) for c in claims.get("clearance") or ()),
            issued_at=issued_at,
            cnf_x5t=_cnf_x5t(claims.get("cnf")),
        )
        with self._cache_lock:
            self._cache[token] = principal
            while len(self._cache) > _TOKEN_CACHE_MAX:
                self._cache.popitem(last=False)
        return principal


    # -- user tokens (authorization code / refresh grants) ------------------------
    def issue_user_token(self, client_id: str, scope: str, user: UserRow, *, patient: str | None,
                         session_id: str) -> tuple[str, str, int]:
        """An access token for a logged-in user: (token, jti, exp in seconds).

        Claim names are a contract with the policy engine (see Principal)."""
        now = self._clock.now_ms() // 1000
        jti = secrets.token_urlsafe(16)
        claims: dict[str, Any] = {
            "iss": self.issuer, "aud": self.audience, "sub": user.user_id, "client_id": client_id,
            "tenant": self._tenant, "scope": scope, "iat": now, "nbf": now, "exp": now + self._ttl, "jti": jti,
            "role": user.role, "sid": session_id,
        }
        if user.fhir_user:
            claims["fhirUser"] = user.fhir_user
        if user.organization:
            claims["org"] = user.organization
        if user.clearances:
            claims["clearance"] = user.clearances.split()
        if patient:
            claims["patient"] = patient
        token = jwt.encode({"alg": _ACCESS_ALG, "kid": self.kid, "typ": "at+jwt"}, claims, self._key,
                           algorithms=[_ACCESS_ALG])
        return token, jti, now + self._ttl

    def id_token(self, *, issuer: str, client_id: str, user: UserRow, nonce: str | None, auth_time_ms: int,
                 amr: list[str], session_id: str, fhir_user: bool) -> str:
        """An OpenID Connect ID token (ES256, same key as access tokens, published in the JWKS)."""
        now = self._clock.now_ms() // 1000
        claims: dict[str, Any] = {
            "iss": issuer, "aud": client_id, "azp": client_id, "sub": user.user_id, "iat": now,
            "exp": now + self._ttl, "auth_time": auth_time_ms // 1000, "amr": amr, "sid": session_id,
            "preferred_username": user.username,
        }
        if nonce:
            claims["nonce"] = nonce
        if fhir_user and user.fhir_user:
            claims["fhirUser"] = user.fhir_user
        return jwt.encode({"alg": _ACCESS_ALG, "kid": self.kid, "typ": "JWT"}, claims, self._key,
                          algorithms=[_ACCESS_ALG])

    def own_token_claims(self, token: str) -> dict[str, Any] | None:
        """Claims of an access token this server signed (expired or not); None if it is not one."""
        if len(token) > 4096:
            return None
        try:
            decoded = jwt.decode(token, self._verify_keys, algorithms=[_ACCESS_ALG])
        except (JoseError, ValueError, TypeError, KeyError):
            return None
        claims = decoded.claims
        if decoded.header.get("typ") != "at+jwt" or claims.get("iss") != self.issuer or "jti" not in claims:
            return None
        return claims

    # -- revocation ---------------------------------------------------------------
    def note_revoked(self, jti: str, expires_at: int) -> None:
        """This process revoked ``jti``: refuse it from now on (the store has it durably)."""
        with self._cache_lock:
            self._revoked[jti] = expires_at

    def is_revoked(self, jti: str, now: int) -> bool:
        mono = time.monotonic()
        if mono - self._revoked_polled >= REVOCATION_POLL_S:
            self._poll_revocations(now, mono)
        return jti in self._revoked

    def poll_revocations(self) -> None:
        """Read revocations from the store now (after this process revoked tokens in bulk)."""
        self._poll_revocations(self._clock.now_ms() // 1000, time.monotonic())

    def _poll_revocations(self, now: int, mono: float) -> None:
        rows = self._store.revoked_jtis(self._revoked_seq, now * 1000)
        with self._cache_lock:
            self._revoked_polled = mono
            for seq, jti, exp_ms in rows:
                self._revoked_seq = max(self._revoked_seq, seq)
                if jti.startswith(_CUTOFF_PREFIX):
                    client_id, _, at = jti[len(_CUTOFF_PREFIX):].rpartition(":")
                    previous = self._cutoffs.get(client_id, (0, 0))[0]
                    self._cutoffs[client_id] = (max(previous, int(at)), exp_ms // 1000)
                    continue
                self._revoked[jti] = exp_ms // 1000
            if len(self._revoked) > 1024:  # drop the expired ones now and then
                self._revoked = {j: e for j, e in self._revoked.items() if e >= now}
                self._cutoffs = {c: v for c, v in self._cutoffs.items() if v[1] >= now}

    def _client_cut_off(self, client_id: str, issued_at: int) -> bool:
        """Was this token issued at or before its client was disabled or re-keyed? (polled with is_revoked)"""
        cutoff = self._cutoffs.get(client_id)
        return cutoff is not None and issued_at <= cutoff[0]

def _cnf_x5t(cnf: Any) -> str | None:
    value = cnf.get("x5t#S256") if isinstance(cnf, dict) else None
    return str(value) if value is not None else None


def normalise_sources(sources: Sequence[str]) -> str | None:
    """A client's source allow-list as stored: normalised CIDRs, space-separated (None: anywhere)."""
    nets: list[str] = []
    for source in sources:
        for item in source.replace(",", " ").split():
            try:
                nets.append(str(ipaddress.ip_network(item, strict=False)))
            except ValueError:
                raise ScopeError(f"not an IP address or CIDR: {item}") from None
    return " ".join(dict.fromkeys(nets)) or None


def source_allowed(allowed: str | None, source_ip: str | None) -> bool:
    """Whether a client with allow-list ``allowed`` may call from ``source_ip`` (unknown: no)."""
    if allowed is None:
        return True
    if source_ip is None:
        return False
    try:
        address = ipaddress.ip_address(source_ip)
    except ValueError:
        return False
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return any(address in ipaddress.ip_network(net) for net in allowed.split())


def parse_scope_or_none(text: str) -> ResourceScope | None:
    try:
        return parse_scope(text)
    except ScopeError:
        return None


def unverified_claims(assertion: str) -> dict[str, Any]:
    """Read a JWT's claims without checking it, only to find which client's keys to check it with."""
    try:
        payload = assertion.split(".")[1]
        data = orjson.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    except (IndexError, ValueError, orjson.JSONDecodeError):
        raise OAuthError("invalid_client", "client assertion rejected", 401) from None
    if not isinstance(data, dict):
        raise OAuthError("invalid_client", "client assertion rejected", 401)
    return data


__all__ = ["AuthService", "NewClient", "OAuthError", "Principal", "ResourceScope", "TokenError"]
