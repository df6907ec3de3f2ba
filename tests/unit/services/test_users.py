"""UserService: passwords, TOTP (window, replay, sealed secret), back-off and lockout."""

from __future__ import annotations

import pyotp
import pytest

from fhirvault.adapters.memory_store import MemoryStore
from fhirvault.services.crypto import new_key
from fhirvault.services.users import (
    BACKOFF_AFTER,
    BACKOFF_BASE_S,
    LOCK_AFTER,
    LOGIN_FAILED,
    LoginError,
    UserError,
    UserService,
)

PASSWORD = "a long enough password"


class FakeClock:
    def __init__(self) -> None:
        self.ms = 1_800_000_000_000

    def now_ms(self) -> int:
        return self.ms


@pytest.fixture
def env() -> tuple[UserService, MemoryStore, FakeClock]:
    store, clock = MemoryStore(), FakeClock()
    return UserService(store, clock, new_key(), tenant="default"), store, clock


def test_create_validates(env: tuple[UserService, MemoryStore, FakeClock]) -> None:
    users, _, _ = env
    with pytest.raises(UserError):
        users.create("x", "wizard", PASSWORD)
    with pytest.raises(UserError):
        users.create("x", "practitioner", "short")
    with pytest.raises(UserError):
        users.create("bad name!", "practitioner", PASSWORD)
    with pytest.raises(UserError):
        users.create("pat", "patient", PASSWORD)  # a patient needs their Patient id
    with pytest.raises(UserError):
        users.create("doc", "practitioner", PASSWORD, clearances=frozenset({"X"}))
    created = users.create("Doc", "practitioner", PASSWORD, fhir_user="Practitioner/1",
                           organization="Organization/o1", clearances=frozenset({"R"}))
    assert created.user.username == "doc" and created.user.organization == "o1" and created.user.clearances == "R"
    assert created.totp_uri is not None and created.totp_uri.startswith("otpauth://totp/")
    with pytest.raises(UserError):
        users.create("DOC", "nurse", PASSWORD)  # case-insensitive uniqueness
    patient = users.create("pat", "patient", PASSWORD, fhir_user="Patient/abc")
    assert patient.totp_uri is None


def test_totp_secret_is_sealed(env: tuple[UserService, MemoryStore, FakeClock]) -> None:
    users, store, _ = env
    created = users.create("doc", "practitioner", PASSWORD)
    assert created.totp_uri is not None
    secret = pyotp.parse_uri(created.totp_uri).secret
    row = store.user(created.user.user_id)
    assert row is not None and row.totp is not None and secret.encode() not in row.totp
    assert row.password_hash is not None and row.password_hash.startswith("$argon2id$")


def test_password_check_and_generic_errors(env: tuple[UserService, MemoryStore, FakeClock]) -> None:
    users, _, _ = env
    users.create("doc", "practitioner", PASSWORD)
    assert users.check_password("DOC", PASSWORD).username == "doc"
    errors = []
    for name, pw in (("doc", "wrong"), ("nobody", PASSWORD), ("doc", "x" * 5000)):
        with pytest.raises(LoginError) as exc:
            users.check_password(name, pw)
        errors.append(exc.value)
    assert {str(e) for e in errors} == {LOGIN_FAILED}
    assert errors[1].reason == "unknown-user" and errors[1].user_id is None


def test_totp_window_and_replay(env: tuple[UserService, MemoryStore, FakeClock]) -> None:
    users, _, clock = env
    created = users.create("doc", "practitioner", PASSWORD)
    assert created.totp_uri is not None
    totp = pyotp.parse_uri(created.totp_uri)
    uid = created.user.user_id
    now_s = clock.ms / 1000
    with pytest.raises(LoginError):
        users.check_totp(uid, totp.at(now_s - 60))  # two steps back: outside the window
    users.check_totp(uid, totp.at(now_s - 30))  # one step back: accepted
    users.check_totp(uid, totp.at(now_s))
    with pytest.raises(LoginError) as exc:
        users.check_totp(uid, totp.at(now_s))  # replay
    assert exc.value.reason == "code-replay"
    with pytest.raises(LoginError):
        users.check_totp(uid, totp.at(now_s - 30))  # an older step after a newer one
    users.check_totp(uid, totp.at(now_s + 30))
    for junk in ("", "12345", "abcdef", "1234567", "' OR 1=1 --"):
        with pytest.raises(LoginError):
            users.check_totp(uid, junk)


def test_wrong_passwords_do_not_lock_the_stored_account(env: tuple[UserService, MemoryStore, FakeClock]) -> None:
    # Anyone who knows a user name can send wrong passwords: that must not lock its owner out.
    # Password guessing is throttled per source address instead (firewall, detection engine).
    users, store, _ = env
    uid = users.create("doc", "practitioner", PASSWORD).user.user_id
    for _ in range(LOCK_AFTER * 3):
        with pytest.raises(LoginError) as exc:
            users.check_password("doc", "wrong")
        assert exc.value.reason == "bad-password"
    users.check_password("doc", PASSWORD)
    row = store.user(uid)
    assert row is not None and row.failures == 0 and row.locked_until_ms == 0


def test_totp_backoff_then_lock_until_admin_unlock(env: tuple[UserService, MemoryStore, FakeClock]) -> None:
    users, store, clock = env
    created = users.create("doc", "practitioner", PASSWORD)
    uid = created.user.user_id
    for _ in range(BACKOFF_AFTER):
        with pytest.raises(LoginError):
            users.check_totp(uid, "000000")
    # back-off: even the right password is refused, with the same message
    with pytest.raises(LoginError) as exc:
        users.check_password("doc", PASSWORD)
    assert exc.value.reason == "locked" and str(exc.value) == LOGIN_FAILED
    clock.ms += BACKOFF_BASE_S * 1000 + 1
    users.check_password("doc", PASSWORD)  # back-off over; failures are reset by a full login only
    users.login_succeeded(uid)
    row = store.user(uid)
    assert row is not None and row.failures == 0
    # up to the permanent lock
    for _ in range(LOCK_AFTER):
        clock.ms += 10 * 60_000  # past any back-off
        with pytest.raises(LoginError):
            users.check_totp(uid, "000000")
    row = store.user(uid)
    assert row is not None and row.locked_until_ms == -1
    clock.ms += 30 * 86_400_000
    with pytest.raises(LoginError) as exc:
        users.check_password("doc", PASSWORD)
    assert exc.value.reason == "locked"
    users.unlock("doc")
    users.check_password("doc", PASSWORD)


def test_disable_and_reset_totp(env: tuple[UserService, MemoryStore, FakeClock]) -> None:
    users, _, clock = env
    created = users.create("doc", "practitioner", PASSWORD)
    users.set_disabled("doc", True)
    with pytest.raises(LoginError):
        users.check_password("doc", PASSWORD)
    users.set_disabled("doc", False)
    assert created.totp_uri is not None
    old = pyotp.parse_uri(created.totp_uri)
    new = pyotp.parse_uri(users.reset_totp("doc"))
    with pytest.raises(LoginError):
        users.check_totp(created.user.user_id, old.at(clock.ms / 1000))
    users.check_totp(created.user.user_id, new.at(clock.ms / 1000))


def test_federated_provisioning(env: tuple[UserService, MemoryStore, FakeClock]) -> None:
    users, _, _ = env
    row = users.provision("psc", "https://idp", "sub-1", "Dr.Who@Example.org", "practitioner", "Practitioner/9", None)
    assert users.linked("psc", "https://idp", "sub-1") == row
    assert row.password_hash is None and row.username == "dr.who@example.org"
    with pytest.raises(LoginError):
        users.check_password(row.username, "")
