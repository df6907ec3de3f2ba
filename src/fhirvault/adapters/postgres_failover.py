"""Connections that survive a PostgreSQL restart or failover (see docs/postgresql.md).

libpq chooses the host: a multi-host URL with ``target_session_attrs=read-write``
(``postgresql://h1:5432,h2:5432/db?target_session_attrs=read-write``) connects to whichever
host is the primary now. This module adds what libpq leaves to the application:

- bounded time-outs and TCP keepalives on every connection, so a vanished host is noticed in
  seconds instead of the kernel's quarter of an hour;
- the writer refuses a standby (a URL without ``target_session_attrs`` may reach one), and a
  "read-only transaction" error means the primary moved: reconnect;
- after the connection broke during COMMIT, the transaction's fate is asked from the server
  (``pg_xact_status``) when that answer can be trusted, so the caller hears "committed",
  "not committed" or, only when it cannot be known, "unknown" — never a false success.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import psycopg
from psycopg import errors as pg_errors
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from fhirvault.ports import StoreUnavailable

log = logging.getLogger("fhirvault.store")

# Applied unless the URL sets them. keepalives_*: a silent peer is declared dead after ~11 s;
# tcp_user_timeout: unacknowledged sends fail after 10 s; connect_timeout: per host tried.
_CONNECT_DEFAULTS = {"connect_timeout": "3", "keepalives": "1", "keepalives_idle": "5", "keepalives_interval": "2",
                     "keepalives_count": "3", "tcp_user_timeout": "10000"}
# The same for the server's side of the leadership session: the server drops a vanished
# node's session (and so its advisory locks) after ~11 s instead of hours.
SERVER_KEEPALIVES = ("SET tcp_keepalives_idle = 5; SET tcp_keepalives_interval = 2;"
                     " SET tcp_keepalives_count = 3")
RECONNECT_WAIT = 2.0  # a write waits this long for the database to come back before a 503
READ_WAIT = 2.0  # a read waits this long for a pooled connection
_PAUSE_FIRST, _PAUSE_MAX = 0.05, 0.5  # back-off between connection attempts
_OUTCOME_WAIT = 2.0  # how long a still-running COMMIT (seen from a new session) is waited for
UNAVAILABLE = "The database is unavailable (restarting or failing over); retry shortly."
UNKNOWN = ("The database connection was lost while this write was committing and whether it was stored could "
           "not be established; read the resource before retrying.")

# Server states that end the session or refuse writes here: reconnect (maybe to another host).
_RECONNECT_STATES = (pg_errors.ReadOnlySqlTransaction, pg_errors.AdminShutdown, pg_errors.CrashShutdown,
                     pg_errors.CannotConnectNow, pg_errors.DatabaseDropped)


def conninfo(url: str) -> str:
    """``url`` (one or several hosts) with the defaults above for what it does not set itself."""
    params: dict[str, Any] = dict(conninfo_to_dict(url))
    for name, value in _CONNECT_DEFAULTS.items():
        params.setdefault(name, value)
    return make_conninfo(**params)


def connection_lost(exc: BaseException, conn: psycopg.Connection[Any] | None) -> bool:
    """Whether ``exc`` means this connection cannot be used for writes any more."""
    if conn is not None and (conn.broken or conn.closed):
        return True
    if isinstance(exc, _RECONNECT_STATES):
        return True
    state = getattr(exc, "sqlstate", None)
    return isinstance(state, str) and state.startswith("08")  # connection exception class


class NotPrimary(psycopg.OperationalError):
    """The session reached a standby (read-only): not usable for writes."""


# The server a session reached, as far as transaction ids go: a restarted server may hand out
# again an id whose transaction never reached its WAL, and a promoted standby has its own future.
_IDENTITY = "SELECT pg_is_in_recovery(), pg_postmaster_start_time()::text, inet_server_addr()::text, inet_server_port()"


def connect_writer(info: str) -> tuple[psycopg.Connection[Any], tuple[Any, ...]]:
    """A write session on the primary, and the server's identity (see ``commit_outcome``)."""
    conn = psycopg.connect(info, autocommit=True, application_name="fhirvault-writer")
    try:
        row = conn.execute(_IDENTITY).fetchone()
        assert row is not None
        if row[0]:
            raise NotPrimary("the database server is a read-only standby")
        # Durable at COMMIT whatever the server's default: a write is acknowledged once its WAL is flushed.
        conn.execute("SET synchronous_commit = on")
    except BaseException:
        conn.close()
        raise
    return conn, tuple(row[1:])


def reconnect_writer(info: str, closing: Any) -> tuple[psycopg.Connection[Any], tuple[Any, ...]]:
    """Connect with back-off for up to RECONNECT_WAIT; then StoreUnavailable (the caller answers 503)."""
    deadline = time.monotonic() + RECONNECT_WAIT
    pause = _PAUSE_FIRST
    while True:
        try:
            conn, identity = connect_writer(info)
        except psycopg.Error as exc:
            if closing() or time.monotonic() + pause > deadline:
                log.error("database unavailable", extra={"error": type(exc).__name__})
                raise StoreUnavailable(UNAVAILABLE) from exc
            time.sleep(pause)
            pause = min(pause * 2, _PAUSE_MAX)
        else:
            log.warning("database writer connected", extra={"server": f"{identity[1]}:{identity[2]}"})
            return conn, identity


def transaction_id(conn: psycopg.Connection[Any]) -> int | None:
    """The running transaction's id, asked just before COMMIT (None: it wrote nothing)."""
    row = conn.execute("SELECT pg_current_xact_id_if_assigned()::text").fetchone()
    return None if row is None or row[0] is None else int(row[0])


def commit_outcome(conn: psycopg.Connection[Any], xid: int, same_server: bool) -> bool | None:
    """Did transaction ``xid`` commit? Asked on a new session after the old one broke during COMMIT.

    True only when the server is the one the transaction ran on, not restarted (a restarted or
    promoted server may have given the id to another transaction). Any other status means it
    did not commit: had it committed, its id would be known as committed on every server that
    holds its WAL. None: cannot be known (status truncated, or still running after a wait)."""
    deadline = time.monotonic() + _OUTCOME_WAIT
    while True:
        try:
            row = conn.execute("SELECT pg_xact_status(%s::text::xid8)", (str(xid),)).fetchone()
        except pg_errors.InvalidParameterValue:  # "in the future": this server never saw it
            return False
        status = None if row is None else row[0]
        if status == "committed":
            return True if same_server else None
        if status == "aborted" or (status == "in progress" and not same_server):
            return False
        if status is None or time.monotonic() > deadline:
            return None
        time.sleep(0.05)  # our old session may still be finishing the COMMIT


def reject_standby(conn: psycopg.Connection[Any]) -> None:
    """For pooled read sessions: a standby may lag, and a client must read what it just wrote."""
    row = conn.execute("SELECT pg_is_in_recovery()").fetchone()
    if row is not None and row[0]:
        raise NotPrimary("the database server is a read-only standby")
