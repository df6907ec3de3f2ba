"""S3Target against a real S3-compatible server (Swift s3api), faults injected by a TCP proxy.

Object Lock enforcement is tested against moto's server (Swift accepts the
headers but does not enforce them); everything else against Swift.
"""

from __future__ import annotations

import base64
import hashlib
import logging
import os
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING

import pytest

from fhirvault.backup.s3 import S3Target, parse_s3_url, validate_location
from fhirvault.backup.target import (
    BackupTarget,
    TargetError,
    TargetImmutable,
    TargetNotFound,
    TargetUnavailable,
)

if TYPE_CHECKING:  # imported by pytest as a plugin first, so its asserts get rewritten
    from tests.s3_server import S3Bucket, S3Server

# The s3_server/s3_bucket fixtures; registered once even if tests/conftest.py also lists it.
pytest_plugins = ["tests.s3_server"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class FaultProxy:
    """A TCP proxy in front of the S3 server that can cut, corrupt or stall requests.

    cut_after:   close both sides once this many request bytes went upstream on a
                 connection (the next ``cuts`` connections only; then pass through)
    cut_response_after: the same for response bytes (``response_cuts`` connections)
    corrupt:     flip the first byte after the request headers (the body's first byte)
    stall:       accept connections and never answer
    """

    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self.cut_after: int | None = None
        self.cuts = 0
        self.cut_response_after: int | None = None
        self.response_cuts = 0
        self.corrupt = False
        self.stall = False
        self.connections = 0
        self._lock = threading.Lock()
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self._closed = False
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def close(self) -> None:
        self._closed = True
        self._listener.close()

    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            with self._lock:
                self.connections += 1
                cut = self.cut_after if self.cuts > 0 else None
                if cut is not None:
                    self.cuts -= 1
                rcut = self.cut_response_after if self.response_cuts > 0 else None
                if rcut is not None:
                    self.response_cuts -= 1
            if self.stall:
                threading.Thread(target=self._hold, args=(client,), daemon=True).start()
                continue
            upstream = socket.create_connection(("127.0.0.1", self.upstream_port))
            threading.Thread(target=self._pump_request, args=(client, upstream, cut), daemon=True).start()
            threading.Thread(target=self._pump, args=(upstream, client, rcut), daemon=True).start()

    @staticmethod
    def _hold(conn: socket.socket) -> None:
        with conn:
            while conn.recv(65536):
                pass

    def _pump_request(self, src: socket.socket, dst: socket.socket, cut: int | None) -> None:
        sent, head, flipped = 0, b"", False
        try:
            while data := src.recv(65536):
                if self.corrupt and not flipped:
                    head += data
                    end = head.find(b"\r\n\r\n")
                    if end < 0 or end + 4 >= len(head):
                        continue  # hold back until a body byte is in hand
                    body_at = end + 4
                    data = head[:body_at] + bytes([head[body_at] ^ 0xFF]) + head[body_at + 1 :]
                    flipped = True
                if cut is not None and sent + len(data) >= cut:
                    dst.sendall(data[: cut - sent])
                    break
                dst.sendall(data)
                sent += len(data)
        except OSError:
            pass
        _reset(src, dst)

    @staticmethod
    def _pump(src: socket.socket, dst: socket.socket, cut: int | None) -> None:
        sent = 0
        try:
            while data := src.recv(65536):
                if cut is not None and sent + len(data) >= cut:
                    dst.sendall(data[: cut - sent])
                    break
                dst.sendall(data)
                sent += len(data)
        except OSError:
            pass
        _reset(src, dst)


def _reset(*socks: socket.socket) -> None:
    """Abrupt close (RST), as when a network path dies, not an orderly FIN."""
    for s in socks:
        try:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            s.shutdown(socket.SHUT_RD)  # wakes the other pump's recv(); close alone would not
        except OSError:
            pass
        s.close()


@pytest.fixture
def proxy(s3_server: S3Server) -> Iterator[FaultProxy]:
    p = FaultProxy(int(s3_server.endpoint_url.rsplit(":", 1)[1]))
    yield p
    p.close()


# -- the BackupTarget contract, against Swift --------------------------------


def test_is_a_backup_target_and_url_has_no_credentials(s3_bucket: S3Bucket) -> None:
    target: BackupTarget = s3_bucket.target("site-a/backups/")
    assert target.url == f"s3://{s3_bucket.name}/site-a/backups"
    assert "testing" not in target.url and "tester" not in target.url
    assert "testing" not in repr(target)
    assert target.location == "FR"


def test_put_get_exists_delete_roundtrip(s3_bucket: S3Bucket, s3_server: S3Server) -> None:
    target = s3_bucket.target("backups")
    data = os.urandom(300_000)
    assert not target.exists("chunks/ab/abcdef")
    target.put("chunks/ab/abcdef", data)
    assert target.exists("chunks/ab/abcdef")
    assert target.get("chunks/ab/abcdef") == data
    # Stored under the prefix, as one ordinary object.
    raw = s3_server.client().get_object(Bucket=s3_bucket.name, Key="backups/chunks/ab/abcdef")
    assert raw["Body"].read() == data
    target.put("chunks/ab/abcdef", b"replaced")
    assert target.get("chunks/ab/abcdef") == b"replaced"
    target.delete("chunks/ab/abcdef")
    assert not target.exists("chunks/ab/abcdef")
    target.delete("chunks/ab/abcdef")  # absent is fine
    target.put("empty", b"")
    assert target.get("empty") == b""


def test_get_missing_raises_not_found(s3_bucket: S3Bucket) -> None:
    target = s3_bucket.target()
    with pytest.raises(TargetNotFound, match="nothing/here"):
        target.get("nothing/here")


def test_list_paginates_in_order_and_stays_within_prefix(s3_bucket: S3Bucket) -> None:
    target = s3_bucket.target("p", list_page_size=7)
    neighbour = s3_bucket.target("p2")  # shares the string prefix "p" but not "p/"
    keys = [f"chunks/{i:03d}" for i in range(40)]
    for k in reversed(keys):
        target.put(k, k.encode())
    target.put("manifests/m1.json", b"{}")
    neighbour.put("chunks/999", b"x")
    assert list(target.list("chunks/")) == keys  # 40 keys over 6 pages of 7
    assert list(target.list("")) == [*keys, "manifests/m1.json"]
    assert list(target.list("chunks/01")) == [f"chunks/01{i}" for i in range(10)]
    assert list(target.list("nothing/")) == []


def test_invalid_keys_are_refused(s3_bucket: S3Bucket) -> None:
    target = s3_bucket.target()
    for key in ("", "/abs", "a/../b", "a//b", "a/./b"):
        with pytest.raises(ValueError):
            target.put(key, b"x")


def test_check_reports_a_writable_bucket_and_leaves_nothing(s3_bucket: S3Bucket, s3_server: S3Server) -> None:
    result = s3_bucket.target("backups").check()
    assert result.object_lock is False  # Swift reports no Object Lock configuration
    assert s3_server.client().list_objects_v2(Bucket=s3_bucket.name).get("KeyCount", 0) == 0


def test_check_refuses_a_missing_bucket(s3_server: S3Server) -> None:
    target = S3Target("fv-does-not-exist", "", endpoint_url=s3_server.endpoint_url, region=None,
                      access_key_id=s3_server.access_key_id,
                      secret_access_key=s3_server.secret_access_key, location="DE")
    with pytest.raises(TargetError, match="does not exist"):
        target.check()


def test_wrong_credentials_give_a_clear_error_without_the_secret(
    s3_bucket: S3Bucket, caplog: pytest.LogCaptureFixture
) -> None:
    secret = "wr0ng-s3cret-VALUE"
    target = s3_bucket.target(secret_access_key=secret)
    caplog.set_level(logging.DEBUG, logger="fhirvault")
    for op in (lambda: target.put("k", b"x"), lambda: target.get("k"), target.check,
               lambda: list(target.list(""))):
        with pytest.raises(TargetError) as info:
            op()
        assert not isinstance(info.value, TargetUnavailable | TargetNotFound)
        message = str(info.value)
        assert "access refused" in message and "credentials" in message
        assert secret not in message and "tester" not in message  # nor the access key echoed by S3
        assert info.value.__cause__ is None and info.value.__context__ is not None  # suppressed
    assert secret not in caplog.text


# -- faults: unreachable, cut mid-upload, corrupted in flight -----------------


def test_closed_port_is_unavailable_within_bounded_time() -> None:
    target = S3Target("fv-bucket", "", endpoint_url=f"http://127.0.0.1:{free_port()}", region=None,
                      access_key_id="k", secret_access_key="s3cr3t", location="NL")
    started = time.monotonic()
    with pytest.raises(TargetUnavailable, match="unreachable") as info:
        target.put("k", b"x")
    assert time.monotonic() - started < 30  # 5 attempts with standard back-off
    assert "s3cr3t" not in str(info.value)


def test_stalled_server_times_out_as_unavailable(s3_bucket: S3Bucket, proxy: FaultProxy) -> None:
    proxy.stall = True
    target = s3_bucket.target(endpoint_url=proxy.url, read_timeout=1, max_attempts=2)
    started = time.monotonic()
    with pytest.raises(TargetUnavailable):
        target.get("k")
    assert time.monotonic() - started < 15


def test_upload_cut_every_time_fails_after_retries_and_leaves_nothing(
    s3_bucket: S3Bucket, s3_server: S3Server, proxy: FaultProxy, caplog: pytest.LogCaptureFixture
) -> None:
    proxy.cut_after, proxy.cuts = 200_000, 1000  # every connection dies mid-body
    target = s3_bucket.target(endpoint_url=proxy.url, max_attempts=3)
    data = os.urandom(2_000_000)
    with caplog.at_level(logging.WARNING, logger="fhirvault"), pytest.raises(TargetUnavailable):
        target.put("wal/000001", data)
    assert proxy.connections >= 3  # retried
    assert "unreachable after retries" in caplog.text  # the alert hook sees it
    # Nothing half-written is visible, through the target or behind its back.
    direct = s3_bucket.target()
    assert not direct.exists("wal/000001")
    assert list(direct.list("")) == []
    assert s3_server.client().list_objects_v2(Bucket=s3_bucket.name).get("KeyCount", 0) == 0


def test_upload_cut_once_is_retried_and_stored_whole(s3_bucket: S3Bucket, proxy: FaultProxy) -> None:
    proxy.cut_after, proxy.cuts = 200_000, 1
    target = s3_bucket.target(endpoint_url=proxy.url)
    data = os.urandom(2_000_000)
    target.put("wal/000002", data)
    assert proxy.connections >= 2
    assert s3_bucket.target().get("wal/000002") == data


def test_put_sends_the_content_md5_of_the_body(s3_bucket: S3Bucket) -> None:
    sent: list[dict[str, object]] = []
    target = s3_bucket.target()
    target._s3.meta.events.register(
        "before-send.s3.PutObject", lambda request, **_: sent.append(dict(request.headers)))
    data = os.urandom(10_000)
    target.put("k", data)
    assert sent[0]["Content-MD5"] == base64.b64encode(hashlib.md5(data).digest())


def test_corruption_in_flight_is_rejected(s3_bucket: S3Bucket, proxy: FaultProxy) -> None:
    # Over plain http SigV4 also signs the payload's SHA-256 (Swift checks either);
    # over https botocore leaves the payload unsigned and Content-MD5 does the job.
    proxy.corrupt = True
    target = s3_bucket.target(endpoint_url=proxy.url)
    with pytest.raises(TargetError, match="BadDigest") as info:
        target.put("chunks/x", os.urandom(100_000))
    assert not isinstance(info.value, TargetUnavailable)
    assert not s3_bucket.target().exists("chunks/x")


def test_download_cut_midway_is_retried(s3_bucket: S3Bucket, proxy: FaultProxy) -> None:
    data = os.urandom(3_000_000)
    s3_bucket.target().put("big", data)
    target = s3_bucket.target(endpoint_url=proxy.url)
    # The first response dies a megabyte in: botocore does not retry body reads.
    proxy.cut_response_after, proxy.response_cuts = 1_000_000, 1
    assert target.get("big") == data
    assert proxy.connections >= 2


def test_get_rejects_bytes_that_do_not_match_their_md5(s3_bucket: S3Bucket, s3_server: S3Server) -> None:
    # Stored behind the target's back with a wrong digest: what a bit flip at rest looks like.
    s3_server.client().put_object(Bucket=s3_bucket.name, Key="backups/rot", Body=b"bytes",
                                  Metadata={"fhirvault-md5": "0" * 32})
    with pytest.raises(TargetError, match="MD5"):
        s3_bucket.target("backups", max_attempts=2).get("rot")


# -- location ---------------------------------------------------------------------


@pytest.mark.parametrize("location", ["", "  ", "XX", "UK", "EU", "FRA"])
def test_location_missing_or_not_a_country_is_refused(location: str) -> None:
    with pytest.raises(ValueError, match="location"):
        S3Target("fv-bucket", "", endpoint_url="http://127.0.0.1:9", region=None, access_key_id=None,
                 secret_access_key=None, location=location)


@pytest.mark.parametrize("location", ["US", "GB", "CH"])
def test_location_outside_the_eea_needs_the_override(location: str) -> None:
    args = dict(endpoint_url="http://127.0.0.1:9", region=None, access_key_id=None,
                secret_access_key=None, location=location)
    with pytest.raises(ValueError, match="outside the EEA"):
        S3Target("fv-bucket", "", **args)
    assert S3Target("fv-bucket", "", **args, allow_outside_eea=True).location == location


def test_eea_locations_are_accepted_and_normalised() -> None:
    assert validate_location(" no ") == "NO"
    assert validate_location("de") == "DE"
    assert validate_location("IS") == "IS"


def test_parse_s3_url() -> None:
    assert parse_s3_url("s3://fhirvault-backups/prod/") == ("fhirvault-backups", "prod")
    assert parse_s3_url("s3://fhirvault-backups") == ("fhirvault-backups", "")
    for bad in ("https://bucket/p", "s3:///p", "s3://key:secret@bucket/p"):
        with pytest.raises(ValueError):
            parse_s3_url(bad)


def test_credentials_in_the_endpoint_url_are_refused() -> None:
    with pytest.raises(ValueError, match="credentials"):
        S3Target("fv-bucket", "", endpoint_url="http://key:secret@127.0.0.1:9", region=None,
                 access_key_id=None, secret_access_key=None, location="FR")


# -- Object Lock ---------------------------------------------------------------------


def test_swift_bucket_without_object_lock_ignores_retention(s3_bucket: S3Bucket, s3_server: S3Server) -> None:
    sent: list[dict[str, str]] = []
    target = s3_bucket.target()
    target._s3.meta.events.register(  # observe the wire: no lock headers without Object Lock
        "before-send.s3.PutObject", lambda request, **_: sent.append(dict(request.headers)))
    until = int((datetime.now(UTC) + timedelta(days=30)).timestamp() * 1000)
    target.put("m", b"manifest", retain_until_ms=until)
    assert sent and not any(h.lower().startswith("x-amz-object-lock") for h in sent[0])
    assert "Content-MD5" in sent[0]
    target.delete("m")
    assert not target.exists("m")


@pytest.fixture(scope="module")
def moto_endpoint(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """moto's S3 emulator, only for the Object Lock semantic that Swift does not enforce."""
    port = free_port()
    log = (tmp_path_factory.mktemp("moto") / "moto.log").open("wb")
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=log, stderr=log)
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    pytest.fail("moto server did not start")
                time.sleep(0.1)
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(timeout=10)
        log.close()


def _moto_target(endpoint: str, bucket: str, *, lock: bool, **kwargs: object) -> S3Target:
    import boto3

    client = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1",
                          aws_access_key_id="moto", aws_secret_access_key="moto")
    client.create_bucket(Bucket=bucket, ObjectLockEnabledForBucket=lock)
    return S3Target(bucket, "b", endpoint_url=endpoint, region=None, access_key_id="moto",
                    secret_access_key="moto", location="SE", **kwargs)  # type: ignore[arg-type]


def test_object_lock_compliance_blocks_delete_until_retention(moto_endpoint: str) -> None:
    target = _moto_target(moto_endpoint, "fv-locked", lock=True)
    assert target.check().object_lock is True
    until = datetime.now(UTC) + timedelta(days=7)
    target.put("manifests/m1.json", b"manifest", retain_until_ms=int(until.timestamp() * 1000))
    head = target._s3.head_object(Bucket="fv-locked", Key="b/manifests/m1.json")
    assert head["ObjectLockMode"] == "COMPLIANCE"
    assert abs((head["ObjectLockRetainUntilDate"] - until).total_seconds()) < 2
    with pytest.raises(TargetImmutable, match="retention"):
        target.delete("manifests/m1.json")
    assert target.get("manifests/m1.json") == b"manifest"  # not even hidden by a delete marker
    # Without retention the object goes, every version of it.
    target.put("chunks/free", b"x")
    target.put("chunks/free", b"y")
    target.delete("chunks/free")
    assert not target.exists("chunks/free")
    versions = target._s3.list_object_versions(Bucket="fv-locked", Prefix="b/chunks/free")
    assert not versions.get("Versions") and not versions.get("DeleteMarkers")


def test_object_lock_days_is_a_floor_for_retained_puts(moto_endpoint: str) -> None:
    target = _moto_target(moto_endpoint, "fv-locked-days", lock=True, object_lock_days=30)
    expected = datetime.now(UTC) + timedelta(days=30)
    # A shorter date asked by the engine does not undercut the operator's floor, nor does a past one.
    for i, asked in enumerate((datetime.now(UTC) + timedelta(days=1), datetime.now(UTC) - timedelta(days=1))):
        target.put(f"k{i}", b"x", retain_until_ms=int(asked.timestamp() * 1000))
        head = target._s3.head_object(Bucket="fv-locked-days", Key=f"b/k{i}")
        assert head["ObjectLockMode"] == "COMPLIANCE"
        assert abs((head["ObjectLockRetainUntilDate"] - expected).total_seconds()) < 60
        with pytest.raises(TargetImmutable):
            target.delete(f"k{i}")
    # A put that asks for no retention (a lease) stays deletable.
    target.put("leases/x", b"{}")
    assert "ObjectLockMode" not in target._s3.head_object(Bucket="fv-locked-days", Key="b/leases/x")
    target.delete("leases/x")
    assert not target.exists("leases/x")


def test_bucket_without_object_lock_on_moto_sends_no_lock_headers(moto_endpoint: str) -> None:
    target = _moto_target(moto_endpoint, "fv-unlocked", lock=False, object_lock_days=30)
    assert target.check().object_lock is False
    target.put("k", b"x", retain_until_ms=int((datetime.now(UTC) + timedelta(days=1)).timestamp() * 1000))
    assert "ObjectLockMode" not in target._s3.head_object(Bucket="fv-unlocked", Key="b/k")
    target.delete("k")
    assert not target.exists("k")


def test_report_server_start_and_throughput(s3_bucket: S3Bucket, s3_server: S3Server) -> None:
    """Not an assertion of speed: prints the figures for the report (pytest -s)."""
    target = s3_bucket.target()
    blob = os.urandom(4 * 1024 * 1024)
    n = 8
    started = time.monotonic()
    for i in range(n):
        target.put(f"bench/{i}", blob)
    put_s = time.monotonic() - started
    started = time.monotonic()
    for i in range(n):
        assert len(target.get(f"bench/{i}")) == len(blob)
    get_s = time.monotonic() - started
    small = 200
    started = time.monotonic()
    for i in range(small):
        target.put(f"small/{i}", b"x" * 4096)
    small_s = time.monotonic() - started
    print(f"\nswift start {s3_server.start_seconds:.1f} s; 4 MiB objects: put {n * 4 / put_s:.0f} MiB/s, "
          f"get {n * 4 / get_s:.0f} MiB/s; 4 KiB puts: {small / small_s:.0f}/s")
