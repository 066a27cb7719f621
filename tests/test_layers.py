"""DESIGN.md's layers as import contracts ([tool.importlinter] in pyproject.toml), run by `lint-imports`.

A wrong import (a frontend importing the repository, a lower layer importing a higher one, a
backend importing more than server.core, a module under server/ without a layer) fails this test.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

from tests.harness import ROOT

_LINT = Path(sys.executable).with_name("lint-imports")


def _lint(cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([str(_LINT), "--no-cache"], cwd=cwd, capture_output=True, text=True, timeout=120)


def _contracts() -> dict[str, dict]:
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]
    return {c["id"]: c for c in config["contracts"]}


def test_the_layer_contracts_are_kept():
    result = _lint(ROOT)
    assert result.returncode == 0, f"lint-imports found a wrong import:\n{result.stdout}\n{result.stderr}"
    assert "0 broken" in result.stdout


def test_backends_contract_names_every_server_module_but_core():
    # "backends import only server.core" is written as a list of what they must not import:
    # every other top-level module of server must be on it
    children = {p.stem if p.suffix == ".py" else p.name
                for p in (ROOT / "server").iterdir()
                if (p.suffix == ".py" and p.stem != "__init__") or (p / "__init__.py").exists()}
    forbidden = set(_contracts()["backends-core-only"]["forbidden_modules"])
    assert {f"server.{c}" for c in children - {"core"}} == forbidden


def test_a_wrong_import_breaks_the_contracts(tmp_path):
    # the same contracts over a copy of the code with two wrong imports added
    for name in ("server", "backends"):
        shutil.copytree(ROOT / name, tmp_path / name, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path)
    with (tmp_path / "server" / "frontends" / "http" / "routes.py").open("a") as f:
        f.write("\nimport server.repository.manager  # noqa\n")
    with (tmp_path / "backends" / "onnxruntime.py").open("a") as f:
        f.write("\nimport server.telemetry.metrics  # noqa\n")
    result = _lint(tmp_path)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "2 broken" in result.stdout, result.stdout
    assert "server.frontends.http.routes -> server.repository.manager" in result.stdout
    assert "backends.onnxruntime -> server.telemetry.metrics" in result.stdout
