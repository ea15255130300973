"""Bad input to the Reader and the ``nsq-sync`` command: refused with a typed error naming the
parameter (or exit 2 with a usage message) before anything is sent or started, and nothing lost.

* a coroutine, async generator or generator function, or a Tornado coroutine
  (``@tornado.gen.coroutine``), as the message handler (or an object whose
  ``__call__`` is one, or a subclass hook that is one): its body would never run and every message
  would be FINed unprocessed. Refused by Reader(), set_message_handler() (the old handler stays and
  keeps processing) and ``nsq-sync worker``;
* the default ``concurrency`` (max_in_flight) is capped at MAX_CONCURRENCY instead of failing with
  an error about a parameter the caller never gave;
* the CLI's numeric options are range-checked by argparse (no OverflowError/MemoryError
  tracebacks, no NaN or negative timeouts reaching the brokers);
* ``nsq-sync pub`` publishes the exact bytes given, also bytes that are not valid UTF-8.

The CLI runs in-process (``cli.main``); what ``pub`` sends is read on the wire of the scripted
fake nsqd (tests/functional/fake_nsqd.py). tests/integration/test_cli_bad_input.py runs the same
cases as real subprocesses against a real nsqd.
"""

from __future__ import annotations

import functools
import importlib
import io
import sys
import uuid
from pathlib import Path
from typing import Any, Callable, Iterator, List, Tuple
from unittest import mock

import pytest

import nsq_sync
from nsq_sync import Reader, cli
from nsq_sync import reader as reader_module
from nsq_sync.errors import ConfigError

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "functional"))
from fake_nsqd import FakeNsqd  # noqa: E402

pytestmark = pytest.mark.timeout(60)

ADDRESS = "127.0.0.1:4150"  # never connected to: nothing here starts a Reader on it


# ============================================================ handlers that would never run
async def async_handler(message: Any) -> None:
    raise AssertionError("never awaited")


async def async_gen_handler(message: Any) -> Any:
    yield message


def gen_handler(message: Any) -> Any:
    yield message


class AsyncCallable:
    async def __call__(self, message: Any) -> None:
        pass


class GenCallable:
    def __call__(self, message: Any) -> Any:
        yield message


class AsyncMethods:
    async def handle(self, message: Any) -> None:
        pass

    @staticmethod
    async def static(message: Any) -> None:
        pass


def tornado_coroutine(fn: Any) -> Any:
    """What ``@tornado.gen.coroutine`` makes of *fn* (tornado 6's wrapper, without tornado): a
    plain function marked ``__tornado_coroutine__`` whose first step creates a Future, which in
    a worker thread raises "There is no current event loop": the body never runs."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("There is no current event loop in thread 'worker'")

    wrapper.__tornado_coroutine__ = True  # type: ignore[attr-defined]
    return wrapper


@tornado_coroutine
def tornado_handler(message: Any) -> bool:
    raise AssertionError("never run")


class TornadoMethods:
    @tornado_coroutine
    def handle(self, message: Any) -> bool:
        return True

    @tornado_coroutine
    def __call__(self, message: Any) -> bool:
        return True


NEVER_RUN: List[Tuple[str, Callable[[], Any], str]] = [
    ("tornado coroutine", lambda: tornado_handler, "Tornado coroutine (@tornado.gen.coroutine)"),
    ("partial of tornado coroutine", lambda: functools.partial(tornado_handler), "Tornado coroutine"),
    ("bound tornado coroutine method", lambda: TornadoMethods().handle, "Tornado coroutine"),
    ("object with tornado coroutine __call__", lambda: TornadoMethods(), "Tornado coroutine"),

    ("async def", lambda: async_handler, "coroutine function"),
    ("partial of async def", lambda: functools.partial(async_handler), "coroutine function"),
    ("async generator", lambda: async_gen_handler, "async generator function"),
    ("generator", lambda: gen_handler, "generator function"),
    ("generator partial", lambda: functools.partial(gen_handler), "generator function"),
    ("object with async __call__", lambda: AsyncCallable(), "coroutine function"),
    ("object with generator __call__", lambda: GenCallable(), "generator function"),
    ("bound async method", lambda: AsyncMethods().handle, "coroutine function"),
    ("async staticmethod", lambda: AsyncMethods.static, "coroutine function"),
    ("AsyncMock", lambda: mock.AsyncMock(), "coroutine function"),
]
NEVER_RUN_IDS = [case[0] for case in NEVER_RUN]


class PlainCallable:
    def __call__(self, message: Any) -> bool:
        return True


def plain(message: Any) -> None:
    pass


#: callables that run when called with the message: all still accepted
RUNS: List[Tuple[str, Any]] = [
    ("function", plain),
    ("lambda", lambda m: True),
    ("partial", functools.partial(plain)),
    ("object with __call__", PlainCallable()),
    ("builtin", print),
    ("Mock", mock.Mock()),
    ("*args", lambda *args: True),
    ("extra argument with a default", lambda m, retries=3: True),
    ("bound method", PlainCallable().__call__),
]

#: callables that cannot take the message: every call would raise TypeError, every message be
#: requeued and come back until given up
WRONG_SIGNATURE: List[Tuple[str, Any]] = [
    ("no argument", lambda: True),
    ("two arguments", lambda conn, message: True),
    ("keyword-only", lambda *, message: True),
    ("class whose instances take no argument", AsyncCallable),  # (AsyncCallable(message): TypeError)
]


def check_refusal(exc: BaseException, kind: str) -> None:
    assert isinstance(exc, TypeError), repr(exc)
    text = str(exc)
    assert text.startswith("message_handler must be a plain function"), text
    assert kind in text and "threads/greenlets" in text, text


@pytest.mark.parametrize("make, kind", [c[1:] for c in NEVER_RUN], ids=NEVER_RUN_IDS)
def test_reader_refuses_a_handler_that_would_never_run(make: Callable[[], Any], kind: str) -> None:
    with pytest.raises(TypeError) as info:
        Reader("t", "c", make(), nsqd_tcp_addresses=ADDRESS).close()
    check_refusal(info.value, kind)
    with pytest.raises(TypeError) as info:
        Reader("t", "c", message_handler=make(), nsqd_tcp_addresses=ADDRESS).close()
    check_refusal(info.value, kind)


@pytest.mark.parametrize("make, kind", [c[1:] for c in NEVER_RUN], ids=NEVER_RUN_IDS)
def test_set_message_handler_refuses_it_and_keeps_the_old_one(make: Callable[[], Any], kind: str) -> None:
    reader = Reader("t", "c", plain, nsqd_tcp_addresses=ADDRESS)
    try:
        with pytest.raises(TypeError) as info:
            reader.set_message_handler(make())
        check_refusal(info.value, kind)
        assert reader.message_handler is plain
    finally:
        reader.close()


@pytest.mark.parametrize("handler", [c[1] for c in RUNS], ids=[c[0] for c in RUNS])
def test_handlers_that_run_are_still_accepted(handler: Any) -> None:
    reader = Reader("t", "c", handler, nsqd_tcp_addresses=ADDRESS)
    try:
        assert reader.message_handler is handler
        reader.set_message_handler(plain)
        reader.set_message_handler(handler)
        assert reader.message_handler is handler
    finally:
        reader.close()


@pytest.mark.parametrize("handler", [c[1] for c in WRONG_SIGNATURE], ids=[c[0] for c in WRONG_SIGNATURE])
def test_a_handler_that_cannot_take_the_message_is_refused(handler: Any) -> None:
    with pytest.raises(TypeError, match="message_handler must take one positional argument, the message"):
        Reader("t", "c", handler, nsqd_tcp_addresses=ADDRESS).close()
    reader = Reader("t", "c", plain, nsqd_tcp_addresses=ADDRESS)
    try:
        with pytest.raises(TypeError, match="must take one positional argument"):
            reader.set_message_handler(handler)
        assert reader.message_handler is plain
    finally:
        reader.close()


@pytest.mark.parametrize("hook", ["process_message", "preprocess_message", "validate_message", "giving_up", "heartbeat"])
@pytest.mark.parametrize("flavour", ["async", "generator", "tornado"])
def test_reader_subclass_with_a_hook_that_would_never_run_is_refused(hook: str, flavour: str) -> None:
    async def async_hook(self: Any, arg: Any) -> Any:
        return True

    def gen_hook(self: Any, arg: Any) -> Any:
        yield True

    @tornado_coroutine
    def tornado_hook(self: Any, arg: Any) -> Any:
        return True

    sub = type("MyReader", (Reader,), {hook: {"async": async_hook, "generator": gen_hook, "tornado": tornado_hook}[flavour]})
    with pytest.raises(TypeError) as info:
        sub("t", "c", plain, nsqd_tcp_addresses=ADDRESS).close()
    assert f"MyReader.{hook} must be a plain method" in str(info.value)
    # a plain override is fine
    ok = type("MyReader", (Reader,), {hook: lambda self, arg: True})("t", "c", plain, nsqd_tcp_addresses=ADDRESS)
    ok.close()


def test_refused_handler_loses_nothing_on_a_running_reader() -> None:
    """set_message_handler(async fn) on a consuming Reader: refused; the next message goes to the
    old handler and is FINed after it ran (before the fix it was FINed with its coroutine never run)."""
    seen: List[bytes] = []
    with FakeNsqd() as server:
        reader = Reader("t", "c", lambda m: seen.append(m.body), nsqd_tcp_addresses=f"{server.host}:{server.port}", backend="thread")
        try:
            reader.start()
            server.wait_for_command("RDY 1")
            with pytest.raises(TypeError, match="message_handler"):
                reader.set_message_handler(async_handler)
            message = server.enqueue(b"kept")
            server.wait_for_command("FIN")
            assert seen == [b"kept"]
            assert server.finished == [message.id]
        finally:
            reader.close(5)


# ============================================================ default concurrency
@pytest.mark.parametrize(
    "max_in_flight, expected",
    [(0, 1), (1, 1), (200, 200), (100_000, 100_000), (100_001, 100_000), (200_000, 100_000), (2**31 - 1, 100_000)],
)
def test_default_concurrency_is_max_in_flight_capped(max_in_flight: int, expected: int) -> None:
    """Before the fix, max_in_flight above 100,000 without concurrency raised ConfigError naming
    concurrency, which the caller never gave."""
    reader = Reader("t", "c", plain, nsqd_tcp_addresses=ADDRESS, max_in_flight=max_in_flight)
    try:
        assert reader.max_in_flight == max_in_flight
        assert reader.concurrency == expected
    finally:
        reader.close()


def test_explicit_concurrency_out_of_range_still_names_concurrency() -> None:
    with pytest.raises(ConfigError) as info:
        Reader("t", "c", plain, nsqd_tcp_addresses=ADDRESS, max_in_flight=200_000, concurrency=100_001)
    assert info.value.param == "concurrency"


def test_cli_ranges_match_the_reader() -> None:
    assert reader_module.MAX_CONCURRENCY == 100_000
    assert cli.MAX_CONCURRENCY == reader_module.MAX_CONCURRENCY
    assert cli.MAX_IN_FLIGHT == 2**31 - 1
    assert cli.MAX_TRIES == 65535


# ============================================================ the CLI, in-process
@pytest.fixture
def no_brokers(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fail the test if a command gets as far as starting a cluster or a client; keep main()'s
    logging.basicConfig off the test process's root logger."""

    def refuse(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("started something despite a bad argument")

    monkeypatch.setattr(cli, "_start_cluster", refuse)
    monkeypatch.setattr(nsq_sync, "Reader", refuse)
    monkeypatch.setattr(nsq_sync, "Writer", refuse)
    monkeypatch.setattr(cli.logging, "basicConfig", lambda **kwargs: None)


def run_main(argv: List[str], capsys: pytest.CaptureFixture) -> Tuple[int, str]:
    try:
        code = cli.main(argv)
    except SystemExit as exc:  # argparse
        code = exc.code  # type: ignore[assignment]
    out, err = capsys.readouterr()
    assert out == "", out
    return code, err


WORKER = ["worker", "m:f", "--topic", "t", "--channel", "c", "--nsqd-tcp-address", ADDRESS]
TAIL = ["tail", "--topic", "t"]
PUB = ["pub", "--topic", "t", "x"]
BAD_NUMBERS: List[Tuple[List[str], str]] = [
    # demo: the audit's cases, then every other numeric option
    (["demo", "-n", "10000000000000000000"], "argument -n/--count: '10000000000000000000' must be at most 100000000"),
    (["demo", "-n", "9" * 5000], "is not a whole number"),  # more digits than int() converts
    (["demo", "-n", "0"], "must be at least 1"),
    (["demo", "-n", "1.5"], "'1.5' is not a whole number"),
    (["demo", "--body-size", "10000000000000"], "argument --body-size: '10000000000000' must be at most"),
    (["demo", "--body-size", "0"], "must be at least 1"),
    (["demo", "--timeout", "nan"], "argument --timeout: 'nan' must be a number of seconds"),
    (["demo", "--timeout", "-5"], "argument --timeout: '-5' must be a number of seconds"),
    (["demo", "--timeout", "0"], "argument --timeout: '0' must be a number of seconds"),
    (["demo", "--timeout", "inf"], "argument --timeout: 'inf' must be a number of seconds"),
    (["demo", "--timeout", "1e400"], "must be a number of seconds"),
    (["demo", "--timeout", "soon"], "'soon' is not a number of seconds"),
    (["demo", "--threads", "0"], "argument --threads: '0' must be at least 1"),
    (["demo", "--threads", "100000"], "argument --threads: '100000' must be at most 1000"),
    (["demo", "--batch", "0"], "argument --batch: '0' must be at least 1"),
    (["demo", "--batch", "1000000"], "argument --batch: '1000000' must be at most 100000"),
    (["demo", "--max-in-flight", "2147483648"], "argument --max-in-flight: '2147483648' must be at most 2147483647"),
    (["demo", "--concurrency", "100001"], "argument --concurrency: '100001' must be at most 100000"),
    # worker
    ([*WORKER, "--max-in-flight", "0"], "argument --max-in-flight: '0' must be at least 1"),
    ([*WORKER, "--max-in-flight", "2147483648"], "must be at most 2147483647"),
    ([*WORKER, "--concurrency", "0"], "argument --concurrency: '0' must be at least 1"),
    ([*WORKER, "--concurrency", "100001"], "argument --concurrency: '100001' must be at most 100000"),
    ([*WORKER, "--max-tries", "-1"], "argument --max-tries: '-1' must be at least 0 (the Reader's max_tries)"),
    ([*WORKER, "--max-tries", "65536"], "argument --max-tries: '65536' must be at most 65535 (the Reader's max_tries)"),
    ([*WORKER, "--max-tries", "many"], "'many' is not a whole number"),
    # pub
    (["pub", "--topic", "t", "--timeout", "nan", "x"], "argument --timeout: 'nan' must be a number of seconds"),
    (["pub", "--topic", "t", "--timeout", "-5", "x"], "argument --timeout: '-5' must be a number of seconds"),
    (["pub", "--topic", "t", "--timeout", "86401", "x"], "argument --timeout: '86401' must be a number of seconds from 0.001 to 86400"),
    # tail
    ([*TAIL, "-n", "0"], "argument -n: '0' must be at least 1"),
    ([*TAIL, "--max-in-flight", "0"], "argument --max-in-flight: '0' must be at least 1"),
    ([*TAIL, "--max-in-flight", "2147483648"], "must be at most 2147483647"),
    ([*TAIL, "--lookupd-poll-interval", "nan"], "argument --lookupd-poll-interval: 'nan' must be a number of seconds"),
    ([*TAIL, "--lookupd-poll-interval", "0"], "argument --lookupd-poll-interval: '0' must be a number of seconds"),
    # cluster
    (["cluster", "--nsqd", "0"], "argument --nsqd: '0' must be at least 1"),
    # an address holding credentials: refused, and not echoed
    (["tail", "--topic", "t", "--lookupd-http-address", "http://user:PASSWD@127.0.0.1"], "bad address <redacted: it holds credentials>"),
    (["cluster", "--nsqd", "100000"], "argument --nsqd: '100000' must be at most 100"),
]


@pytest.mark.parametrize("argv, message", BAD_NUMBERS, ids=[f"{a[0]} {' '.join(a[-2:])}"[:60] for a, _ in BAD_NUMBERS])
def test_cli_numeric_options_are_range_checked(argv: List[str], message: str, no_brokers: None, capsys: pytest.CaptureFixture) -> None:
    code, err = run_main(argv, capsys)
    assert code == cli.EXIT_USAGE, err
    assert message in err, err
    assert "usage: nsq-sync" in err and "Traceback" not in err, err
    assert "PASSWD" not in err, err


def test_cli_demo_refuses_mpub_bodies_nsqd_would_refuse(no_brokers: None, capsys: pytest.CaptureFixture) -> None:
    code, err = run_main(["demo", "--batch", "100", "--body-size", "100000", "-q"], capsys)
    assert code == cli.EXIT_USAGE, err
    assert "nsq-sync: error: --batch 100 x --body-size 100000 makes MPUB bodies of" in err, err
    assert "max-body-size" in err and "Traceback" not in err, err


@pytest.mark.parametrize("messages", [["-", "foo"], ["foo", "-"], ["-", "-"]], ids=["dash-first", "dash-last", "two-dashes"])
def test_cli_pub_dash_among_other_arguments_is_a_usage_error(
    messages: List[str], no_brokers: None, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    """'-' reads stdin only as the sole message argument; `pub - foo` published "-" and "foo"."""
    monkeypatch.setattr(nsq_sync, "Writer", mock.Mock(side_effect=AssertionError("made a Writer despite a bad argument")))
    code, err = run_main(["pub", "--topic", "t", "--nsqd-tcp-address", ADDRESS, *messages], capsys)
    assert code == cli.EXIT_USAGE, err
    assert err.startswith("nsq-sync: error: '-' (read the messages from stdin) must be the only message argument"), err
    assert err.count("\n") == 1 and "Traceback" not in err, err


def test_cli_version(capsys: pytest.CaptureFixture) -> None:
    from nsq_sync.__about__ import __version__

    with pytest.raises(SystemExit) as exit_info:
        cli.main(["--version"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out == f"nsq-sync {__version__}\n"


@pytest.mark.parametrize(
    "argv",
    [["demo", "-n", "100000000", "--body-size", "1048512", "--batch", "1", "--timeout", "0.001"],
     ["demo", "--batch", "50", "--body-size", "100000", "--threads", "1000", "--timeout", "86400"]],
    ids=["largest", "mpub-fits"],
)
def test_cli_demo_in_range_values_get_to_the_cluster(argv: List[str], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    """The bounds are inclusive and the MPUB check lets what fits through: the demo goes on to
    start its brokers (stopped here by a fake _start_cluster)."""

    def start_cluster(count: int) -> Any:
        raise cli.Unavailable("stopped by the test")

    monkeypatch.setattr(cli, "_start_cluster", start_cluster)
    monkeypatch.setattr(cli.logging, "basicConfig", lambda **kwargs: None)
    assert cli.main([*argv, "-q", "--json"]) == cli.EXIT_UNAVAILABLE
    assert "stopped by the test" in capsys.readouterr().err


# ------------------------------------------------------------ worker with a handler that would never run
@pytest.fixture
def handler_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[[str], str]]:
    """``write(source) -> module name``: a fresh module in a temporary current directory."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", list(sys.path))
    names: List[str] = []

    def write(source: str) -> str:
        name = f"handler_{uuid.uuid4().hex}"
        (tmp_path / f"{name}.py").write_text(source)
        names.append(name)
        return name

    yield write
    for name in names:
        sys.modules.pop(name, None)


WORKER_HANDLERS = {
    "async def": ("async def handle(message):\n    pass\n", "handle", "a coroutine function (async def)"),
    "async generator": ("async def handle(message):\n    yield message\n", "handle", "an async generator function"),
    "generator": ("def handle(message):\n    yield message\n", "handle", "a generator function"),
    "object with async __call__": ("class H:\n    async def __call__(self, message):\n        pass\n\nhandle = H()\n", "handle", "a coroutine function"),
    "async method": ("class H:\n    async def run(self, message):\n        pass\n\nh = H()\n", "h.run", "a coroutine function"),
    # (what @tornado.gen.coroutine marks its wrapper with; the module need not import tornado)
    "tornado coroutine": ("def handle(message):\n    pass\n\nhandle.__tornado_coroutine__ = True\n", "handle", "a Tornado coroutine"),
}


@pytest.mark.parametrize("case", sorted(WORKER_HANDLERS))
def test_cli_worker_refuses_a_handler_that_would_never_run(
    case: str, handler_module: Callable[[str], str], no_brokers: None, capsys: pytest.CaptureFixture
) -> None:
    source, attr, kind = WORKER_HANDLERS[case]
    name = handler_module(source)
    code, err = run_main(["worker", f"{name}:{attr}", "--topic", "t", "--channel", "c", "--nsqd-tcp-address", ADDRESS], capsys)
    assert code == cli.EXIT_USAGE, err
    assert err.startswith(f"nsq-sync: error: handler '{name}:{attr}': message_handler must be a plain function, not {kind}"), err
    assert "Traceback" not in err and err.count("\n") == 1, err


def test_cli_worker_refuses_a_handler_that_cannot_take_the_message(
    handler_module: Callable[[str], str], no_brokers: None, capsys: pytest.CaptureFixture
) -> None:
    # It started, and every message failed with a TypeError until given up.
    name = handler_module("def handle(conn, message):\n    pass\n")
    code, err = run_main(["worker", f"{name}:handle", "--topic", "t", "--channel", "c", "--nsqd-tcp-address", ADDRESS], capsys)
    assert code == cli.EXIT_USAGE, err
    assert err.startswith(f"nsq-sync: error: handler '{name}:handle': message_handler must take one positional argument, the message"), err
    assert "Traceback" not in err and err.count("\n") == 1, err


def test_cli_worker_default_concurrency_with_a_big_max_in_flight(
    handler_module: Callable[[str], str], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    """worker/tail --max-in-flight 200000 failed with 'concurrency' (an option not given)."""
    name = handler_module("def handle(message):\n    pass\n")
    made: List[Reader] = []
    real_reader = nsq_sync.Reader

    class Stop(Exception):
        pass

    def reader(*args: Any, **kwargs: Any) -> Any:
        made.append(real_reader(*args, **kwargs))
        made[-1].close()
        raise Stop

    monkeypatch.setattr(nsq_sync, "Reader", reader)
    monkeypatch.setattr(cli.logging, "basicConfig", lambda **kwargs: None)
    for argv in (["worker", f"{name}:handle", "--topic", "t", "--channel", "c", "--nsqd-tcp-address", ADDRESS],
                 ["tail", "--topic", "t", "--nsqd-tcp-address", ADDRESS]):
        with pytest.raises(Stop):
            cli.main([*argv, "--max-in-flight", "200000"])
        assert (made[-1].max_in_flight, made[-1].concurrency) == (200_000, 100_000)
    capsys.readouterr()


# ------------------------------------------------------------ pub: the exact bytes
@pytest.fixture
def fake_pub(monkeypatch: pytest.MonkeyPatch) -> Iterator[Tuple[FakeNsqd, List[str]]]:
    monkeypatch.setattr(cli.logging, "basicConfig", lambda **kwargs: None)
    with FakeNsqd() as server:
        yield server, ["pub", "--topic", "t", "--nsqd-tcp-address", f"{server.host}:{server.port}", "--timeout", "5"]


def published_bodies(server: FakeNsqd) -> List[bytes]:
    with server.lock:
        return [c.body for c in server.received if c.name == "PUB"]


def test_cli_pub_publishes_argv_bytes_that_are_not_utf8(fake_pub: Tuple[FakeNsqd, List[str]], capsys: pytest.CaptureFixture) -> None:
    """What Python decodes from argv with surrogate escapes (here b'\\xff' and b'caf\\xe9') was a
    UnicodeEncodeError traceback; it is now published byte for byte, like valid UTF-8 is."""
    server, argv = fake_pub
    args = [b"\xff".decode("utf-8", "surrogateescape"), b"caf\xe9 ok".decode("utf-8", "surrogateescape"), "h\u00e9llo \u2603", "plain"]
    assert cli.main([*argv, *args]) == cli.EXIT_OK
    assert published_bodies(server) == [b"\xff", b"caf\xe9 ok", "h\u00e9llo \u2603".encode("utf-8"), b"plain"]
    assert "published 4 message(s) to t" in capsys.readouterr().err


@pytest.mark.parametrize("dash", [True, False], ids=["dash", "no-args"])
def test_cli_pub_publishes_stdin_bytes_that_are_not_utf8(
    dash: bool, fake_pub: Tuple[FakeNsqd, List[str]], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    server, argv = fake_pub
    data = b"\xff\xfe\n\ncaf\xe9\r\n\xe2\x98\x83\nlast"
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(data), encoding="utf-8"))
    assert cli.main([*argv, *(["-"] if dash else [])]) == cli.EXIT_OK
    # one message per line without its "\n" (a "\r" stays, as before); the empty line is skipped
    assert published_bodies(server) == [b"\xff\xfe", b"caf\xe9\r", b"\xe2\x98\x83", b"last"]
    assert "published 4 message(s) to t" in capsys.readouterr().err


def test_cli_pub_reads_a_replaced_text_stdin(fake_pub: Tuple[FakeNsqd, List[str]], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    server, argv = fake_pub
    monkeypatch.setattr(sys, "stdin", io.StringIO("a\n\u2603\n"))
    assert cli.main([*argv, "-"]) == cli.EXIT_OK
    assert published_bodies(server) == [b"a", "\u2603".encode("utf-8")]
    capsys.readouterr()


@pytest.mark.parametrize("size", [1, 30, 31, 32, 100, cli.MAX_DEMO_BODY_SIZE])
def test_demo_bodies_are_the_size_asked_for(size):
    body = cli._demo_body(99_999_999, cli._demo_padding(size))
    # (below the header's 31 bytes a body is the header alone: it carries the sequence and send time)
    assert len(body) == max(size, cli.DEMO_BODY_HEADER)
    assert body.startswith(b"0099999999|")


def test_worker_handler_directory_cannot_shadow_a_module_the_library_imports(tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    # The current directory is searched last for the handler: a json.py (or ssl.py) lying
    # there must not replace the module the library imports later (lazily, e.g. the HTTP client).
    (tmp_path / "json.py").write_text("raise SystemExit('the current directory shadowed json')\n")
    (tmp_path / "nsq_sync_test_tasks.py").write_text("def handle(message):\n    return True\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [entry for entry in sys.path if entry not in ("", str(tmp_path))])
    monkeypatch.delitem(sys.modules, "json")
    monkeypatch.delitem(sys.modules, "nsq_sync_test_tasks", raising=False)
    try:
        handler = cli._load_handler("nsq_sync_test_tasks:handle")
        assert handler.__module__ == "nsq_sync_test_tasks"
        assert sys.path[-1] == str(tmp_path)
        assert str(tmp_path) not in importlib.import_module("json").__file__
    finally:
        sys.modules.pop("nsq_sync_test_tasks", None)


@pytest.mark.parametrize("timeout,error", [("5", TypeError), (True, TypeError), (-1, ConfigError), (float("nan"), ConfigError)], ids=repr)
def test_reader_join_and_asyncconn_close_wait_closed_refuse_a_bad_timeout(timeout: Any, error: type) -> None:
    """Reader.join("5") and AsyncConn.wait_closed("5") failed with a TypeError from inside the
    arithmetic, and AsyncConn.close("5") on a connection never connected was taken; each now
    names ``timeout``, as Writer.join/close do, and a good call afterwards still works."""
    from nsq_sync import AsyncConn, Reader

    reader = Reader("t", "c", message_handler=plain, nsqd_tcp_addresses=["127.0.0.1:1"])
    reader.close()
    with pytest.raises(error, match="timeout"):
        reader.join(timeout)
    assert reader.join(0) is True

    conn = AsyncConn("127.0.0.1", 1)
    with pytest.raises(error, match="timeout"):
        conn.close(timeout)
    assert conn.state == "INIT"  # (refused before closing anything)
    with pytest.raises(error, match="timeout"):
        conn.wait_closed(timeout)
    conn.close(0)
    assert conn.wait_closed(0) is True
