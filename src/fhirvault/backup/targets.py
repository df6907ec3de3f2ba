"""Opening a backup target from a name, a ``file://`` URL or an ``s3://`` URL."""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import urlparse

from fhirvault.backup.file_target import FileTarget
from fhirvault.backup.settings import BackupSettings, TargetSettings, check_location
from fhirvault.config import SettingsError

if TYPE_CHECKING:
    from fhirvault.backup.target import BackupTarget


def _credential(target: str, what: str, env: str | None, file: Path | None) -> str | None:
    if env is not None:
        value = os.environ.get(env)
        if not value:
            raise SettingsError(f"backup target {target}: environment variable {env} ({what}) is not set")
        return value
    if file is not None:
        try:
            return file.read_text().strip()
        except OSError as exc:
            raise SettingsError(f"backup target {target}: cannot read {what} file {file}: {exc.strerror}") from None
    return None


def resolve(spec: str, backup: BackupSettings | None, *, location: str | None = None,
            allow_outside_eea: bool = False) -> TargetSettings:
    """The configured target called (or with the URL) ``spec``, or an ad-hoc one with ``location``."""
    configured = dict(backup.targets) if backup is not None else {}
    if not spec and backup is not None and backup.default_target:
        spec = backup.default_target
    if spec in configured:
        found = configured[spec]
    else:
        by_url = [t for t in configured.values() if t.url.rstrip("/") == spec.rstrip("/")]
        if by_url:
            found = by_url[0]
        elif not spec.startswith(("file:///", "s3://")):
            raise SettingsError(f"unknown backup target '{spec}': give a configured name, file:///path or s3://bucket/prefix")
        else:
            if location is None:
                raise SettingsError(f"backup target {spec} has no declared location: configure it under "
                                    "[backup.targets.NAME] with location = \"XX\", or pass --location XX")
            found = TargetSettings(name=spec, url=spec, location=check_location(spec, location, allow_outside_eea),
                                   allow_outside_eea=allow_outside_eea)
    if location is not None and location.upper() != found.location:
        raise SettingsError(f"backup target {found.name}: --location {location.upper()} contradicts "
                            f"the configured location {found.location}")
    return found


def open_target(spec: str, backup: BackupSettings | None, *, location: str | None = None,
                allow_outside_eea: bool = False) -> BackupTarget:
    """Open a target; refuses one without a declared location or outside the EEA (unless allowed)."""
    t = resolve(spec, backup, location=location, allow_outside_eea=allow_outside_eea)
    if t.url.startswith("file://"):
        return FileTarget.from_url(t.url, t.location)
    parsed = urlparse(t.url)
    if not parsed.netloc:
        raise SettingsError(f"backup target {t.name}: expected s3://bucket/prefix")
    key_id = _credential(t.name, "access key id", t.access_key_id_env, t.access_key_id_file)
    secret = _credential(t.name, "secret access key", t.secret_access_key_env, t.secret_access_key_file)
    # Imported only when an S3 target is used (boto3 is slow to import).
    from fhirvault.backup.s3 import S3Target

    try:
        # Two HTTP attempts per call: the engine's own Retry wraps each call with backoff.
        return S3Target(parsed.netloc, parsed.path.strip("/"), endpoint_url=t.endpoint, region=t.region,
                        access_key_id=key_id, secret_access_key=secret, location=t.location,
                        object_lock_days=t.object_lock_days or None, allow_outside_eea=t.allow_outside_eea,
                        max_attempts=2)
    except ValueError as exc:
        raise SettingsError(f"backup target {t.name}: {exc}") from None
