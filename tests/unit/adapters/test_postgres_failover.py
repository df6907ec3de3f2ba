"""PostgreSQL connection loss, restart and failover, on real servers (no cluster manager needed)."""

from __future__ import annotations

import contextlib
import time
from pathlib import Path
from typing import Any

import psycopg
import pytest

from fhirvault.adapters import postgres_failover as failover
from fhirvault.adapters.database_errors import describe
from fhirvault.adapters.postgres_store import PostgresLeadership, PostgresStore
from fhirvault.config import load_settings
from fhirvault.ports import LostLeadership, StoreUnavailable, WriteTx
from fhirvault.services.health import database_probe
from tests import pg_server
from tests.pg_restartable import RestartablePg, restartable_pg


def _meta(name: str) -> Any:
    return lambda tx: tx.set_meta(name, b"1")


# -- URLs -----------------------------------------------------------------------------------
def test_a_multi_host_url_is_a_valid_setting_and_its_password_is_never_shown(tmp_path: Path) -> None:
    url = "postgresql://app:S3cr3t-pw@db1.example:5432,db2.example:5433/fhirvault?target_session_attrs=read-write"
    settings = load_settings({"data_dir": tmp_path}, environ={"FHIRVAULT_DATABASE_URL": url})
    assert settings.database_url == url and "S3cr3t" not in repr(settings)
    info = failover.conninfo(url)
    assert "host=db1.example,db2.example" in info and "target_session_attrs=read-write" in info
    assert "keepalives_idle=5" in info and "connect_timeout=3" in info  # our defaults
    assert "connect_timeout=9" in failover.conninfo(url + "&connect_timeout=9")  # the URL's own value wins


def test_database_errors_are_described_without_the_password() -> None:
    exc = psycopg.OperationalError('connection to server at "h1" failed\n bad "postgresql://app:S3cr3t@h1,h2/db"'
                                   "\nmissing = after password=S3cr3t")
    text = describe(exc)
    assert "S3cr3t" not in text and "h1" in text and "\n" not in text


def test_the_first_host_down_the_second_primary_is_used(pg_url: str) -> None:
    port = pg_server.server().port
    dead = pg_server.free_port()  # nothing listens there
    database = pg_url.rsplit("/", 1)[1]
    url = f"postgresql://postgres@127.0.0.1:{dead},127.0.0.1:{port}/{database}?target_session_attrs=read-write"
    store = PostgresStore(url, read_pool_size=2)
    try:
        store.write_sync("m", _meta("via-second-host"))
        assert store.get_meta("via-second-host") == b"1"
    finally:
        store.close()


# -- the writer -------------------------------------------------------------------------------
def test_a_commit_interrupted_by_a_lost_connection_is_reported_as_committed_when_it_was(pg_url: str) -> None:
    """The reply to COMMIT is lost (the session dies right after it): the server is asked, the write
    is acknowledged because it was stored, not failed (the client would write it again)."""
    store = PostgresStore(pg_url, read_pool_size=2, writers=1)
    try:
        store.write_sync("m", _meta("warm"))
        real = store._writer_conns[0]

        class LosesTheReply:
            def __getattr__(self, name: str) -> Any:
                return getattr(real, name)

            def execute(self, sql: Any, *args: Any) -> Any:
                result = real.execute(sql, *args)
                if sql in ("COMMIT", b"COMMIT"):
                    real.pgconn.finish()  # as if the network dropped before the reply came back
                    raise psycopg.OperationalError("the connection is lost")
                return result

        store._writer_conns[0] = LosesTheReply()  # type: ignore[assignment]
        assert store.write_sync("m", lambda tx: tx.set_meta("stored", b"1") or "done") == "done"
        assert store.get_meta("stored") == b"1"
        store.write_sync("m", _meta("after"))  # on a new session
        assert store.get_meta("after") == b"1"
    finally:
        store.close()


def test_a_commit_that_failed_with_its_session_is_reported_as_not_stored(pg_url: str) -> None:
    """The session dies inside COMMIT (a deferred trigger ends it): known aborted, a plain 503."""
    with psycopg.connect(pg_url, autocommit=True) as c:
        c.execute("CREATE FUNCTION die() RETURNS trigger LANGUAGE plpgsql AS"
                  " $$ BEGIN PERFORM pg_terminate_backend(pg_backend_pid()); RETURN NULL; END $$")
        c.execute("CREATE CONSTRAINT TRIGGER die_at_commit AFTER INSERT ON meta DEFERRABLE INITIALLY DEFERRED"
                  " FOR EACH ROW WHEN (NEW.name = 'doomed') EXECUTE FUNCTION die()")
    store = PostgresStore(pg_url, read_pool_size=2)
    try:
        with pytest.raises(StoreUnavailable) as failed:
            store.write_sync("m", _meta("doomed"))
        assert not failed.value.outcome_unknown
        assert store.get_meta("doomed") is None
        store.write_sync("m", _meta("next"))
        assert store.get_meta("next") == b"1"
    finally:
        store.close()


def test_commit_outcome_answers_only_what_the_server_can_prove(pg_url: str) -> None:
    with psycopg.connect(pg_url, autocommit=True) as a, psycopg.connect(pg_url, autocommit=True) as b:
        def run(end: str) -> int:
            with a.transaction(force_rollback=end == "ROLLBACK"):
                a.execute("INSERT INTO meta (name, value) VALUES (%s, 'x')", (f"n-{end}-{time.monotonic_ns()}",))
                xid = failover.transaction_id(a)
            assert xid is not None
            return xid

        committed, aborted = run("COMMIT"), run("ROLLBACK")
        assert failover.commit_outcome(b, committed, same_server=True) is True
        assert failover.commit_outcome(b, committed, same_server=False) is None  # a restarted server may reuse ids
        assert failover.commit_outcome(b, aborted, same_server=True) is False
        assert failover.commit_outcome(b, aborted, same_server=False) is False
        assert failover.commit_outcome(b, committed + 10_000_000, same_server=False) is False  # never seen here


def test_a_read_only_session_is_a_reason_to_reconnect_and_a_503_not_a_500(pg_url: str) -> None:
    """As when the old primary's address now leads to a standby: writes refused, the writer reconnects."""
    database = pg_url.rsplit("/", 1)[1]
    store = PostgresStore(pg_url, read_pool_size=2, writers=1)  # the one session made read-only below
    try:
        store.write_sync("m", _meta("before"))
        pg_server.server().admin(f'ALTER DATABASE "{database}" SET default_transaction_read_only = on')
        store.write_sync("m", lambda tx: tx._x("SET default_transaction_read_only = on"))  # this session too
        with pytest.raises(StoreUnavailable):
            store.write_sync("m", _meta("refused"))
        with pytest.raises(StoreUnavailable):  # a new session: still read-only, still refused
            store.write_sync("m", _meta("refused"))
        pg_server.server().admin(f'ALTER DATABASE "{database}" RESET default_transaction_read_only')
        store.write_sync("m", _meta("after"))
        assert (store.get_meta("refused"), store.get_meta("after")) == (None, b"1")
    finally:
        store.close()


# -- restarts ---------------------------------------------------------------------------------
@pytest.mark.slow
def test_reads_and_writes_come_back_after_a_database_crash_and_restart() -> None:
    with restartable_pg() as pg:
        _crash_and_restart(pg)


def _crash_and_restart(pg: RestartablePg) -> None:
    url = pg.url()
    store = PostgresStore(url, read_pool_size=3)
    leader = PostgresLeadership(failover.conninfo(url))
    try:
        store.write_sync("m", _meta("before"))
        assert store.get_meta("before") == b"1" and leader.lead("audit-checkpoints")
        pg.stop("immediate")  # a crash: no shutdown checkpoint, recovery at the next start
        with pytest.raises(StoreUnavailable):
            store.write_sync("m", _meta("while-down"))
        with pytest.raises(StoreUnavailable):
            store.get_meta("before")
        assert not leader.lead("audit-checkpoints")  # the lock died with the session: stop leading
        pg.start()
        up = time.monotonic()
        store.write_sync("m", _meta("after"))  # reconnects: no error for the first write after
        first_write = time.monotonic() - up
        assert store.get_meta("before") == b"1" and store.get_meta("after") == b"1"  # the pool's dead sessions
        assert leader.lead("audit-checkpoints")  # re-acquired on a new session
        assert first_write < failover.RECONNECT_WAIT + 1, first_write
    finally:
        leader.close()
        with contextlib.suppress(Exception):
            store.close()


# -- leadership fencing ---------------------------------------------------------------------
def test_a_leader_whose_session_died_cannot_write_as_leader_even_before_it_notices(pg_url: str) -> None:
    store = PostgresStore(pg_url, read_pool_size=2)
    old, new = PostgresLeadership(pg_url), PostgresLeadership(pg_url)
    try:
        assert old.lead("audit-checkpoints")

        def fenced(leadership: PostgresLeadership) -> Any:
            def job(tx: WriteTx) -> None:
                leadership.fence(tx, "audit-checkpoints")
                tx.set_meta("written-by-leader", b"1")
            return job

        store.write_sync("cp", fenced(old))  # the leader may
        with pytest.raises(LostLeadership):
            store.write_sync("cp", fenced(new))  # another process may not
        pg_server.server().admin("SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                                 " WHERE application_name = 'fhirvault-leader' AND pid <> pg_backend_pid()")
        deadline = time.monotonic() + 5
        while not new.lead("audit-checkpoints"):  # the lock goes with the session, as it ends
            assert time.monotonic() < deadline, "the role did not move"
            time.sleep(0.05)
        with pytest.raises(LostLeadership):
            store.write_sync("cp", fenced(old))  # the old leader has not called lead() since: still fenced
        store.write_sync("cp", fenced(new))
    finally:
        old.close()
        new.close()
        store.close()


def test_the_readiness_probe_fails_while_the_database_refuses_connections(pg_url: str) -> None:
    """/readyz's write job must reach the database: with every session gone and none allowed, it fails."""
    database = pg_url.rsplit("/", 1)[1]
    store = PostgresStore(pg_url, read_pool_size=1, writers=1)
    try:
        store.write_sync("health.ready", database_probe)
        pg_server.server().admin(f'ALTER DATABASE "{database}" WITH ALLOW_CONNECTIONS false')
        pg_server.server().admin("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s",
                                 database)
        with pytest.raises(StoreUnavailable):
            store.write_sync("health.ready", database_probe)
    finally:
        store.close()
        pg_server.server().admin(f'ALTER DATABASE "{database}" WITH ALLOW_CONNECTIONS true')
