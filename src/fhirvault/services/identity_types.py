"""Shared vocabulary of identity and access control: roles, and the federated-login contract."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

# Roles a user can hold (exactly one per user account).
PRACTITIONER = "practitioner"
NURSE = "nurse"
ADMIN_STAFF = "admin_staff"  # administrative staff (admissions, billing): demographics, not clinical notes
PATIENT = "patient"
AUDITOR = "auditor"
SECURITY_OFFICER = "security_officer"
PLATFORM_ADMIN = "platform_admin"  # runs the system; never reads clinical content
OPERATOR = "operator"  # runs the service day to day from the console (health, backups, accounts); no clinical content
DPO = "dpo"  # data protection officer: registers and compliance report; no clinical content
# Appended, never reordered: existing accounts keep their role strings.
ROLES = (PRACTITIONER, NURSE, ADMIN_STAFF, PATIENT, AUDITOR, SECURITY_OFFICER, PLATFORM_ADMIN, OPERATOR, DPO)
# Professionals must use a second factor (local TOTP, or an identity provider that asserts MFA).
MFA_REQUIRED = frozenset(ROLES) - {PATIENT}


@dataclass(frozen=True, slots=True)
class FederatedIdentity:
    """A person authenticated by an external OpenID Connect provider, after strict ID token checks."""

    provider: str  # the configured provider's name
    issuer: str
    subject: str
    username: str | None = None  # preferred_username / email, for display and linking
    role: str | None = None  # mapped from the provider's claims; None if no mapping matched
    fhir_user: str | None = None
    organization: str | None = None
    mfa: bool = False  # the provider asserted a second factor (amr/acr)
    claims: Mapping[str, Any] = field(default_factory=dict)


class FederatedLogin(Protocol):
    """One configured external identity provider (authorization code flow with PKCE)."""

    @property
    def name(self) -> str: ...

    @property
    def display_name(self) -> str: ...

    async def begin(self, redirect_uri: str) -> tuple[str, dict[str, str]]:
        """The provider's authorization URL to redirect the browser to, and the state to keep server-side
        (state, nonce, PKCE verifier) until the callback."""

    async def complete(self, params: Mapping[str, str], saved: Mapping[str, str],
                       redirect_uri: str) -> FederatedIdentity:
        """Handle the callback query (code, state or error): exchange the code, validate the ID token
        strictly, map claims. Raises FederationError with a safe message on any failure."""


class FederationError(Exception):
    """A federated login failed; the message is safe to show (no tokens, no claims)."""
