"""Import rules between layers, checked on the source (AST), not by importing."""

from __future__ import annotations

import ast
from pathlib import Path
from typing import Iterator, List, Tuple

import pytest

import nsq_sync

PACKAGE_DIR = Path(nsq_sync.__file__).resolve().parent
PROTOCOL_DIR = PACKAGE_DIR / "protocol"

FORBIDDEN_IN_PROTOCOL = {"socket", "ssl", "select", "selectors", "threading", "time", "gevent", "urllib", "http"}


def module_name(path: Path, package_dir: Path = PACKAGE_DIR) -> str:
    rel = path.relative_to(package_dir.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imports(path: Path, package_dir: Path = PACKAGE_DIR) -> Iterator[Tuple[str, int]]:
    """Every module *path* imports (absolute dotted names, relative ones resolved), with line numbers.

    ``from pkg import name`` yields both ``pkg`` and ``pkg.name`` (name may be a submodule).
    """
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    package = module_name(path, package_dir)
    if path.name != "__init__.py":
        package = package.rpartition(".")[0]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, node.lineno
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base_parts = package.split(".")
                base_parts = base_parts[: len(base_parts) - (node.level - 1)]
                base = ".".join(base_parts + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            yield base, node.lineno
            for alias in node.names:
                if alias.name != "*":
                    yield f"{base}.{alias.name}", node.lineno


def top(name: str) -> str:
    return name.split(".")[0]


def python_files(directory: Path) -> List[Path]:
    return sorted(p for p in directory.rglob("*.py") if "__pycache__" not in p.parts)


def test_resolver_sanity():
    found = dict(imports(PROTOCOL_DIR / "commands.py"))
    assert "nsq_sync.errors" in found
    assert "nsq_sync.protocol.constants" in found
    assert "json" in found and "struct" in found


PROTOCOL_FILES = python_files(PROTOCOL_DIR)


def test_protocol_files_found():
    names = {p.name for p in PROTOCOL_FILES}
    assert {"__init__.py", "commands.py", "constants.py", "frames.py", "identify.py", "names.py"} <= names


@pytest.mark.parametrize("path", PROTOCOL_FILES, ids=lambda p: p.name)
def test_protocol_is_sans_io(path):
    bad = [(name, line) for name, line in imports(path) if top(name) in FORBIDDEN_IN_PROTOCOL]
    assert bad == [], f"{path.name} imports I/O or concurrency modules: {bad}"


@pytest.mark.parametrize("path", PROTOCOL_FILES, ids=lambda p: p.name)
def test_protocol_imports_only_protocol_and_errors(path):
    bad = []
    for name, line in imports(path):
        if top(name) != "nsq_sync":
            continue
        if name == "nsq_sync":
            bad.append((name, line))
        elif not (name.startswith("nsq_sync.protocol") or name == "nsq_sync.errors" or name.startswith("nsq_sync.errors.")):
            bad.append((name, line))
    assert bad == [], f"{path.name} imports nsq_sync outside protocol/errors: {bad}"


GEVENT_BACKEND = PACKAGE_DIR / "backends" / "gevent.py"
def _gevent_params():
    for path in python_files(PACKAGE_DIR):
        if path == GEVENT_BACKEND:
            continue
        rel = str(path.relative_to(PACKAGE_DIR))
        yield pytest.param(path, id=rel)


@pytest.mark.parametrize("path", list(_gevent_params()))
def test_only_the_gevent_backend_imports_gevent(path):
    offenders = [(line, name) for name, line in imports(path) if top(name) == "gevent"]
    assert offenders == []


def test_gevent_backend_imports_gevent():
    assert "gevent" in dict(imports(GEVENT_BACKEND))


def _imports_module(path: Path, forbidden: str) -> List[Tuple[str, int]]:
    return [(n, l) for n, l in imports(path) if n == forbidden or n.startswith(forbidden + ".")]


def test_message_does_not_import_conn():
    assert _imports_module(PACKAGE_DIR / "message.py", "nsq_sync.conn") == []


def test_errors_imports_nothing_from_nsq_sync():
    assert [n for n, _ in imports(PACKAGE_DIR / "errors.py") if top(n) == "nsq_sync"] == []


HTTPAPI = PACKAGE_DIR / "httpapi"


@pytest.mark.parametrize("forbidden", ["nsq_sync.conn", "nsq_sync.reader", "nsq_sync.writer"])
def test_httpapi_does_not_import_connection_layers(forbidden):
    files = python_files(HTTPAPI) if HTTPAPI.is_dir() else [HTTPAPI.with_suffix(".py")]
    assert files
    offenders = [(p.name, hit) for p in files for hit in _imports_module(p, forbidden)]
    assert offenders == []


def test_detector_catches_violations(tmp_path):
    """The checker itself: a fake package whose protocol module has bad imports is caught."""
    package_dir = tmp_path / "nsq_sync"
    protocol = package_dir / "protocol"
    protocol.mkdir(parents=True)
    fake = protocol / "bad.py"
    fake.write_text(
        "import socket\n"
        "from ..conn import AsyncConn\n"
        "from .. import reader\n"
        "def f():\n"
        "    import gevent.monkey\n"
        "from .frames import FrameDecoder\n"
    )
    names = {n for n, _ in imports(fake, package_dir)}
    assert {"socket", "nsq_sync.conn", "nsq_sync.conn.AsyncConn", "nsq_sync.reader", "gevent.monkey", "nsq_sync.protocol.frames"} <= names


def test_import_nsq_sync_leaves_heavy_modules_unimported():
    """``import nsq_sync`` (a Writer's whole footprint) must not pull in modules only some calls
    need: ``inspect`` (with ast and dis, 1.4 MB of RSS) only when a callback's signature is first
    checked, ``ssl`` only for TLS, ``nsq_sync.httpapi`` and ``nsq_sync.reader`` only when used.
    The RSS target (import + one connection, 20 MB) is measured in benchmarks/."""
    import subprocess
    import sys

    probe = ("import sys; import nsq_sync; "
             "print(' '.join(m for m in ('inspect', 'ast', 'ssl', 'nsq_sync.httpapi', 'nsq_sync.reader') if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == []
