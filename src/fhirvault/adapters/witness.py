"""Witnesses for audit checkpoints: places the database administrator cannot rewrite.

- ``file:///path``: one JSON line per checkpoint, appended and fsync'd. Put it on
  another volume (or host mount) and make it append-only (``chattr +a``), owned
  by an account the DBA does not have.
- ``syslog+udp://host:514`` / ``syslog+tcp://host:514`` / ``syslog+tls://host:6514``
  (RFC 5425, certificate verified; ``?ca=/path/ca.pem`` for a private CA): an RFC 5424 message per
  checkpoint to the central log collector (write-only: ``audit verify`` reads
  checkpoints back from a file the collector writes, given with ``--witness``).
"""

from __future__ import annotations

import os
import socket
import ssl
import time
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

from fhirvault.services.audit_checkpoints import Witness, WitnessedCheckpoint


class WitnessConfigError(ValueError):
    pass


class FileWitness:
    def __init__(self, path: Path) -> None:
        self.path = path

    @property
    def name(self) -> str:
        return f"file://{self.path}"

    def publish(self, checkpoint: WitnessedCheckpoint) -> None:
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o640)
        try:
            os.write(fd, checkpoint.to_json() + b"\n")
            os.fsync(fd)
        finally:
            os.close(fd)

    def read(self) -> list[WitnessedCheckpoint]:
        try:
            lines = self.path.read_bytes().splitlines()
        except FileNotFoundError:
            return []
        found = []
        for line in lines:
            if line.strip():
                try:
                    found.append(WitnessedCheckpoint.from_json(line))
                except (ValueError, KeyError, TypeError):
                    raise WitnessConfigError(f"witness {self.path} holds a malformed line") from None
        return found


class SyslogWitness:
    """RFC 5424 over UDP, or TCP with octet counting (RFC 6587), or TLS (RFC 5425)."""

    def __init__(self, host: str, port: int, *, tcp: bool, tls: ssl.SSLContext | None = None) -> None:
        self.host, self.port, self.tcp, self.tls = host, port, tcp or tls is not None, tls

    @property
    def name(self) -> str:
        kind = "tls" if self.tls is not None else "tcp" if self.tcp else "udp"
        return f"syslog+{kind}://{self.host}:{self.port}"

    def message(self, checkpoint: WitnessedCheckpoint) -> bytes:
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(checkpoint.ts_ms / 1000))
        stamp += f".{checkpoint.ts_ms % 1000:03d}Z"
        host = socket.gethostname() or "-"
        # PRI 110 = facility 13 (log audit) * 8 + severity 6 (informational)
        return (f"<110>1 {stamp} {host} fhirvault - audit-checkpoint - ".encode() + checkpoint.to_json())

    def publish(self, checkpoint: WitnessedCheckpoint) -> None:
        msg = self.message(checkpoint)
        if self.tcp:
            with socket.create_connection((self.host, self.port), timeout=5) as raw:
                s = raw if self.tls is None else self.tls.wrap_socket(raw, server_hostname=self.host)
                with s:
                    s.sendall(str(len(msg)).encode() + b" " + msg)
        else:
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
                s.sendto(msg, (self.host, self.port))

    def read(self) -> None:
        return None


def open_witness(spec: str) -> Witness:
    parts = urlsplit(spec)
    if parts.scheme == "file" and parts.path:
        return FileWitness(Path(parts.path))
    if parts.scheme in ("syslog+udp", "syslog+tcp") and parts.hostname:
        return SyslogWitness(parts.hostname, parts.port or 514, tcp=parts.scheme == "syslog+tcp")
    if parts.scheme == "syslog+tls" and parts.hostname:
        from fhirvault.adapters.alert_sinks import tls_client_context

        ca = parse_qs(parts.query).get("ca")
        return SyslogWitness(parts.hostname, parts.port or 6514, tcp=True,
                             tls=tls_client_context(Path(ca[0]) if ca else None))
    raise WitnessConfigError(f"unsupported audit witness '{spec}' (file:///path, syslog+udp://host:port, "
                             "syslog+tcp://host:port, syslog+tls://host:port)")
