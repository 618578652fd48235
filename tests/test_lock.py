"""The dependencies: what pyproject.toml declares is what the code imports, and the lock matches it."""

from __future__ import annotations

import ast
import re
import sys
import tomllib
from importlib import metadata

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from devtools.controlplane import REPO_ROOT

PYPROJECT = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())
RUNTIME = [Requirement(r) for r in PYPROJECT["project"]["dependencies"]]
DEV = [Requirement(r) for r in PYPROJECT["project"]["optional-dependencies"]["dev"]]
# Database drivers that SQLAlchemy loads by the URL's scheme, never imported by name.
DRIVERS = {"asyncpg", "aiosqlite"}
PIN = re.compile(r"^([A-Za-z0-9._-]+)==([^\s;]+)(.*)$")


def pins(lock: str) -> dict[str, tuple[str, str]]:
    """Each pinned package of a lock file: its version and its `# via` annotation."""
    found: dict[str, tuple[str, str]] = {}
    for line in (REPO_ROOT / lock).read_text().splitlines():
        if match := PIN.match(line):
            found[canonicalize_name(match[1])] = (match[2], match[3])
    return found


def imported(*folders: str) -> set[str]:
    """The distributions that the code in `folders` imports (top-level modules outside the stdlib)."""
    modules = set()
    for folder in folders:
        for path in (REPO_ROOT / folder).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.Import):
                    modules |= {alias.name.split(".")[0] for alias in node.names}
                elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                    modules.add(node.module.split(".")[0])
    ours = {"ephemera", "devtools", "tests", "bench"}
    third_party = {m for m in modules if m not in sys.stdlib_module_names and m not in ours}
    dists = metadata.packages_distributions()
    return {canonicalize_name(dists[m][0]) for m in third_party}


@pytest.mark.parametrize(("lock", "declared"), [("requirements.txt", RUNTIME), ("requirements-dev.txt", RUNTIME + DEV)])
def test_lock_pins_what_pyproject_declares(lock: str, declared: list[Requirement]) -> None:
    pinned = pins(lock)
    for requirement in declared:
        name = canonicalize_name(requirement.name)
        assert name in pinned, f"{requirement} is not in {lock}: run make lock"
        assert requirement.specifier.contains(pinned[name][0], prereleases=True), (
            f"{lock} pins {name}=={pinned[name][0]}, outside {requirement}: run make lock"
        )
    # What the lock says pyproject.toml asked for is exactly what it asks for now (a dropped
    # dependency leaves a stale entry).
    direct = {name for name, (_, via) in pinned.items() if "ephemera (pyproject.toml)" in via}
    assert direct == {canonicalize_name(r.name) for r in declared}, f"{lock} is out of date: run make lock"


def test_runtime_dependencies_are_what_the_package_imports() -> None:
    declared = {canonicalize_name(r.name) for r in RUNTIME}
    assert imported("ephemera") == declared - DRIVERS


def test_test_only_dependencies_are_dev_extras() -> None:
    declared = {canonicalize_name(r.name) for r in RUNTIME + DEV}
    missing = imported("devtools", "tests", "bench") - declared
    assert not missing, f"imported by the tests but not declared: {sorted(missing)}"


def test_image_and_virtualenv_install_from_the_lock() -> None:
    dockerfile = (REPO_ROOT / "deploy" / "Dockerfile").read_text()
    assert "pip install -r /src/requirements.txt" in dockerfile
    assert "pip install --no-deps /src" in dockerfile
    makefile = (REPO_ROOT / "Makefile").read_text()
    assert "pip install --quiet --disable-pip-version-check -r requirements-dev.txt" in makefile
    assert "--no-deps -e ." in makefile


def test_lock_names_no_index() -> None:
    for lock in ("requirements.txt", "requirements-dev.txt"):
        text = (REPO_ROOT / lock).read_text()
        assert not re.search(r"^--(index-url|extra-index-url|find-links)", text, re.MULTILINE), lock
        assert "://" not in text, lock
