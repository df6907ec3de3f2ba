"""Online, consistent copies of a live data directory's databases (+ config), for the backup engine.

The database copies come from the engine's ``SnapshotSource`` (chosen in
``fhirvault.container``; for SQLite, the backup API of both files, see
adapters/sqlite_backup.py). This module adds what is engine-neutral: the
scratch directory inside the data directory, the plain files worth restoring,
and the deployment secrets the backup engine needs.

The secrets (backup key, signing seed) are service secrets in the clinical
database's ``meta`` table. They are read (and created on first use) through the
source's minimal meta store, not a full store: opening one runs crash recovery
of the search index, which must stay the live server's business.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import cast

from fhirvault.backup.ports import (
    AUDIT_DB,
    CLINICAL_DB,
    SnapshotError,
    SnapshotFile,
    SnapshotSource,
)
from fhirvault.container import INSTANCE_META, snapshot_source
from fhirvault.ports import ResourceStore, RootKeyProvider
from fhirvault.services.secrets import ServiceSecrets

__all__ = ["AUDIT_DB", "CLINICAL_DB", "EXTRA_FILES", "DeploymentSecrets", "Snapshot", "SnapshotError", "SnapshotFile",
           "deployment_secrets", "snapshot"]

# Plain files worth restoring besides the databases. Never root.key (the backup would
# then open itself) nor admin-client.json (a client secret).
EXTRA_FILES = ("fhirvault.toml",)
NEVER = frozenset({"root.key", "admin-client.json"})
_TMP_PREFIX = ".backup-tmp-"


@dataclass(frozen=True)
class DeploymentSecrets:
    instance_id: str
    backup_key: bytes
    signing_seed: bytes


def deployment_secrets(data_dir: Path, root: RootKeyProvider, source: SnapshotSource | None = None) -> DeploymentSecrets:
    with (source or snapshot_source(data_dir)).meta() as meta:
        instance = meta.get_meta(INSTANCE_META)
        if instance is None:
            raise SnapshotError(f"{data_dir} is not an initialised data directory (no instance id)")
        secrets = ServiceSecrets(cast(ResourceStore, meta), root)
        return DeploymentSecrets(instance.decode(), secrets.get("backup"), secrets.get("backup-signing"))


@dataclass(frozen=True)
class Snapshot:
    files: list[SnapshotFile]
    snapshot_ms: int  # the clinical copy holds every write committed before this instant
    watermarks: dict[str, dict[str, int]]


def _clean_stale(data_dir: Path) -> None:
    """Remove copies left by a backup process that died (its pid is in the name)."""
    for old in data_dir.glob(_TMP_PREFIX + "*"):
        try:
            pid = int(old.name[len(_TMP_PREFIX):].split("-")[0])
            os.kill(pid, 0)
        except ProcessLookupError:
            shutil.rmtree(old, ignore_errors=True)
        except (ValueError, PermissionError):
            continue


@contextlib.contextmanager
def snapshot(data_dir: Path, source: SnapshotSource | None = None) -> Iterator[Snapshot]:
    """Consistent copies of the data directory's databases (+ config), removed afterwards."""
    _clean_stale(data_dir)
    tmp = data_dir / f"{_TMP_PREFIX}{os.getpid()}-{os.urandom(4).hex()}"
    tmp.mkdir(mode=0o700)
    try:
        dump = (source or snapshot_source(data_dir)).dump(tmp)
        files = list(dump.files)
        for name in EXTRA_FILES:
            path = data_dir / name
            if path.is_file() and name not in NEVER:
                shutil.copyfile(path, tmp / name)
                files.append(SnapshotFile(name, tmp / name, "file"))
        yield Snapshot(files, dump.snapshot_ms, dump.watermarks)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
