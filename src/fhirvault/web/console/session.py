"""Console sign-in state: the session cookie, the CSRF tokens, the pending second factor.

* The session is a login session of the authorization server (services/oauth_server.py: stored,
  idle timeout ``session_idle_minutes``, ended by sign-out or by disabling the account), carried by
  its own cookie: HttpOnly, SameSite=Strict, path /console, Secure (and ``__Host-``-less but
  path-scoped) when the server is reached over HTTPS.
* CSRF: every form carries a synchroniser token, HMAC(console key, session id): bound to the
  session, the same in every worker, never stored. Before sign-in the login form's token is a
  double-submit of a random cookie.
* Between the password and the second factor the user id waits in a signed, 5-minute cookie, so
  any worker can finish the sign-in.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
import time

SESSION_COOKIE = "fv_console"
PRE_COOKIE = "fv_console_pre"
PENDING_COOKIE = "fv_console_mfa"
PATH = "/console"
PENDING_S = 300
KEY_NAME = "console"  # ServiceSecrets name of the key signing CSRF tokens and the pending cookie


class Signer:
    def __init__(self, key: bytes) -> None:
        self._key = key

    def _mac(self, purpose: str, value: str) -> str:
        mac = hmac.new(self._key, f"{purpose}\x00{value}".encode(), hashlib.sha256).digest()
        return base64.urlsafe_b64encode(mac).rstrip(b"=").decode()

    def csrf_for(self, session_id: str) -> str:
        return self._mac("csrf", session_id)

    def csrf_ok(self, session_id: str, token: str | None) -> bool:
        return bool(token) and hmac.compare_digest(self.csrf_for(session_id).encode(), (token or "").encode())

    def pending(self, user_id: str, now: float | None = None) -> str:
        expires = int((time.time() if now is None else now) + PENDING_S)
        body = f"{user_id}.{expires}.{secrets.token_urlsafe(8)}"
        return f"{body}.{self._mac('pending', body)}"

    def pending_user(self, cookie: str | None, now: float | None = None) -> str | None:
        """The user id of a valid, unexpired pending cookie, else None."""
        if not cookie or len(cookie) > 256 or cookie.count(".") != 3:
            return None
        body, _, mac = cookie.rpartition(".")
        if not hmac.compare_digest(self._mac("pending", body).encode(), mac.encode()):
            return None
        user_id, expires, _nonce = body.split(".")
        if not expires.isdigit() or int(expires) < (time.time() if now is None else now):
            return None
        return user_id


def new_pre_token() -> str:
    return secrets.token_urlsafe(24)


def same(a: str | None, b: str | None) -> bool:
    return bool(a) and bool(b) and hmac.compare_digest((a or "").encode(), (b or "").encode())
