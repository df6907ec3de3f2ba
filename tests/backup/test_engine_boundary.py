"""The database engine is chosen in one place: only adapters talk to SQLite, only container.py picks adapters."""

from __future__ import annotations

import ast
from pathlib import Path

import fhirvault

SRC = Path(fhirvault.__file__).parent


def _imports(path: Path) -> set[str]:
    """Every module a file imports (``import a.b`` and ``from a.b import c`` give ``a.b``; ``c`` too if a module)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            found.add(node.module)
            found |= {f"{node.module}.{alias.name}" for alias in node.names}
    return found


def _modules() -> dict[str, set[str]]:
    return {p.relative_to(SRC).as_posix(): _imports(p) for p in sorted(SRC.rglob("*.py"))}


def test_the_scan_sees_the_adapters_imports() -> None:
    # guards the guard: if the scan found nothing it would pass vacuously
    modules = _modules()
    assert "sqlite3" in modules["adapters/sqlite_store.py"]
    assert "sqlite3" in modules["adapters/sqlite_backup.py"]
    assert len(modules) > 50


def test_no_module_outside_adapters_imports_sqlite3() -> None:
    offenders = sorted(name for name, imports in _modules().items()
                       if not name.startswith("adapters/") and any(i == "sqlite3" or i.startswith("sqlite3.")
                                                                   for i in imports))
    assert offenders == []


def test_only_the_container_chooses_engine_adapters() -> None:
    engine_adapters = ("fhirvault.adapters.sqlite_", "fhirvault.adapters.postgres")
    offenders = sorted(name for name, imports in _modules().items()
                       if not name.startswith("adapters/") and name != "container.py"
                       and any(i.startswith(engine_adapters) for i in imports))
    assert offenders == []
