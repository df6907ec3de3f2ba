"""Incremental backups as change-feed deltas (backup/chain.py): small after spread updates, exact on restore."""

from __future__ import annotations

import shutil
import sqlite3
from pathlib import Path

import orjson
import pytest

from fhirvault.backup.engine import create_backup, restore_backup, verify_backup
from fhirvault.backup.manifest import manifest_key
from tests.backup.conftest import FHIR_JSON, file_target, root_of, seed, state
from tests.conftest import start_server


def _search_index(db: Path) -> set[tuple[bytes, int]]:
    con = sqlite3.connect(db)
    try:
        return {(bytes(t), int(rk)) for t, rk in con.execute("SELECT tag, rk FROM search_tags")}
    finally:
        con.close()


@pytest.mark.slow
@pytest.mark.server
def test_incremental_after_one_percent_updates_is_small_and_restores_exactly(tmp_path: Path) -> None:
    data = tmp_path / "data"
    srv = start_server(data, tmp_path / "server.log")
    ids = seed(srv, 1500, 3)  # 6,000 resources
    srv.stop()
    target, root = file_target(tmp_path / "target"), root_of(data)
    full = create_backup(data, target, root)

    # 1 % of the resources updated, spread over the whole store (every 100th in creation order).
    srv = start_server(data, tmp_path / "server.log")
    changed = ids[::25]  # 60 patients of 6,000 resources
    with srv.client() as c:
        for pid in changed:
            body = c.get(f"Patient/{pid}").json()
            body["name"] = [{"family": f"Renamed{pid[:8]}", "given": ["Claire"]}]
            assert c.put(f"Patient/{pid}", json=body, headers=FHIR_JSON).status_code == 200
        deleted = c.delete(f"Patient/{ids[1]}")
        assert deleted.status_code in (200, 204), deleted.text
    srv.stop()
    inc = create_backup(data, target, root)
    print(f"\nfull: {full.uploaded_bytes / 1e6:.2f} MB stored; incremental after 1 %: "
          f"{inc.uploaded_bytes / 1e6:.3f} MB ({inc.uploaded_bytes / full.uploaded_bytes:.1%})")
    assert inc.uploaded_bytes <= 0.10 * full.uploaded_bytes  # the page-level incremental uploaded 101 %
    assert not full.incremental and inc.incremental
    assert verify_backup(target, root, inc.backup_id).ok

    # The restored incremental is the source: same resources and content, same search index.
    restored = restore_backup(target, tmp_path / "restored", (data / "root.key").read_bytes())
    assert restored.backup_id == inc.backup_id
    assert state(tmp_path / "restored") == state(data)
    assert _search_index(tmp_path / "restored" / "fhirvault.sqlite3") == _search_index(data / "fhirvault.sqlite3")
    shutil.copy(data / "admin-client.json", tmp_path / "restored")  # never in a backup (a client secret)
    srv = start_server(tmp_path / "restored", tmp_path / "restored.log")
    with srv.client() as c:
        found = c.get("Patient", params={"family": f"Renamed{changed[3][:8]}"}).json()
        assert [e["resource"]["id"] for e in found.get("entry", [])] == [changed[3]]
        assert c.get(f"Patient/{ids[1]}").status_code == 410
    srv.stop()


def test_a_delta_manifest_is_refused_by_releases_before_it_and_needs_its_base(tmp_path: Path) -> None:
    from fhirvault.bootstrap import initialise
    from fhirvault.config import load_settings

    settings = load_settings({"data_dir": tmp_path / "data"}, environ={})
    initialise(settings)
    data, target, root = settings.data_dir, file_target(tmp_path / "target"), root_of(settings.data_dir)
    base = create_backup(data, target, root)
    con = sqlite3.connect(data / "fhirvault.sqlite3")
    con.execute("INSERT INTO meta (name, value) VALUES ('x', x'01')")
    con.commit()
    con.close()
    inc = create_backup(data, target, root)
    assert inc.incremental
    doc = orjson.loads((tmp_path / "target" / manifest_key(inc.backup_id)).read_bytes())
    full_doc = orjson.loads((tmp_path / "target" / manifest_key(base.backup_id)).read_bytes())
    assert doc["version"] == 2 and full_doc["version"] == 1  # releases before deltas refuse only the chained ones
    restore_backup(target, tmp_path / "r", (data / "root.key").read_bytes())
    con = sqlite3.connect(tmp_path / "r" / "fhirvault.sqlite3")
    assert con.execute("SELECT value FROM meta WHERE name='x'").fetchone() == (b"\x01",)
    con.close()


def test_a_database_restored_from_older_state_gets_a_full_backup(tmp_path: Path) -> None:
    from fhirvault.bootstrap import initialise
    from fhirvault.config import load_settings

    settings = load_settings({"data_dir": tmp_path / "data"}, environ={})
    initialise(settings)
    data, target, root = settings.data_dir, file_target(tmp_path / "target"), root_of(settings.data_dir)
    con = sqlite3.connect(data / "fhirvault.sqlite3")
    con.execute("INSERT INTO resource_versions (seq, tenant, type, id, version, last_updated, deleted, key_id, blob)"
                " VALUES (1000, 't', 'Basic', 'a', 1, 1, 0, 'k', x'00')")
    con.commit()
    create_backup(data, target, root)
    # Another history under the same keys: the row at the backup's watermark differs now.
    con.execute("UPDATE resource_versions SET blob = x'01' WHERE seq = 1000")
    con.commit()
    con.close()
    assert not create_backup(data, target, root).incremental


def test_a_long_chain_is_closed_by_a_full_backup(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from fhirvault.backup import chain
    from fhirvault.bootstrap import initialise
    from fhirvault.config import load_settings

    monkeypatch.setattr(chain, "MAX_CHAIN", 2)
    settings = load_settings({"data_dir": tmp_path / "data"}, environ={})
    initialise(settings)
    data, target, root = settings.data_dir, file_target(tmp_path / "target"), root_of(settings.data_dir)
    kinds = []
    for n in range(5):
        con = sqlite3.connect(data / "fhirvault.sqlite3")
        con.execute("INSERT INTO meta (name, value) VALUES (?, x'01')", (f"m{n}",))
        con.commit()
        con.close()
        kinds.append(create_backup(data, target, root).incremental)
    assert kinds == [False, True, True, False, True]
    restore_backup(target, tmp_path / "r", (data / "root.key").read_bytes())
    con = sqlite3.connect(tmp_path / "r" / "fhirvault.sqlite3")
    assert con.execute("SELECT count(*) FROM meta WHERE name LIKE 'm_'").fetchone() == (5,)
    con.close()
