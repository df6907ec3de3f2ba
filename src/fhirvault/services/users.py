"""People who log in: accounts, Argon2id passwords, TOTP second factor, lockout, federated links.

* Usernames are case-insensitive (stored lower-case), unique per tenant; the account's stable id
  (``u-…``) is what tokens (``sub``) and the audit trail name.
* Passwords are Argon2id hashes. An unknown username costs the same hash as a known one and gets
  the same error, so neither timing nor messages tell which usernames exist.
* TOTP secrets are sealed with a service secret (AES-256-GCM, bound to the user id); a code is
  accepted within ±1 time step and only once (the last accepted step is stored).
* Back-off: after ``BACKOFF_AFTER`` consecutive failed second factors each further failure locks
  the account for ``BACKOFF_BASE_S * 2**k`` seconds; after ``LOCK_AFTER`` it stays locked until an
  administrator unlocks it. Only someone who has the password gets that far. Wrong *passwords* do
  not lock the stored account: anyone who knows a user name could then lock its owner out. They are
  throttled per source address by the firewall and the detection engine's brute-force rule (the
  account is locked for the failing address, and for every address only after failures from many).
"""

from __future__ import annotations

import dataclasses
import hmac
import re
import secrets
from collections.abc import Callable
from dataclasses import dataclass

import pyotp
from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError, VerifyMismatchError

from fhirvault.ports import Clock, ResourceStore, UserRow, WriteTx
from fhirvault.services.crypto import Aead, DecryptionError, associated_data
from fhirvault.services.identity_types import MFA_REQUIRED, PATIENT, ROLES

BACKOFF_AFTER = 5
LOCK_AFTER = 10
BACKOFF_BASE_S = 15
TOTP_STEP_S = 30
MAX_USERNAME = 256  # longer claimed names are cut before any lookup
MAX_PASSWORD = 1024  # Argon2 accepts more; refuse absurd inputs before hashing
LOGIN_FAILED = "Sign-in failed: wrong username or password, or too many attempts. Try again later."
MFA_FAILED = "The verification code is not valid."
TOTP_KEY_NAME = "totp"  # ServiceSecrets name of the key sealing TOTP secrets
_USERNAME = re.compile(r"^[a-z0-9][a-z0-9._@+-]{0,63}$")
_CLEARANCES = frozenset({"R", "V"})
_REFERENCE = re.compile(r"^(Practitioner|PractitionerRole|Patient|RelatedPerson|Person)/[A-Za-z0-9\-.]{1,64}$")
_ORG = re.compile(r"^(Organization/)?[A-Za-z0-9\-.]{1,64}$")

_hasher = PasswordHasher()  # Argon2id, RFC 9106 low-memory profile defaults
_DUMMY_HASH = _hasher.hash(secrets.token_urlsafe(16))


class UserError(ValueError):
    """Invalid account data (CLI input); the message is safe to show."""


class LoginError(Exception):
    """A login step failed. ``str()`` is the generic message shown to the person."""

    def __init__(self, message: str, reason: str, user_id: str | None = None) -> None:
        super().__init__(message)
        self.reason = reason  # for the audit trail only: unknown-user, bad-password, locked, disabled…
        self.user_id = user_id


@dataclass(frozen=True, slots=True)
class NewUser:
    user: UserRow
    totp_uri: str | None  # otpauth:// URI, shown once at enrolment


def normalise(username: str) -> str:
    return username.strip().lower()[:MAX_USERNAME]


def mfa_required(user: UserRow) -> bool:
    return user.role in MFA_REQUIRED


class UserService:
    def __init__(self, store: ResourceStore, clock: Clock, totp_key: bytes, *, tenant: str,
                 issuer_name: str = "fhirvault") -> None:
        self._store = store
        self._clock = clock
        self._aead = Aead(totp_key)
        self._tenant = tenant
        self._issuer_name = issuer_name

    # -- administration (CLI) ----------------------------------------------------
    def create(self, username: str, role: str, password: str | None, *, fhir_user: str | None = None,
               organization: str | None = None, clearances: frozenset[str] = frozenset()) -> NewUser:
        name = normalise(username)
        if not _USERNAME.match(name):
            raise UserError("username: 1-64 characters, letters, digits and . _ @ + - (starting with a letter"
                            " or digit)")
        if role not in ROLES:
            raise UserError(f"role must be one of {', '.join(ROLES)}")
        if password is not None and not 12 <= len(password) <= MAX_PASSWORD:
            raise UserError("the password must have at least 12 characters")
        if fhir_user is not None and not _REFERENCE.match(fhir_user):
            raise UserError("fhir_user must be a reference such as Practitioner/123 or Patient/abc")
        if role == PATIENT and (fhir_user is None or not fhir_user.startswith("Patient/")):
            raise UserError("a patient account needs --fhir-user Patient/<id> (their own Patient record)")
        if organization is not None:
            if not _ORG.match(organization):
                raise UserError("organization must be an Organization id")
            organization = organization.removeprefix("Organization/")
        if not clearances <= _CLEARANCES:
            raise UserError("clearances must be among R, V")
        if self._store.user_by_username(self._tenant, name) is not None:
            raise UserError("a user with this username already exists")
        user_id = "u-" + secrets.token_hex(10)
        totp_secret = pyotp.random_base32() if role in MFA_REQUIRED else None
        row = UserRow(
            user_id=user_id, tenant=self._tenant, username=name,
            password_hash=_hasher.hash(password) if password is not None else None,
            role=role, fhir_user=fhir_user, organization=organization,
            clearances=" ".join(sorted(clearances)),
            totp=self._seal(user_id, totp_secret) if totp_secret else None,
            totp_last_step=0, disabled=False, failures=0, locked_until_ms=0, created_ms=self._clock.now_ms(),
        )
        self._store.write_sync("users.create", lambda tx: tx.insert_user(row))
        return NewUser(row, self._uri(name, totp_secret) if totp_secret else None)

    def reset_totp(self, username: str) -> str:
        user = self._require(username)
        secret = pyotp.random_base32()
        sealed = self._seal(user.user_id, secret)
        self._update(user.user_id, lambda u: dataclasses.replace(u, totp=sealed, totp_last_step=0))
        return self._uri(user.username, secret)

    def set_disabled(self, username: str, disabled: bool) -> int:
        """Disable (or enable) an account. Disabling ends its sessions and revokes their tokens;
        returns how many sessions ended."""
        user = self._require(username)
        now = self._clock.now_ms()

        def job(tx: WriteTx) -> int:
            current = tx.user_for_update(user.user_id)
            if current is None:
                return 0
            tx.update_user(dataclasses.replace(current, disabled=disabled))
            return tx.end_user_sessions(user.user_id, now) if disabled else 0

        return self._store.write_sync("users.disable", job)

    def unlock(self, username: str) -> None:
        user = self._require(username)
        self._update(user.user_id, lambda u: dataclasses.replace(u, failures=0, locked_until_ms=0))

    def set_password(self, username: str, password: str) -> None:
        if not 12 <= len(password) <= MAX_PASSWORD:
            raise UserError("the password must have at least 12 characters")
        user = self._require(username)
        digest = _hasher.hash(password)
        self._update(user.user_id, lambda u: dataclasses.replace(u, password_hash=digest))

    def link(self, username: str, provider: str, issuer: str, subject: str) -> None:
        user = self._require(username)
        self._store.write_sync("users.link", lambda tx: tx.link_identity(provider, issuer, subject, user.user_id))

    def _require(self, username: str) -> UserRow:
        user = self._store.user_by_username(self._tenant, normalise(username))
        if user is None:
            raise UserError("no such user")
        return user

    # -- login -------------------------------------------------------------------
    def get(self, user_id: str) -> UserRow | None:
        return self._store.user(user_id)

    def account_key(self, username: str) -> str:
        """What failed logins are counted under: the account id if it exists, else the claimed name.

        Cheap (no hashing): called before the throttle check."""
        user = self._store.user_by_username(self._tenant, normalise(username))
        return user.user_id if user is not None else normalise(username)

    def check_password(self, username: str, password: str) -> UserRow:
        """The account if the password is right and the account may log in; else LoginError (generic)."""
        now = self._clock.now_ms()
        user = self._store.user_by_username(self._tenant, normalise(username))
        ok = False
        if len(password) <= MAX_PASSWORD:
            digest = user.password_hash if user is not None and user.password_hash else _DUMMY_HASH
            try:
                ok = _hasher.verify(digest, password)
            except (VerifyMismatchError, VerificationError, InvalidHashError):
                ok = False
        else:
            _hasher.hash("x" * 16)  # same work as a check
        if user is None or user.password_hash is None:
            raise LoginError(LOGIN_FAILED, "unknown-user")
        # Locks are checked after the hash so a locked account answers as slowly as any other.
        if user.disabled:
            raise LoginError(LOGIN_FAILED, "disabled", user.user_id)
        if self._locked(user, now):
            raise LoginError(LOGIN_FAILED, "locked", user.user_id)
        if not ok:  # counted per source by the detection engine (see the module docstring)
            raise LoginError(LOGIN_FAILED, "bad-password", user.user_id)
        return user

    def check_totp(self, user_id: str, code: str) -> UserRow:
        """Accept a TOTP code (±1 step, each step once); failures count towards the lockout."""
        now = self._clock.now_ms()
        user = self._store.user(user_id)
        if user is None or user.disabled or self._locked(user, now):
            raise LoginError(MFA_FAILED, "locked" if user is not None else "unknown-user", user_id)
        if user.totp is None:
            raise LoginError(MFA_FAILED, "no-totp-enrolled", user_id)
        secret = self._open(user.user_id, user.totp)
        totp = pyotp.TOTP(secret, interval=TOTP_STEP_S)
        code = code.strip()
        current = now // 1000 // TOTP_STEP_S
        matched: int | None = None
        if re.fullmatch(r"\d{6}", code):
            for step in (current - 1, current, current + 1):
                if hmac.compare_digest(totp.at(step * TOTP_STEP_S), code):
                    matched = step
        if matched is None or matched <= user.totp_last_step:
            self.record_failure(user.user_id)
            raise LoginError(MFA_FAILED, "bad-code" if matched is None else "code-replay", user_id)

        def accept(tx: WriteTx) -> UserRow:
            fresh = tx.user_for_update(user_id)
            if fresh is None or matched is None or matched <= fresh.totp_last_step:  # raced with itself
                raise LoginError(MFA_FAILED, "code-replay", user_id)
            new = dataclasses.replace(fresh, totp_last_step=matched, failures=0, locked_until_ms=0)
            tx.update_user(new)
            return new

        return self._store.write_sync("users.totp", accept)

    def login_succeeded(self, user_id: str) -> None:
        self._update(user_id, lambda u: u if u.failures == 0 else dataclasses.replace(u, failures=0,
                                                                                      locked_until_ms=0))

    def record_failure(self, user_id: str) -> None:
        now = self._clock.now_ms()

        def fail(u: UserRow) -> UserRow:
            failures = u.failures + 1
            if failures >= LOCK_AFTER:
                until = -1
            elif failures >= BACKOFF_AFTER:
                until = now + BACKOFF_BASE_S * 1000 * 2 ** (failures - BACKOFF_AFTER)
            else:
                until = u.locked_until_ms if u.locked_until_ms == -1 else 0
            return dataclasses.replace(u, failures=failures, locked_until_ms=until)

        self._update(user_id, fail)

    @staticmethod
    def _locked(user: UserRow, now_ms: int) -> bool:
        return user.locked_until_ms == -1 or user.locked_until_ms > now_ms

    # -- federation ----------------------------------------------------------------
    def linked(self, provider: str, issuer: str, subject: str) -> UserRow | None:
        user_id = self._store.linked_user(provider, issuer, subject)
        return self._store.user(user_id) if user_id is not None else None

    def provision(self, provider: str, issuer: str, subject: str, username: str | None, role: str,
                  fhir_user: str | None, organization: str | None) -> UserRow:
        """Create a federated-only account (no local password) and link it."""
        base = normalise(username or subject)
        base = re.sub(r"[^a-z0-9._@+-]", "-", base)[:48] or "user"
        name = base if self._store.user_by_username(self._tenant, base) is None else (
            f"{base}-{secrets.token_hex(3)}")
        if fhir_user is not None and not _REFERENCE.match(fhir_user):
            fhir_user = None
        row = UserRow(
            user_id="u-" + secrets.token_hex(10), tenant=self._tenant, username=name, password_hash=None,
            role=role, fhir_user=fhir_user, organization=organization, clearances="", totp=None,
            totp_last_step=0, disabled=False, failures=0, locked_until_ms=0, created_ms=self._clock.now_ms(),
        )

        def create(tx: WriteTx) -> None:
            tx.insert_user(row)
            tx.link_identity(provider, issuer, subject, row.user_id)

        self._store.write_sync("users.provision", create)
        return row

    # -- helpers ---------------------------------------------------------------------
    def _update(self, user_id: str, change: Callable[[UserRow], UserRow]) -> None:
        def job(tx: WriteTx) -> None:
            current = tx.user_for_update(user_id)
            if current is not None:
                tx.update_user(change(current))

        self._store.write_sync("users.update", job)

    def _seal(self, user_id: str, secret: str) -> bytes:
        return self._aead.seal(secret.encode(), associated_data("totp", user_id))

    def _open(self, user_id: str, blob: bytes) -> str:
        try:
            return self._aead.open(blob, associated_data("totp", user_id)).decode()
        except DecryptionError:
            raise LoginError(MFA_FAILED, "totp-undecryptable", user_id) from None

    def _uri(self, username: str, secret: str) -> str:
        return pyotp.TOTP(secret, interval=TOTP_STEP_S).provisioning_uri(name=username, issuer_name=self._issuer_name)
