"""A plain install imports: the wheel, installed without extras into a fresh venv, has every module it needs.

The test extra brings packages (httpx, aiohttp…) that a user's ``pip install .`` does not: a runtime
import of one of them passes every other test and crashes the user's server. Here the package is
built as a wheel, installed with its declared dependencies only, and every module of ``fhirvault``
is imported in that venv.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
IMPORT_ALL = """
import importlib, json, pkgutil, fhirvault
failed = []
def record(name):
    failed.append(name + ": cannot walk the package")
for info in pkgutil.walk_packages(fhirvault.__path__, "fhirvault.", onerror=record):
    try:
        importlib.import_module(info.name)
    except BaseException as exc:
        failed.append(f"{info.name}: {type(exc).__name__}: {exc}")
print(json.dumps({"file": fhirvault.__file__, "failed": failed}))
"""


def _run(*cmd: str | Path, cwd: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    r = subprocess.run([str(c) for c in cmd], cwd=cwd, env=env, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, f"{' '.join(map(str, cmd))}:\n{r.stdout[-2000:]}\n{r.stderr[-3000:]}"


@pytest.fixture(scope="session")
def plain_install(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The python of a fresh venv holding the fhirvault wheel and its declared dependencies, no extras."""
    base = tmp_path_factory.mktemp("plain-install")
    _run(sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", base / "dist", ROOT, cwd=base)
    (wheel,) = (base / "dist").glob("fhirvault-*.whl")
    _run(sys.executable, "-m", "venv", "--without-pip", base / "venv", cwd=base)
    python = base / "venv" / "bin" / "python"
    constraints = ["-c", ROOT / "constraints.txt"] if (ROOT / "constraints.txt").exists() else []
    _run(sys.executable, "-m", "pip", "--python", python, "install", "-q", *constraints, wheel, cwd=base)
    return python


def test_every_module_imports_from_a_plain_install(plain_install: Path, tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    r = subprocess.run([str(plain_install), "-c", IMPORT_ALL], cwd=tmp_path, env=env, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    result = json.loads(r.stdout.strip().splitlines()[-1])
    assert Path(result["file"]).is_relative_to(plain_install.parents[1])  # the installed wheel, not src/
    assert result["failed"] == []
