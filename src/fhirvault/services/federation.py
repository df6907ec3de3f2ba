"""Login through an external OpenID Connect provider (authorization code flow, PKCE S256, nonce).

Every ID token is checked strictly before any claim is used: an allowed asymmetric algorithm,
a signature by a key of the issuer's JWKS (refetched, rate-limited, when an unknown ``kid`` shows
up after a key rotation), ``iss`` exact, ``aud``/``azp``, ``exp``/``nbf``/``iat`` with a small leeway,
``nonce``, ``at_hash``, optional ``max_age``. Failures raise ``FederationError`` with a message
naming the failed check, never a token, code or claim value; logs carry the same safe reason.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import logging
import math
import re
import secrets
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeGuard, TypeVar
from urllib.parse import parse_qsl, quote, urlencode, urlsplit, urlunsplit

import httpx
from joserfc import jwt
from joserfc.errors import JoseError
from joserfc.jwk import ECKey, Key, RSAKey, import_key

from fhirvault.services.federation_settings import IdentityProviderSettings
from fhirvault.services.identity_types import FederatedIdentity, FederatedLogin, FederationError
from fhirvault.services.residency import check_outbound

_log = logging.getLogger(__name__)
_T = TypeVar("_T")

DISCOVERY_TTL = 3600.0  # provider metadata is refetched after this
JWKS_TTL = 3600.0  # keys are refetched after this even without an unknown kid
JWKS_MIN_INTERVAL = 60.0  # an unknown kid triggers at most one JWKS fetch per interval
LEEWAY = 60  # seconds of clock skew tolerated on exp, nbf, iat, auth_time
LOGIN_TTL = 900  # seconds between begin() and the callback
MAX_BODY = 512 * 1024  # bytes accepted from any provider endpoint
_HASHES = {"256": hashlib.sha256, "384": hashlib.sha384, "512": hashlib.sha512}
_CURVES = {"ES256": "P-256", "ES384": "P-384", "ES512": "P-521"}
_ERROR_CODE = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
# Claims kept out of FederatedIdentity.claims: protocol plumbing, useless to the caller.
_PROTOCOL_CLAIMS = frozenset({"nonce", "at_hash", "c_hash", "s_hash"})


@dataclass(frozen=True, slots=True)
class ProviderMetadata:
    issuer: str
    authorization_endpoint: str
    token_endpoint: str
    jwks_uri: str
    userinfo_endpoint: str | None


class OidcProvider:
    """One configured external identity provider; implements ``FederatedLogin``.

    Caches (metadata, keys) live on the instance: create one per provider at startup and share it.
    ``transport`` and ``clock`` are for tests.
    """

    def __init__(self, settings: IdentityProviderSettings, *,
                 transport: httpx.AsyncBaseTransport | None = None,
                 clock: Callable[[], float] = time.time, timeout: float = 10.0,
                 jwks_min_interval: float = JWKS_MIN_INTERVAL) -> None:
        self.settings = settings
        self._transport = transport
        self._clock = clock
        self._timeout = timeout
        self._jwks_min_interval = jwks_min_interval
        self._metadata: ProviderMetadata | None = None
        self._metadata_at = -math.inf
        self._keys: tuple[Key, ...] = ()
        self._keys_at = -math.inf  # last successful JWKS fetch
        self._keys_tried_at = -math.inf  # last JWKS fetch attempt (rate limit)

    @property
    def name(self) -> str:
        return self.settings.name

    @property
    def display_name(self) -> str:
        return self.settings.label

    # -- the flow -----------------------------------------------------------------------------

    async def begin(self, redirect_uri: str) -> tuple[str, dict[str, str]]:
        _check_redirect_uri(redirect_uri)
        async with self._client() as client:
            meta = await self._guard(self._discover(client))
        state, nonce = secrets.token_urlsafe(32), secrets.token_urlsafe(32)
        verifier = secrets.token_urlsafe(64)  # 86 characters: within RFC 7636's 43..128
        params = {
            "response_type": "code", "client_id": self.settings.client_id,
            "redirect_uri": redirect_uri, "scope": self.settings.scopes, "state": state,
            "nonce": nonce, "code_challenge": _b64(hashlib.sha256(verifier.encode()).digest()),
            "code_challenge_method": "S256",
        }
        if self.settings.acr_values:
            params["acr_values"] = self.settings.acr_values
        if self.settings.max_age is not None:
            params["max_age"] = str(self.settings.max_age)
        saved = {"provider": self.name, "state": state, "nonce": nonce, "code_verifier": verifier,
                 "redirect_uri": redirect_uri, "created": str(int(self._clock()))}
        return _add_query(meta.authorization_endpoint, params), saved

    async def complete(self, params: Mapping[str, str], saved: Mapping[str, str],
                       redirect_uri: str) -> FederatedIdentity:
        claims = await self._guard(self._complete(params, saved, redirect_uri))
        identity = self.map_claims(claims)
        _log.info("federated login accepted: provider=%s role=%s mfa=%s", self.name, identity.role, identity.mfa)
        return identity

    async def _complete(self, params: Mapping[str, str], saved: Mapping[str, str],
                        redirect_uri: str) -> dict[str, Any]:
        self._check_callback(params, saved, redirect_uri)
        async with self._client() as client:
            meta = await self._discover(client)
            tokens = await self._exchange(client, meta, params["code"], saved, redirect_uri)
            access_token = tokens.get("access_token")
            if access_token is not None and not isinstance(access_token, str):
                raise FederationError("the identity provider returned a malformed access token")
            claims = await self._validate_id_token(client, tokens["id_token"], saved["nonce"], access_token)
            if self.settings.validate_access_token:
                await self._validate_access_token(client, access_token, claims["sub"])
            if self.settings.use_userinfo:
                if access_token is None:
                    raise FederationError("the identity provider returned no access token for userinfo")
                userinfo = await self._userinfo(client, meta, access_token, claims["sub"])
                claims = {**userinfo, **claims}  # signed ID token claims win
        return claims

    def _check_callback(self, params: Mapping[str, str], saved: Mapping[str, str], redirect_uri: str) -> None:
        if "error" in params:
            code = params["error"]
            if code == "access_denied":
                raise FederationError("the login was cancelled or refused at the identity provider")
            safe = code if _ERROR_CODE.match(code) else "unknown"
            raise FederationError(f"the identity provider returned an error ({safe})")
        for key in ("provider", "state", "nonce", "code_verifier", "redirect_uri", "created"):
            if not isinstance(saved.get(key), str):
                raise FederationError("no login in progress; start again")
        if saved["provider"] != self.name:
            raise FederationError("the login was started with another identity provider")
        received = params.get("state", "")
        if not hmac.compare_digest(received.encode(), saved["state"].encode()):
            raise FederationError("the login state does not match; start again")
        if saved["redirect_uri"] != redirect_uri:
            raise FederationError("the callback address does not match the one the login started with")
        try:
            created = int(saved["created"])
        except ValueError:
            raise FederationError("no login in progress; start again") from None
        if self._clock() - created > LOGIN_TTL:
            raise FederationError("the login took too long; start again")
        # RFC 9207: a provider that names itself must be the one we sent the user to (mix-up attacks).
        if "iss" in params and params["iss"] != self.settings.issuer:
            raise FederationError("the callback came from another identity provider")
        if not params.get("code"):
            raise FederationError("the identity provider returned no authorization code")

    async def _exchange(self, client: httpx.AsyncClient, meta: ProviderMetadata, code: str,
                        saved: Mapping[str, str], redirect_uri: str) -> dict[str, Any]:
        form = {"grant_type": "authorization_code", "code": code, "redirect_uri": redirect_uri,
                "code_verifier": saved["code_verifier"]}
        headers = {"Accept": "application/json"}
        s = self.settings
        if s.auth_method == "client_secret_basic":
            assert s.client_secret is not None
            # RFC 6749 §2.3.1: both parts are form-urlencoded before base64.
            pair = f"{quote(s.client_id, safe='')}:{quote(s.client_secret, safe='')}"
            headers["Authorization"] = "Basic " + base64.b64encode(pair.encode()).decode()
        elif s.auth_method == "client_secret_post":
            assert s.client_secret is not None
            form |= {"client_id": s.client_id, "client_secret": s.client_secret}
        else:
            form["client_id"] = s.client_id
        status, _, body = await _fetch(client, "POST", meta.token_endpoint, data=form, headers=headers)
        data = _json_object(body)
        if status != 200:
            error = data.get("error") if data else None
            if error == "invalid_grant":
                raise FederationError("the identity provider refused the authorization code "
                                      "(expired or already used)")
            safe = error if isinstance(error, str) and _ERROR_CODE.match(error) else f"HTTP {status}"
            raise FederationError(f"the identity provider refused the token request ({safe})")
        if data is None:
            raise FederationError("the identity provider's token response is not JSON")
        if not isinstance(data.get("id_token"), str):
            raise FederationError("the identity provider returned no ID token")
        token_type = data.get("token_type")
        if "access_token" in data and (not isinstance(token_type, str) or token_type.lower() != "bearer"):
            raise FederationError("the identity provider returned an unsupported token type")
        return data

    # -- ID token -----------------------------------------------------------------------------

    async def validate_id_token(self, id_token: str, *, nonce: str,
                                access_token: str | None = None) -> dict[str, Any]:
        """Verify an ID token as ``complete`` does; the claims, or FederationError."""
        async with self._client() as client:
            return await self._guard(self._validate_id_token(client, id_token, nonce, access_token))

    async def _validate_id_token(self, client: httpx.AsyncClient, id_token: str, nonce: str,
                                 access_token: str | None) -> dict[str, Any]:
        meta = await self._discover(client)
        header, claims = await self._verify_jws(client, id_token, "ID token")
        if str(header.get("typ", "JWT")).lower() not in ("jwt", "application/jwt"):
            raise FederationError("ID token refused: not an ID token (typ)")  # e.g. an at+jwt
        check_id_token_claims(claims, issuer=meta.issuer, client_id=self.settings.client_id, nonce=nonce,
                              now=self._clock(), max_age=self.settings.max_age)
        if "at_hash" in claims and (
                access_token is None or not _half_hash_matches(claims["at_hash"], access_token, header["alg"])):
            raise FederationError("ID token refused: at_hash does not match the access token")
        return claims

    async def _verify_jws(self, client: httpx.AsyncClient, token: str, what: str) -> tuple[dict[str, Any], dict[str, Any]]:
        """Check the header and the signature; returns (header, claims)."""
        header = _header(token, what)
        alg = header.get("alg")
        if not isinstance(alg, str) or alg not in self.settings.allowed_algs:
            raise FederationError(f"{what} refused: signature algorithm not allowed")
        if "crit" in header:
            raise FederationError(f"{what} refused: unsupported critical header")
        kid = header.get("kid")
        if kid is not None and not isinstance(kid, str):
            raise FederationError(f"{what} refused: malformed key id")
        keys = _candidates(await self._jwks(client), alg, kid)
        if not keys:  # unknown key: the provider may have rotated its keys since our last fetch
            keys = _candidates(await self._jwks(client, force=True), alg, kid)
        if not keys:
            raise FederationError(f"{what} refused: signed by an unknown key")
        for key in keys:
            try:
                decoded = jwt.decode(token, key, algorithms=[alg])
            except (JoseError, ValueError):
                continue
            return dict(decoded.header), dict(decoded.claims)
        raise FederationError(f"{what} refused: invalid signature")

    async def _validate_access_token(self, client: httpx.AsyncClient, token: object, subject: str) -> None:
        if not isinstance(token, str) or token.count(".") != 2:
            raise FederationError("access token refused: not a signed JWT")
        _, claims = await self._verify_jws(client, token, "access token")
        now = self._clock()
        if claims.get("iss") != self.settings.issuer:
            raise FederationError("access token refused: wrong issuer")
        _check_times(claims, now, "access token", require_iat=False)
        if "sub" in claims and claims["sub"] != subject:
            raise FederationError("access token refused: another subject than the ID token")
        cid = self.settings.client_id
        if cid not in _audiences(claims.get("aud")) and cid not in (claims.get("azp"), claims.get("client_id")):
            raise FederationError("access token refused: not issued to this client")

    # -- userinfo -----------------------------------------------------------------------------

    async def _userinfo(self, client: httpx.AsyncClient, meta: ProviderMetadata, access_token: str,
                        subject: str) -> dict[str, Any]:
        if meta.userinfo_endpoint is None:
            raise FederationError("the identity provider has no userinfo endpoint")
        status, ctype, body = await _fetch(client, "GET", meta.userinfo_endpoint,
                                           headers={"Authorization": f"Bearer {access_token}",
                                                    "Accept": "application/json, application/jwt"})
        if status != 200:
            raise FederationError(f"the identity provider refused the userinfo request (HTTP {status})")
        if ctype.split(";")[0].strip().lower() == "application/jwt":
            _, info = await self._verify_jws(client, body.decode("ascii", "replace").strip(), "userinfo")
            if "iss" in info and info["iss"] != meta.issuer:
                raise FederationError("userinfo refused: wrong issuer")
            if "aud" in info and self.settings.client_id not in _audiences(info["aud"]):
                raise FederationError("userinfo refused: wrong audience")
        else:
            parsed = _json_object(body)
            if parsed is None:
                raise FederationError("userinfo refused: not a JSON object")
            info = parsed
        # OIDC Core §5.3.2: a userinfo for another subject must not be used (token substitution).
        if info.get("sub") != subject:
            raise FederationError("userinfo refused: another subject than the ID token")
        return info

    # -- claims → identity --------------------------------------------------------------------

    def map_claims(self, claims: Mapping[str, Any]) -> FederatedIdentity:
        """Username, role (role_map, first match in config order), fhirUser, organization, mfa."""
        s = self.settings
        username = next((v for c in s.username_claims for v in claim_values(claims, c)), None)
        values = set(claim_values(claims, s.role_claim))
        role = next((r for value, r in s.role_map if value in values), None)
        fhir_user = next(iter(claim_values(claims, s.fhir_user_claim)), None) if s.fhir_user_claim else None
        organization = (next(iter(claim_values(claims, s.organization_claim)), None)
                        if s.organization_claim else None)
        amr = claims.get("amr")
        amr_values = {v for v in amr if isinstance(v, str)} if isinstance(amr, list) else set()
        acr = claims.get("acr")
        mfa = bool(amr_values & set(s.mfa_amr_values)) or (isinstance(acr, str) and acr in s.mfa_acr_values)
        return FederatedIdentity(
            provider=self.name, issuer=s.issuer, subject=str(claims["sub"]), username=username, role=role,
            fhir_user=fhir_user, organization=organization, mfa=mfa,
            claims={k: v for k, v in claims.items() if k not in _PROTOCOL_CLAIMS})

    # -- metadata and keys --------------------------------------------------------------------

    def _client(self) -> httpx.AsyncClient:
        # Redirects are not followed: every endpoint comes from the provider's own metadata.
        return httpx.AsyncClient(transport=self._transport, timeout=self._timeout, follow_redirects=False)

    async def _guard(self, step: Awaitable[_T]) -> _T:
        """Run one step; every failure becomes a FederationError with a safe message, logged."""
        try:
            return await step
        except FederationError as exc:
            _log.warning("federated login refused: provider=%s reason=%s", self.name, exc)
            raise
        except httpx.HTTPError as exc:
            _log.warning("federated login failed: provider=%s network error %s", self.name, type(exc).__name__)
            raise FederationError("the identity provider could not be reached") from None
        except Exception as exc:  # a library error text could quote token content: log the type only
            _log.error("federated login failed: provider=%s unexpected %s", self.name, type(exc).__name__)
            raise FederationError("the federated login failed") from None

    async def _discover(self, client: httpx.AsyncClient) -> ProviderMetadata:
        now = self._clock()
        if self._metadata is not None and now - self._metadata_at < DISCOVERY_TTL:
            return self._metadata
        url = self.settings.issuer.rstrip("/") + "/.well-known/openid-configuration"
        try:
            status, _, body = await _fetch(client, "GET", url, headers={"Accept": "application/json"})
        except (httpx.HTTPError, FederationError):
            if self._metadata is not None:  # keep logins working through a provider blip
                _log.warning("identity provider metadata refresh failed, using cached: provider=%s", self.name)
                return self._metadata
            raise
        data = _json_object(body) if status == 200 else None
        if data is None:
            raise FederationError(f"the identity provider's discovery document is unavailable (HTTP {status})")
        self._metadata = self._parse_metadata(data)
        self._metadata_at = now
        return self._metadata

    def _parse_metadata(self, data: Mapping[str, Any]) -> ProviderMetadata:
        if data.get("issuer") != self.settings.issuer:
            raise FederationError("the identity provider's discovery document names another issuer")
        https_only = self.settings.issuer.startswith("https://")
        endpoints: dict[str, str | None] = {}
        for key in ("authorization_endpoint", "token_endpoint", "jwks_uri", "userinfo_endpoint"):
            value = data.get(key)
            if value is None and key == "userinfo_endpoint":
                endpoints[key] = None
                continue
            if not isinstance(value, str) or not value.startswith("https://" if https_only else ("https://", "http://")):
                raise FederationError(f"the identity provider's discovery document has no valid {key}")
            endpoints[key] = value
        return ProviderMetadata(
            issuer=self.settings.issuer, authorization_endpoint=str(endpoints["authorization_endpoint"]),
            token_endpoint=str(endpoints["token_endpoint"]), jwks_uri=str(endpoints["jwks_uri"]),
            userinfo_endpoint=endpoints["userinfo_endpoint"])

    async def _jwks(self, client: httpx.AsyncClient, force: bool = False) -> tuple[Key, ...]:
        now = self._clock()
        if not force and now - self._keys_at < JWKS_TTL:
            return self._keys
        if now - self._keys_tried_at < self._jwks_min_interval:
            return self._keys  # rate limit: a flood of unknown kids must not hammer the provider
        meta = await self._discover(client)
        self._keys_tried_at = now  # before the fetch: concurrent callers do not fetch again
        status, _, body = await _fetch(client, "GET", meta.jwks_uri, headers={"Accept": "application/json"})
        data = _json_object(body) if status == 200 else None
        if data is None or not isinstance(data.get("keys"), list):
            raise FederationError("the identity provider's signing keys are unavailable")
        self._keys = tuple(k for k in (_import_public_key(d) for d in data["keys"]) if k is not None)
        self._keys_at = now
        return self._keys


# -- pure helpers (unit-testable) ---------------------------------------------------------------

def check_id_token_claims(claims: Mapping[str, Any], *, issuer: str, client_id: str, nonce: str,
                          now: float, max_age: int | None = None, leeway: int = LEEWAY) -> None:
    """OIDC Core §3.1.3.7 checks on verified claims; raises FederationError naming the failed check."""
    if claims.get("iss") != issuer:
        raise FederationError("ID token refused: wrong issuer")
    sub = claims.get("sub")
    if not isinstance(sub, str) or not sub or len(sub) > 255:
        raise FederationError("ID token refused: missing or malformed subject")
    audiences = _audiences(claims.get("aud"))
    if client_id not in audiences:
        raise FederationError("ID token refused: wrong audience")
    azp = claims.get("azp")
    if (len(audiences) > 1 or azp is not None) and azp != client_id:
        raise FederationError("ID token refused: authorized party (azp) is not this client")
    _check_times(claims, now, "ID token", require_iat=True, leeway=leeway)
    received = claims.get("nonce")
    if not isinstance(received, str) or not hmac.compare_digest(received.encode(), nonce.encode()):
        raise FederationError("ID token refused: nonce does not match this login")
    auth_time = claims.get("auth_time")
    if auth_time is not None and not _is_number(auth_time):
        raise FederationError("ID token refused: malformed auth_time")
    if max_age is not None:
        if auth_time is None:
            raise FederationError("ID token refused: auth_time missing (max_age requested)")
        if now > auth_time + max_age + leeway:
            raise FederationError("ID token refused: the authentication is too old (max_age)")


def _check_times(claims: Mapping[str, Any], now: float, what: str, *, require_iat: bool,
                 leeway: int = LEEWAY) -> None:
    exp, iat, nbf = claims.get("exp"), claims.get("iat"), claims.get("nbf")
    if not _is_number(exp):
        raise FederationError(f"{what} refused: missing or malformed expiry")
    if now >= exp + leeway:
        raise FederationError(f"{what} refused: expired")
    if iat is None and require_iat:
        raise FederationError(f"{what} refused: missing issue time")
    if iat is not None and (not _is_number(iat) or iat > now + leeway):
        raise FederationError(f"{what} refused: issued in the future")
    if nbf is not None and (not _is_number(nbf) or nbf > now + leeway):
        raise FederationError(f"{what} refused: not valid yet")


def claim_values(claims: Mapping[str, Any], path: str) -> list[str]:
    """String values of a claim: an exact name first (claim names may contain dots, e.g. URLs),
    else a dotted path into nested objects, flattening lists (``realm_access.roles``)."""
    if path in claims:
        found: list[Any] = [claims[path]]
    else:
        found = [claims]
        for part in path.split("."):
            found = [item.get(part) for item in _flatten(found) if isinstance(item, Mapping)]
    out = []
    for item in _flatten(found):
        if isinstance(item, str) and item:
            out.append(item)
        elif isinstance(item, int) and not isinstance(item, bool):
            out.append(str(item))
    return out


def _flatten(items: Sequence[Any]) -> list[Any]:
    out: list[Any] = []
    for item in items:
        out.extend(item if isinstance(item, list) else [item])
    return out


def _audiences(aud: Any) -> list[str]:
    if isinstance(aud, str):
        return [aud]
    if isinstance(aud, list) and all(isinstance(a, str) for a in aud):
        return list(aud)
    return []


def _is_number(value: Any) -> TypeGuard[int | float]:
    return not isinstance(value, bool) and (isinstance(value, int) or (isinstance(value, float) and math.isfinite(value)))


def _half_hash_matches(expected: Any, value: str, alg: str) -> bool:
    """at_hash / c_hash: left half of the hash (of the signing alg's size) of the value, base64url."""
    digest = _HASHES[alg[-3:]](value.encode("ascii", "replace")).digest()
    return isinstance(expected, str) and hmac.compare_digest(expected.encode(), _b64(digest[: len(digest) // 2]).encode())


def _header(token: str, what: str) -> dict[str, Any]:
    parts = token.split(".")
    if len(parts) == 5:
        raise FederationError(f"{what} refused: encrypted tokens are not supported")
    if len(parts) != 3:
        raise FederationError(f"{what} refused: not a signed JWT")
    try:
        header = json.loads(base64.urlsafe_b64decode(parts[0] + "=" * (-len(parts[0]) % 4)))
    except (ValueError, UnicodeDecodeError):
        raise FederationError(f"{what} refused: malformed header") from None
    if not isinstance(header, dict):
        raise FederationError(f"{what} refused: malformed header")
    return header


def _candidates(keys: Sequence[Key], alg: str, kid: str | None) -> list[Key]:
    """Keys of the issuer's JWKS able to verify ``alg`` (matching type, curve, use, alg, kid)."""
    out: list[Key] = []
    for key in keys:
        if kid is not None and key.kid != kid:
            continue
        if key.get("use") not in (None, "sig") or key.alg not in (None, alg):
            continue
        rsa = alg.startswith(("RS", "PS")) and isinstance(key, RSAKey)
        ec = alg.startswith("ES") and isinstance(key, ECKey) and key.curve_name == _CURVES.get(alg)
        if rsa or ec:
            out.append(key)
    return out


def _import_public_key(data: Any) -> Key | None:
    """One JWKS entry as a public key; entries we cannot use (symmetric, malformed) are skipped."""
    if not isinstance(data, dict) or data.get("kty") not in ("RSA", "EC"):
        return None
    public = {k: v for k, v in data.items() if k not in ("d", "p", "q", "dp", "dq", "qi", "oth")}
    try:
        return import_key(public)
    except (JoseError, ValueError, TypeError):
        return None


async def _fetch(client: httpx.AsyncClient, method: str, url: str, **kwargs: Any) -> tuple[int, str, bytes]:
    """One request with a size cap on the response body, to an allowed destination only."""
    check_outbound(url, "identity provider")  # metadata may name endpoints on other hosts (services/residency.py)
    async with client.stream(method, url, **kwargs) as response:
        body = bytearray()
        async for chunk in response.aiter_bytes():
            body += chunk
            if len(body) > MAX_BODY:
                raise FederationError("the identity provider's response is too large")
        return response.status_code, response.headers.get("content-type", ""), bytes(body)


def _json_object(body: bytes) -> dict[str, Any] | None:
    try:
        data = json.loads(body)
    except ValueError:
        return None
    return data if isinstance(data, dict) else None


def _b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def _add_query(url: str, params: Mapping[str, str]) -> str:
    parts = urlsplit(url)
    query = [*parse_qsl(parts.query, keep_blank_values=True), *params.items()]
    return urlunsplit(parts._replace(query=urlencode(query)))


def _check_redirect_uri(uri: str) -> None:
    parts = urlsplit(uri)
    if parts.scheme not in ("https", "http") or not parts.hostname or parts.fragment:
        raise FederationError("the login callback address is not an absolute URL")


if TYPE_CHECKING:  # mypy proves OidcProvider satisfies the contract the login routes use
    _CONFORMS: type[FederatedLogin] = OidcProvider
