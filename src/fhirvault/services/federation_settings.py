"""External OpenID Connect identity providers, parsed from ``[[identity_providers]]`` TOML tables.

The client secret is never accepted inline: the config file is often world-readable, copied into
tickets or kept in version control, so a provider names a file (``client_secret_file``) or an
environment variable (``client_secret_env``) and the value is read once here, kept out of ``repr``.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from fhirvault.services.identity_types import ROLES

if TYPE_CHECKING:
    from fhirvault.config import SettingsError

AUTH_METHODS = ("client_secret_basic", "client_secret_post", "none")
# Asymmetric signatures only: an HMAC ID token would be keyed with the client secret (shared with
# the provider, so weaker) and "none" is unsigned.
SUPPORTED_ALGS = ("RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512")
DEFAULT_ALGS = ("RS256", "ES256", "PS256")
DEFAULT_MFA_AMR = ("mfa", "otp", "hwk", "swk", "sms")
_NAME = re.compile(r"^[a-z0-9][a-z0-9_-]{0,31}$")  # appears in URLs: /login/oidc/{name}
_LOCAL_HOSTS = ("localhost", "127.0.0.1", "::1")


@dataclass(frozen=True, slots=True)
class IdentityProviderSettings:
    name: str
    issuer: str
    client_id: str
    display_name: str = ""  # defaults to name
    client_secret: str | None = field(default=None, repr=False)  # None only with auth_method "none"
    auth_method: str = "client_secret_basic"
    scopes: str = "openid profile email"
    username_claims: tuple[str, ...] = ("preferred_username", "email")  # first present wins
    role_claim: str = "roles"  # a claim name, or a dotted path into nested claims
    role_map: tuple[tuple[str, str], ...] = ()  # (claim value, role), in config order: first match wins
    fhir_user_claim: str | None = None
    organization_claim: str | None = None
    mfa_amr_values: tuple[str, ...] = DEFAULT_MFA_AMR
    mfa_acr_values: tuple[str, ...] = ()
    allowed_algs: tuple[str, ...] = DEFAULT_ALGS
    use_userinfo: bool = False
    auto_provision: bool = False
    acr_values: str | None = None  # sent as the acr_values authorization parameter (PSC: "eidas1")
    max_age: int | None = None  # seconds; sent as max_age and enforced on auth_time
    validate_access_token: bool = False  # also verify a JWT access token (signature, iss, exp, aud/azp)

    @property
    def label(self) -> str:
        return self.display_name or self.name


def _error(message: str) -> SettingsError:
    from fhirvault.config import SettingsError  # config.py imports this module lazily

    return SettingsError(message)


Parser = Callable[[str, Any], Any]


def _text(name: str, raw: Any) -> str:
    if not isinstance(raw, str) or not raw.strip():
        raise _error(f"{name}: expected a non-empty string")
    return raw.strip()


def _slug(name: str, raw: Any) -> str:
    value = _text(name, raw)
    if not _NAME.match(value):
        raise _error(f"{name}: lowercase letters, digits, '-' and '_' only, at most 32, starting with a letter or digit")
    return value


def _bool(name: str, raw: Any) -> bool:
    if not isinstance(raw, bool):
        raise _error(f"{name}: expected true or false")
    return raw


def _strings(name: str, raw: Any) -> tuple[str, ...]:
    items = [raw] if isinstance(raw, str) else raw
    if not isinstance(items, list) or not items or not all(isinstance(i, str) and i.strip() for i in items):
        raise _error(f"{name}: expected a non-empty list of strings")
    return tuple(i.strip() for i in items)


def _optional_strings(name: str, raw: Any) -> tuple[str, ...]:
    # An empty list is allowed: e.g. mfa_amr_values = [] to rely on acr only.
    if raw == []:
        return ()
    return _strings(name, raw)


def _issuer(name: str, raw: Any) -> str:
    value = _text(name, raw)  # kept verbatim: it must equal the provider's "iss" exactly
    parts = urlsplit(value)
    if parts.query or parts.fragment or not parts.hostname or parts.username or parts.password:
        raise _error(f"{name}: expected a URL without query, fragment or credentials")
    if parts.scheme == "https":
        return value
    if parts.scheme == "http" and _is_local(parts.hostname):
        return value  # local test providers only
    raise _error(f"{name}: must be an https:// URL (http:// only for localhost, for tests)")


def _is_local(host: str) -> bool:
    if host in _LOCAL_HOSTS:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _auth_method(name: str, raw: Any) -> str:
    value = _text(name, raw)
    if value not in AUTH_METHODS:
        raise _error(f"{name}: must be one of {', '.join(AUTH_METHODS)}")
    return value


def _scopes(name: str, raw: Any) -> str:
    words = _strings(name, raw) if isinstance(raw, list) else tuple(_text(name, raw).split())
    if "openid" not in words:
        raise _error(f"{name}: must include 'openid'")
    return " ".join(words)


def _algs(name: str, raw: Any) -> tuple[str, ...]:
    values = _strings(name, raw)
    for alg in values:
        if alg not in SUPPORTED_ALGS:
            raise _error(f"{name}: '{alg}' is not allowed (use {', '.join(SUPPORTED_ALGS)}; "
                         "'none' and HMAC algorithms are refused)")
    return values


def _role_map(name: str, raw: Any) -> tuple[tuple[str, str], ...]:
    if not isinstance(raw, Mapping) or not raw:
        raise _error(f"{name}: expected a table of claim value = role")
    pairs = []
    for value, role in raw.items():
        if role not in ROLES:
            raise _error(f"{name}.{value}: '{role}' is not a role (use {', '.join(ROLES)})")
        pairs.append((str(value), str(role)))
    return tuple(pairs)


def _max_age(name: str, raw: Any) -> int:
    if isinstance(raw, bool) or not isinstance(raw, int) or not 0 <= raw <= 30 * 24 * 3600:
        raise _error(f"{name}: expected a number of seconds between 0 and 2592000")
    return raw


def _path(name: str, raw: Any) -> Path:
    return Path(_text(name, raw)).expanduser().absolute()


_PARSERS: dict[str, Parser] = {
    "name": _slug, "display_name": _text, "issuer": _issuer, "client_id": _text,
    "client_secret_file": _path, "client_secret_env": _text, "auth_method": _auth_method,
    "scopes": _scopes, "username_claim": _strings, "role_claim": _text, "role_map": _role_map,
    "fhir_user_claim": _text, "organization_claim": _text, "mfa_amr_values": _optional_strings,
    "mfa_acr_values": _optional_strings, "allowed_algs": _algs, "use_userinfo": _bool,
    "auto_provision": _bool, "acr_values": _text, "max_age": _max_age,
    "validate_access_token": _bool,
}
_RENAMED = {"username_claim": "username_claims"}
_REQUIRED = ("name", "issuer", "client_id")


def parse_identity_providers(raw: Any, origin: str,
                             environ: Mapping[str, str]) -> tuple[IdentityProviderSettings, ...]:
    """Validate every ``[[identity_providers]]`` table; errors name the key and where it came from."""
    if raw is None or (isinstance(raw, Mapping) and not raw):  # absent (config.py may pass {})
        return ()
    if not isinstance(raw, list):
        raise _error(f"identity_providers: expected an array of tables [[identity_providers]] (from {origin})")
    providers: list[IdentityProviderSettings] = []
    for index, table in enumerate(raw):
        provider = _parse_one(index, table, origin, environ)
        if any(p.name == provider.name for p in providers):
            raise _error(f"identity_providers[{index}].name: '{provider.name}' is used twice (from {origin})")
        providers.append(provider)
    return tuple(providers)


def _parse_one(index: int, table: Any, origin: str, environ: Mapping[str, str]) -> IdentityProviderSettings:
    prefix = f"identity_providers[{index}]"
    if not isinstance(table, Mapping):
        raise _error(f"{prefix}: expected a table (from {origin})")
    if "client_secret" in table:
        raise _error(f"{prefix}.client_secret: secrets are not accepted inline (config files are often "
                     f"readable, copied or versioned); use client_secret_file or client_secret_env (from {origin})")
    values: dict[str, Any] = {}
    for key, value in table.items():
        parse = _PARSERS.get(key)
        if parse is None:
            raise _error(f"unknown setting '{prefix}.{key}' (from {origin})")
        try:
            values[_RENAMED.get(str(key), str(key))] = parse(f"{prefix}.{key}", value)
        except ValueError as exc:  # SettingsError
            raise _error(f"{exc} (from {origin})") from None
    for key in _REQUIRED:
        if key not in values:
            raise _error(f"{prefix}.{key} is required (from {origin})")
    prefix = f"identity_providers.{values['name']}"
    secret = _secret(prefix, values, origin, environ)
    method = values.get("auth_method", "client_secret_basic")
    if method == "none" and secret is not None:
        raise _error(f"{prefix}: auth_method 'none' (public client) takes no client secret (from {origin})")
    if method != "none" and secret is None:
        raise _error(f"{prefix}: auth_method '{method}' needs client_secret_file or client_secret_env (from {origin})")
    return IdentityProviderSettings(client_secret=secret, **values)


def _secret(prefix: str, values: dict[str, Any], origin: str, environ: Mapping[str, str]) -> str | None:
    path: Path | None = values.pop("client_secret_file", None)
    env_name: str | None = values.pop("client_secret_env", None)
    if path is not None and env_name is not None:
        raise _error(f"{prefix}: give client_secret_file or client_secret_env, not both (from {origin})")
    if path is not None:
        try:
            secret = path.read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError) as exc:
            reason = exc.strerror if isinstance(exc, OSError) else "not UTF-8 text"
            raise _error(f"{prefix}.client_secret_file: cannot read {path}: {reason} (from {origin})") from None
    elif env_name is not None:
        env_value = environ.get(env_name)
        if env_value is None:
            raise _error(f"{prefix}.client_secret_env: environment variable {env_name} is not set (from {origin})")
        secret = env_value.strip()
    else:
        return None
    if not secret:
        raise _error(f"{prefix}: the client secret is empty (from {origin})")
    return secret
