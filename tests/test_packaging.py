"""The distribution ships every package of the source tree: pyproject lists them one by one."""

from __future__ import annotations

import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_every_source_package_is_in_the_distribution() -> None:
    setuptools = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    dirs = setuptools["package-dir"]
    assert sorted(setuptools["packages"]) == sorted(dirs), "packages and package-dir name the same packages"
    listed = {(ROOT / folder).resolve() for folder in dirs.values()}
    found = {init.parent.resolve() for folder in dirs.values() for init in (ROOT / folder).rglob("__init__.py")}
    assert found <= listed, f"packages missing from pyproject.toml: {sorted(str(p) for p in found - listed)}"
