"""Shared test configuration for nsq_sync.

NSQ_SYNC_BACKEND=gevent runs the suite with gevent monkey-patching (done
first thing below, before anything else in this file imports socket/threading).
``bash .ci/dev test`` runs the functional and integration tests a second
time that way.

Markers are added from the directory: tests/unit -> ``unit``,
tests/functional -> ``functional``, tests/integration -> ``integration``.
Integration tests never skip: a skip is turned into a failure, and a missing
nsqd/nsqlookupd fails with instructions (see nsq_sync.testing.find_binary).
"""

from __future__ import annotations

import os

if os.environ.get("NSQ_SYNC_BACKEND") == "gevent":
    from gevent import monkey

    monkey.patch_all()

import sys  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Callable, Iterator, List  # noqa: E402

import pytest  # noqa: E402

# tests/support (fake servers, proxies, shared helpers) is importable from every suite.
sys.path.insert(0, str(Path(__file__).resolve().parent / "support"))

# The plugin's fixtures (nsqd, nsqlookupd, nsq_cluster). Importing them makes
# them available whether or not the installed entry point already loaded the
# plugin (conftest fixtures simply take precedence), without pytest_plugins.
from nsq_sync.pytest_plugin import nsq_cluster, nsqd, nsqlookupd, started  # noqa: E402,F401
from nsq_sync.testing import AuthServer, NsqdProcess, TLSFiles, make_tls_files, wait_until  # noqa: E402

TESTS_DIR = Path(__file__).resolve().parent

MARKERS = {
    "unit": "fast tests without I/O to real brokers (tests/unit)",
    "functional": "tests of components against fakes/sockets in-process (tests/functional)",
    "integration": "tests against real nsqd/nsqlookupd v1.3.0 binaries (tests/integration); never skipped",
    "slow": "tests that take several seconds",
}

DIRECTORY_MARKERS = ("unit", "functional", "integration")


def pytest_configure(config: pytest.Config) -> None:
    for name, description in MARKERS.items():
        config.addinivalue_line("markers", f"{name}: {description}")


def pytest_collection_modifyitems(config: pytest.Config, items: List[pytest.Item]) -> None:
    for item in items:
        try:
            relative = Path(str(item.path)).resolve().relative_to(TESTS_DIR)
        except ValueError:
            continue
        if len(relative.parts) > 1 and relative.parts[0] in DIRECTORY_MARKERS:
            item.add_marker(getattr(pytest.mark, relative.parts[0]))


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    """Integration tests must never skip silently: report a skip as a failure."""
    outcome = yield
    report = outcome.get_result()
    if (
        report.skipped
        and not hasattr(report, "wasxfail")
        and item.get_closest_marker("integration") is not None
    ):
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        report.outcome = "failed"
        report.longrepr = f"integration tests must not be skipped; skip reason was: {reason}"


@pytest.hookimpl(hookwrapper=True)
def pytest_collectreport(report: pytest.CollectReport) -> Iterator[None]:
    """A skip while a file under tests/integration is collected (a module-level importorskip
    or skip) never reaches pytest_runtest_makereport: fail it here (before any other plugin,
    the session's failure count and the terminal's report, sees it)."""
    if report.skipped:
        try:
            relative = Path(str(report.fspath)).resolve().relative_to(TESTS_DIR)
        except ValueError:
            relative = None
        if relative is not None and relative.parts and relative.parts[0] == "integration":
            reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
            report.outcome = "failed"
            report.longrepr = f"integration tests must not be skipped; {relative} was skipped at collection: {reason}"
    yield


@pytest.fixture(scope="session")
def backend() -> str:
    """The concurrency backend under test: ``"thread"`` (default) or ``"gevent"``."""
    return os.environ.get("NSQ_SYNC_BACKEND", "thread")


@pytest.fixture(scope="session")
def tls_files(tmp_path_factory: pytest.TempPathFactory) -> TLSFiles:
    """A CA plus server (127.0.0.1/localhost) and client certificates, made once per session."""
    return make_tls_files(tmp_path_factory.mktemp("tls"))


@pytest.fixture
def tls_nsqd(tls_files: TLSFiles) -> Iterator[NsqdProcess]:
    """nsqd with TLS enabled (server cert/key, CA for client certs) and an HTTPS port."""
    proc = NsqdProcess(
        tls_cert=tls_files.server_cert,
        tls_key=tls_files.server_key,
        tls_root_ca=tls_files.ca_cert,
    )
    with started(proc):
        yield proc


@pytest.fixture
def auth_server() -> Iterator[AuthServer]:
    """A running AuthServer with no secrets; call ``set_secret()`` in the test."""
    with AuthServer() as server:
        yield server


@pytest.fixture
def auth_nsqd(auth_server: AuthServer) -> Iterator[NsqdProcess]:
    """nsqd that requires AUTH, checked against ``auth_server``."""
    proc = NsqdProcess(extra_args=[f"--auth-http-address={auth_server.address}"])
    with started(proc):
        yield proc


@pytest.fixture
def quick_auto_touch(monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[[], None]]:
    """Message.auto_touch()'s shared task ends 0.2 s after its last timer (10 s in use).
    Yields a wait for that end, after which nothing more is touched; the teardown waits
    for it too, so a test's check that no nsq_sync task is left holds."""
    from nsq_sync import message as message_module

    monkeypatch.setattr(message_module, "TOUCHER_IDLE_SECONDS", 0.2)
    monkeypatch.setattr(message_module, "_touchers", {})

    def wait_idle() -> None:
        wait_until(lambda: all(s.task is None for s in message_module._touchers.values()), 10.0, message="the auto_touch task ended")

    yield wait_idle
    wait_idle()
