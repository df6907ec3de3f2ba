from __future__ import annotations

from pathlib import Path

import pytest

from fhirvault.adapters.keyfile import KeyFileError, KeyFileProvider
from fhirvault.adapters.memory_keys import RootKeyError
from fhirvault.services.crypto import DecryptionError


def test_key_file_permissions_and_overwrite_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "root.key"
    KeyFileProvider.create(path)
    assert path.stat().st_mode & 0o777 == 0o600
    path.chmod(0o644)
    with pytest.raises(KeyFileError, match="chmod 600"):
        KeyFileProvider.load(path)
    with pytest.raises(KeyFileError, match="already exists"):
        KeyFileProvider.create(path)


def test_rotation_is_persisted_in_crash_safe_order(tmp_path: Path) -> None:
    path = tmp_path / "root.key"
    provider = KeyFileProvider.create(path)
    old = provider.active_key_id
    kid, blob = provider.wrap(b"tenant key", b"ad")
    new = provider.begin_rotation()
    # after the first step both keys are on disk: a crash here loses nothing
    reloaded = KeyFileProvider.load(path)
    assert set(reloaded.key_ids) == {old, new} and reloaded.active_key_id == new
    assert reloaded.unwrap(kid, blob, b"ad") == b"tenant key"
    provider.retire(old)
    with pytest.raises(DecryptionError):
        KeyFileProvider.load(path).unwrap(kid, blob, b"ad")
    with pytest.raises(RootKeyError, match="active"):
        provider.retire(new)


@pytest.mark.parametrize("content", [b"", b"{}", b'{"format":"fhirvault-root-key","keys":{"a":"AA=="},"active":"a"}',
                                     b"not json"])
def test_malformed_key_files(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "root.key"
    path.write_bytes(content)
    path.chmod(0o600)
    with pytest.raises(KeyFileError, match="malformed"):
        KeyFileProvider.load(path)
