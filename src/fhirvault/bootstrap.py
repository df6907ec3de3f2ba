"""Creating a new data directory: keys, database, default tenant and the admin client."""

from __future__ import annotations

import json
import os
import secrets
from pathlib import Path

from fhirvault.adapters.keyfile import KeyFileProvider, write_private_file
from fhirvault.config import CONFIG_FILE_NAME, Settings
from fhirvault.container import INSTANCE_META, SystemClock, issuer_for, open_store
from fhirvault.ports import Clock, WriteTx
from fhirvault.services.auth import AuthService
from fhirvault.services.keys import AUDIT_COMPARTMENT, KeyRing

ADMIN_CLIENT_FILE = "admin-client.json"
ADMIN_SCOPE = "system/*.cruds"
# Production mode (separation of duties): the bootstrap client gets operational scopes only; clinical
# clients are created afterwards, each with a named owner and purpose (fhirvault client create --owner).
PRODUCTION_ADMIN_SCOPE = "fhirvault/registers.read fhirvault/metrics.read"
LOCK_FILE = "serve.lock"  # held by a running server (fhirvault serve)
# Files that may be in a directory before it is initialised (the config file is read from DATA_DIR by default).
_ALLOWED_BEFORE_INIT = frozenset({CONFIG_FILE_NAME, LOCK_FILE})


class InitError(Exception):
    pass


def is_initialised(settings: Settings) -> bool:
    if settings.database_url is None:
        return settings.database_path.exists()
    store = open_store(settings)  # PostgreSQL: the database says (the data directory only holds keys)
    try:
        return store.get_meta(INSTANCE_META) is not None
    finally:
        store.close()


def data_dir_is_new(data_dir: Path) -> bool:
    """True for a directory that does not exist yet or holds nothing but a config file (and a server's lock)."""
    return not data_dir.exists() or all(p.name in _ALLOWED_BEFORE_INIT for p in data_dir.iterdir())


def initialise(settings: Settings, clock: Clock | None = None) -> Path:
    """Create everything a new deployment needs. Returns the admin credentials file."""
    clock = clock or SystemClock()
    data_dir = settings.data_dir
    if not data_dir_is_new(data_dir):
        raise InitError(f"refusing to initialise: {data_dir} exists and is not empty")
    data_dir.mkdir(parents=True, exist_ok=True)
    os.chmod(data_dir, 0o700)
    root = KeyFileProvider.create(settings.root_key_path)
    store = open_store(settings)
    try:
        def setup(tx: WriteTx) -> None:
            if tx.get_meta(INSTANCE_META) is not None:  # a shared database (PostgreSQL) initialised before
                raise InitError("refusing to initialise: the database already holds an instance")
            tx.set_meta(INSTANCE_META, secrets.token_hex(8).encode())
            AuthService.create_signing_key(tx, root)

        store.write_sync("init", setup)
        keys = KeyRing(store, root, settings.tenant, clock)
        keys.initialise()
        keys.for_compartment_sync(AUDIT_COMPARTMENT)
        auth = AuthService(store, root, clock, issuer=issuer_for(store), tenant=settings.tenant,
                           token_ttl_seconds=settings.token_ttl_seconds)
        admin = auth.register_client("admin", PRODUCTION_ADMIN_SCOPE if settings.mode == "production" else ADMIN_SCOPE)
    finally:
        store.close()
    path = data_dir / ADMIN_CLIENT_FILE
    write_private_file(path, json.dumps({"client_id": admin.client_id, "client_secret": admin.client_secret},
                                    indent=2).encode() + b"\n")
    return path
