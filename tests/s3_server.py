"""A real S3-compatible server for the tests: OpenStack Swift with s3api (scripts/s3-test-server.sh).

One server per pytest(-xdist) worker, on free ports, in the worker's own temp
directory; a fresh bucket per test. Swift is apt-installed on first use (root,
30 s to 2 min); once installed it runs as any user. If it cannot be installed or
started the tests fail with what to do: a backup target that was never exercised
must not pass silently. The tests that need it carry the ``s3`` marker.

Use with ``pytest_plugins = ["tests.s3_server"]`` in tests/conftest.py, or import
``s3_server`` and ``s3_bucket`` into a test module.
"""

from __future__ import annotations

import fcntl
import os
import random
import shutil
import socket
import subprocess
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import boto3
import pytest
from botocore.config import Config

from fhirvault.backup.s3 import S3Target

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "s3-test-server.sh"
ACCESS_KEY = "test:tester"  # tempauth test account of the script; not a real secret
SECRET_KEY = "testing"
REGION = "us-east-1"
_INSTALL_LOCK = Path("/tmp/fhirvault-s3-test-server-install.lock")


@dataclass(frozen=True)
class S3Server:
    endpoint_url: str
    access_key_id: str
    secret_access_key: str
    region: str
    start_seconds: float  # how long the server took to answer (reported by the tests)

    def client(self) -> S3Client:
        """A plain boto3 client, to look at the bucket behind a target's back."""
        config = Config(s3={"addressing_style": "path"}, request_checksum_calculation="when_required",
                        response_checksum_validation="when_required")
        return boto3.session.Session().client(
            "s3", endpoint_url=self.endpoint_url, region_name=self.region,
            aws_access_key_id=self.access_key_id, aws_secret_access_key=self.secret_access_key,
            config=config)


@dataclass(frozen=True)
class S3Bucket:
    server: S3Server
    name: str

    def target(self, prefix: str = "backups", **kwargs: Any) -> S3Target:
        options: dict[str, Any] = {
            "endpoint_url": self.server.endpoint_url, "region": self.server.region,
            "access_key_id": self.server.access_key_id,
            "secret_access_key": self.server.secret_access_key, "location": "FR",
        }
        options.update(kwargs)
        return S3Target(self.name, prefix, **options)


def _installed() -> bool:
    servers = [f"swift-{s}-server" for s in ("proxy", "object", "container", "account")]
    return all(shutil.which(b) for b in [*servers, "memcached"])


NOT_INSTALLED = (
    "The S3 backup tests (marker s3) need OpenStack Swift from Debian's packages, which is not installed, "
    "and installing it needs root. Run once: sudo bash scripts/s3-test-server.sh install "
    "(30 s to 2 min), then run pytest again; Swift then runs as your own user. "
    "Meanwhile the other tests run with: pytest -m 'not s3'."
)


def _ensure_installed() -> None:
    if _installed():
        return
    if os.geteuid() != 0:
        pytest.fail(NOT_INSTALLED, pytrace=False)
    # xdist workers may get here together; apt/dpkg must run once at a time.
    with _INSTALL_LOCK.open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if _installed():
            return
        proc = subprocess.run(["bash", str(SCRIPT), "install"], capture_output=True, text=True,
                              timeout=900, check=False)
        if proc.returncode != 0 or not _installed():
            pytest.fail(f"could not install Swift for the S3 tests:\n{proc.stdout}\n{proc.stderr}")


def _free_port_block(n: int = 5) -> int:
    """A port p such that p..p+n-1 are all free now (proxy, object, container, account, memcached)."""
    for _ in range(200):
        base = random.randrange(20000, 60000 - n)
        socks: list[socket.socket] = []
        try:
            for p in range(base, base + n):
                s = socket.socket()
                socks.append(s)
                s.bind(("127.0.0.1", p))
            return base
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()
    raise RuntimeError("no block of free ports found")


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    _ensure_installed()
    errors = []
    for _ in range(3):  # a port taken between the probe and the bind: try elsewhere
        directory = tmp_path_factory.mktemp("swift")
        port = _free_port_block()
        started = time.monotonic()
        proc = subprocess.run(["bash", str(SCRIPT), "start", str(directory), str(port)],
                              capture_output=True, text=True, timeout=120, check=False)
        if proc.returncode == 0:
            break
        errors.append(proc.stderr)
    else:
        pytest.fail("could not start Swift (S3) for the tests:\n" + "\n".join(errors))
    try:
        yield S3Server(f"http://127.0.0.1:{port}", ACCESS_KEY, SECRET_KEY, REGION,
                       time.monotonic() - started)
    finally:
        subprocess.run(["bash", str(SCRIPT), "stop", str(directory)], capture_output=True,
                       timeout=60, check=False)


@pytest.fixture
def s3_bucket(s3_server: S3Server) -> S3Bucket:
    """A fresh, empty bucket (without Object Lock: Swift does not enforce it anyway)."""
    name = f"fv-{uuid.uuid4().hex[:16]}"
    client = s3_server.client()
    client.create_bucket(Bucket=name)
    # No clean-up: names are unique and the server goes away with the session.
    return S3Bucket(s3_server, name)
