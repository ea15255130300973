"""Bad input to Writer's methods, to nsqd addresses and to nsq_sync.testing's constructors.

Each must raise a typed error naming the parameter (ConfigError with ``.param``, or a
TypeError whose message names it) before anything is changed or started:

* Writer.wait_connected/close/join with a NaN, negative, huge or non-number timeout or a bad
  count (NaN made wait_connected hang and close skip its drain; count=0 returned True);
* a tuple of "host:port" strings is a list of addresses, not a (host, port) pair, for Writer
  and Reader alike; a port is ASCII digits only ("4150²" raised a bare ValueError, Arabic-Indic
  digits were taken as a port);
* NsqdProcess/NsqlookupdProcess/LocalCluster/AuthServer: a lone str where a list of strings is
  expected (it became a list of characters), a bad start_timeout/binary/nsqd_count/path, and
  tls_cert without tls_key, fail at construction, not at start().

The drain that close() with a bad timeout must not skip is checked on the wire in
tests/functional/test_writer_bad_input.py.
"""

from __future__ import annotations

import math
import socket
import threading
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Tuple

import pytest

from nsq_sync import Reader, Writer
from nsq_sync.errors import ClosedError, ConfigError, NoConnectionsError
from nsq_sync.testing import AuthServer, LocalCluster, NsqdProcess, NsqlookupdProcess
from bad_input import check_named  # (tests/support)

pytestmark = pytest.mark.timeout(60)

NAN, INF = math.nan, math.inf
#: how long a call may take before it counts as hanging (the NaN timeouts used to hang forever)
HANG = 5.0


def raises_named(call: Callable[[], Any], error: type, param: str) -> BaseException:
    """*call* raises *error* naming *param*, within HANG seconds (run in a daemon thread)."""
    outcome: List[Any] = []

    def run() -> None:
        try:
            outcome.append(("returned", call()))
        except BaseException as exc:  # noqa: BLE001 - reported below
            outcome.append(("raised", exc))

    thread = threading.Thread(target=run, name="bad-input-call", daemon=True)
    thread.start()
    thread.join(HANG)
    assert outcome, f"the call hung for {HANG}s instead of raising {error.__name__} naming {param!r}"
    kind, value = outcome[0]
    assert kind == "raised", f"accepted: returned {value!r} instead of raising {error.__name__} naming {param!r}"
    assert isinstance(value, error), f"raised {type(value).__name__}: {value} instead of {error.__name__}"
    check_named(value, param)
    return value


def dead_address() -> str:
    """A loopback "host:port" nothing listens on (connections are refused)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return f"127.0.0.1:{sock.getsockname()[1]}"


@pytest.fixture
def writer() -> Iterator[Writer]:
    """A Writer that never connects (one address, refused)."""
    made = Writer(dead_address(), backend="thread", reconnect_interval=0.05, max_reconnect_interval=0.1)
    yield made
    made.close(1)


def node_addresses(writer: Writer) -> List[str]:
    return [node.address for node in writer._nodes]


# =========================================================================== Writer methods
WAIT_CONNECTED_BAD: List[Tuple[Dict[str, Any], type, str]] = [
    ({"timeout": NAN}, ConfigError, "timeout"),
    ({"timeout": -1}, ConfigError, "timeout"),
    ({"timeout": INF}, ConfigError, "timeout"),
    ({"timeout": 86401}, ConfigError, "timeout"),
    ({"timeout": "1"}, TypeError, "timeout"),
    ({"timeout": True}, TypeError, "timeout"),
    ({"timeout": 0.1, "count": "1"}, TypeError, "count"),
    ({"timeout": 0.1, "count": None}, TypeError, "count"),
    ({"timeout": 0.1, "count": 1.0}, TypeError, "count"),
    ({"timeout": 0.1, "count": True}, TypeError, "count"),
    ({"timeout": 0.1, "count": 0}, ConfigError, "count"),
    ({"timeout": 0.1, "count": -5}, ConfigError, "count"),
    ({"timeout": 0.1, "count": 2}, ConfigError, "count"),  # more than the Writer's one address: never true
]


@pytest.mark.parametrize("kwargs,error,param", WAIT_CONNECTED_BAD, ids=[repr(k) for k, _, _ in WAIT_CONNECTED_BAD])
def test_wait_connected_refuses_bad_timeout_and_count(writer: Writer, kwargs: Dict[str, Any], error: type, param: str) -> None:
    raises_named(lambda: writer.wait_connected(**kwargs), error, param)


def test_wait_connected_count_above_the_addresses_says_how_many(writer: Writer) -> None:
    exc = raises_named(lambda: writer.wait_connected(0, count=3), ConfigError, "count")
    assert "from 1 to 1" in str(exc), exc


def test_wait_connected_still_accepts_good_values(writer: Writer) -> None:
    assert writer.wait_connected(0) is False
    assert writer.wait_connected(0.05, count=1) is False
    assert writer.wait_connected(timeout=0) is False


@pytest.mark.parametrize("timeout,error", [(NAN, ConfigError), (-1, ConfigError), (INF, ConfigError), ("x", TypeError), (True, TypeError)], ids=repr)
def test_close_refuses_bad_timeout_before_closing(writer: Writer, timeout: Any, error: type) -> None:
    raises_named(lambda: writer.close(timeout), error, "timeout")
    # Not closed: a publish is still taken (it waits for a connection, then times out)...
    future = writer.pub_async("t", b"x", timeout=0.05)
    with pytest.raises(NoConnectionsError):
        future.result(HANG)
    # ...and a good close() then works.
    writer.close(1)
    with pytest.raises(ClosedError):
        writer.pub_async("t", b"x")


@pytest.mark.parametrize("timeout,error", [(NAN, ConfigError), (-1, ConfigError), (INF, ConfigError), ("1", TypeError)], ids=repr)
def test_join_refuses_bad_timeout(writer: Writer, timeout: Any, error: type) -> None:
    writer.close(1)
    raises_named(lambda: writer.join(timeout), error, "timeout")
    writer.join(None)
    writer.join(0)


def test_close_after_close_still_checks_the_timeout(writer: Writer) -> None:
    writer.close(1)
    raises_named(lambda: writer.close(NAN), ConfigError, "timeout")
    writer.close()


# =========================================================================== addresses
TAKEN: List[Tuple[Any, List[str]]] = [
    (("127.0.0.1:4150", "127.0.0.1:4151"), ["127.0.0.1:4150", "127.0.0.1:4151"]),
    (("127.0.0.1:4150", "127.0.0.1:4151", "127.0.0.1:4152"), ["127.0.0.1:4150", "127.0.0.1:4151", "127.0.0.1:4152"]),
    (("127.0.0.1:4150",), ["127.0.0.1:4150"]),
    (["127.0.0.1:4150", "127.0.0.1:4151"], ["127.0.0.1:4150", "127.0.0.1:4151"]),
    # the documented (host, port) pair: a tuple whose second item is an int
    (("127.0.0.1", 4150), ["127.0.0.1:4150"]),
    ([("127.0.0.1", 4150), "127.0.0.1:4151"], ["127.0.0.1:4150", "127.0.0.1:4151"]),
    ((("127.0.0.1", 4150), ("127.0.0.1", 4151)), ["127.0.0.1:4150", "127.0.0.1:4151"]),
    (("[::1]:4150", "[::1]:4151"), ["::1:4150", "::1:4151"]),
]


@pytest.mark.parametrize("given,expected", TAKEN, ids=[repr(g) for g, _ in TAKEN])
def test_writer_and_reader_take_a_tuple_of_address_strings(given: Any, expected: List[str]) -> None:
    writer = Writer(given, backend="thread")
    try:
        assert node_addresses(writer) == expected
    finally:
        writer.close(1)
    reader = Reader("t", "c", lambda m: True, nsqd_tcp_addresses=given, backend="thread")
    try:
        assert [a.replace("[", "").replace("]", "") for a in reader.nsqd_tcp_addresses] == expected
    finally:
        reader.close(1)


ADDRESS_BAD: List[Tuple[Any, str]] = [
    # Unicode digits are not a port (str.isdigit() says yes to all of these)
    ("127.0.0.1:4150\u00b2", "ASCII digits"),  # superscript two
    ("127.0.0.1:\u0664\u0661\u0665\u0660", "ASCII digits"),  # Arabic-Indic 4150
    ("127.0.0.1:\uff14\uff11\uff15\uff10", "ASCII digits"),  # fullwidth 4150
    ("127.0.0.1:\u09ea\u09e7\u09eb\u09e6", "ASCII digits"),  # Bengali 4150
    (["127.0.0.1:4150", "127.0.0.1:4151\u00b9"], "ASCII digits"),
    (("127.0.0.1:4150", "127.0.0.1:\u0664\u0661\u0665\u0661"), "ASCII digits"),
    # a (host, port) pair with a str port: say so rather than "must be host:port"
    (("127.0.0.1", "4150"), "int port"),
    # tuples inside a list that are no (host, port) pair
    ([("127.0.0.1",)], "(host, port) pair"),
    ([("127.0.0.1", 4150, 1)], "(host, port) pair"),
    # a pair whose host is a whole "host:port"
    (("127.0.0.1:4150", 5), "IPv6"),
    (("127.0.0.1", 0), "1 to 65535"),
    (("127.0.0.1", True), "1 to 65535"),
    (("", 4150), "host"),
    (("127.0.0.1:4150", "localhost"), "port is missing"),
    (("127.0.0.1:4150", ":4151"), "host is missing"),
    (("127.0.0.1:4150", 4151.0), "not float"),
    ([5], "not int"),
    # a list in one string (an environment variable's "a:4150,b:4150"): taken as one host before
    ("127.0.0.1:4150,127.0.0.1:4151", "several addresses in one string"),
    ("127.0.0.1:4150;127.0.0.1:4151", "several addresses in one string"),
    (["a:4150,b:4150"], "several addresses in one string"),
    (("a,b", 4150), "several addresses in one string"),
    # characters no host name or IP address has
    ('a"b:4150', "which no host name"),
    ("a!b:4150", "which no host name"),
]


@pytest.mark.parametrize("address,says", ADDRESS_BAD, ids=[repr(a) for a, _ in ADDRESS_BAD])
def test_bad_addresses_are_config_errors_that_say_what_is_wrong(address: Any, says: str) -> None:
    for make in (
        lambda: Writer(address, backend="thread"),
        lambda: Reader("t", "c", lambda m: True, nsqd_tcp_addresses=address, backend="thread"),
    ):
        exc = raises_named(make, ConfigError, "nsqd_tcp_addresses")
        assert says in str(exc), f"{exc} does not say {says!r}"


def test_ascii_port_digits_and_ipv6_pairs_still_work() -> None:
    for given, expected in (
        (("::1", 4150), ["::1:4150"]),
        (("[::1]", 4150), ["::1:4150"]),
        ("127.0.0.1:04150", ["127.0.0.1:4150"]),
        ("my_host-1.example:4150", ["my_host-1.example:4150"]),  # (docker-style names keep "_")
        ("[fe80::1%eth0]:4150", ["fe80::1%eth0:4150"]),
        ("[127.0.0.1]:4150", ["127.0.0.1:4150"]),  # (any host in brackets, as Go's SplitHostPort takes it)
    ):
        writer = Writer(given, backend="thread")
        try:
            assert node_addresses(writer) == expected
        finally:
            writer.close(1)


# =========================================================================== nsq_sync.testing constructors
TESTING_BAD: List[Tuple[str, Callable[[], Any], type, str]] = [
    # a lone str where a list of strings is expected (it became a list of characters)
    ("NsqdProcess(extra_args=str)", lambda: NsqdProcess(extra_args="--mem-queue-size=0"), TypeError, "extra_args"),
    ("NsqdProcess(extra_args=bytes)", lambda: NsqdProcess(extra_args=b"--mem-queue-size=0"), TypeError, "extra_args"),
    ("NsqdProcess(extra_args=[5])", lambda: NsqdProcess(extra_args=["--a", 5]), TypeError, "extra_args"),
    ("NsqdProcess(extra_args=5)", lambda: NsqdProcess(extra_args=5), TypeError, "extra_args"),
    ("NsqdProcess(lookupd_tcp_addresses=str)", lambda: NsqdProcess(lookupd_tcp_addresses="127.0.0.1:4160"), TypeError, "lookupd_tcp_addresses"),
    ("NsqdProcess(lookupd_tcp_addresses=[None])", lambda: NsqdProcess(lookupd_tcp_addresses=[None]), TypeError, "lookupd_tcp_addresses"),
    ("NsqdProcess(lookupd_tcp_addresses=[no port])", lambda: NsqdProcess(lookupd_tcp_addresses=["127.0.0.1"]), ConfigError, "lookupd_tcp_addresses"),
    ("NsqdProcess(lookupd_tcp_addresses=[port 0])", lambda: NsqdProcess(lookupd_tcp_addresses=["127.0.0.1:0"]), ConfigError, "lookupd_tcp_addresses"),
    ("NsqlookupdProcess(str)", lambda: NsqlookupdProcess("--x"), TypeError, "extra_args"),
    ("NsqlookupdProcess(extra_args=str)", lambda: NsqlookupdProcess(extra_args="--x"), TypeError, "extra_args"),
    ("LocalCluster(nsqd_args=str)", lambda: LocalCluster(nsqd_args="--x"), TypeError, "nsqd_args"),
    ("LocalCluster(lookupd_args=str)", lambda: LocalCluster(lookupd_args="--x"), TypeError, "lookupd_args"),
    # start_timeout
    ("NsqdProcess(start_timeout=-1)", lambda: NsqdProcess(start_timeout=-1), ConfigError, "start_timeout"),
    ("NsqdProcess(start_timeout=0)", lambda: NsqdProcess(start_timeout=0), ConfigError, "start_timeout"),
    ("NsqdProcess(start_timeout=nan)", lambda: NsqdProcess(start_timeout=NAN), ConfigError, "start_timeout"),
    ("NsqdProcess(start_timeout=inf)", lambda: NsqdProcess(start_timeout=INF), ConfigError, "start_timeout"),
    ("NsqdProcess(start_timeout='x')", lambda: NsqdProcess(start_timeout="x"), TypeError, "start_timeout"),
    ("NsqlookupdProcess(start_timeout=-1)", lambda: NsqlookupdProcess(start_timeout=-1), ConfigError, "start_timeout"),
    ("NsqlookupdProcess(start_timeout='x')", lambda: NsqlookupdProcess(start_timeout="x"), TypeError, "start_timeout"),
    ("LocalCluster(start_timeout=nan)", lambda: LocalCluster(start_timeout=NAN), ConfigError, "start_timeout"),
    ("LocalCluster(start_timeout='x')", lambda: LocalCluster(start_timeout="x"), TypeError, "start_timeout"),
    # binary
    ("NsqdProcess(binary=5)", lambda: NsqdProcess(binary=5), TypeError, "binary"),
    ("NsqdProcess(binary=b'nsqd')", lambda: NsqdProcess(binary=b"/usr/bin/nsqd"), TypeError, "binary"),
    ("NsqdProcess(binary='')", lambda: NsqdProcess(binary=""), ConfigError, "binary"),
    ("NsqlookupdProcess(binary=5)", lambda: NsqlookupdProcess(binary=5), TypeError, "binary"),
    # nsqd_count
    ("LocalCluster(nsqd_count=-1)", lambda: LocalCluster(nsqd_count=-1), ConfigError, "nsqd_count"),
    ("LocalCluster(nsqd_count='2')", lambda: LocalCluster(nsqd_count="2"), TypeError, "nsqd_count"),
    ("LocalCluster(nsqd_count=1.5)", lambda: LocalCluster(nsqd_count=1.5), TypeError, "nsqd_count"),
    ("LocalCluster(nsqd_count=None)", lambda: LocalCluster(nsqd_count=None), TypeError, "nsqd_count"),
    ("LocalCluster(nsqd_count=True)", lambda: LocalCluster(nsqd_count=True), TypeError, "nsqd_count"),
    # paths and TLS
    ("NsqdProcess(tls_cert only)", lambda: NsqdProcess(tls_cert="/tmp/cert.pem"), ConfigError, "tls_key"),
    ("NsqdProcess(tls_key only)", lambda: NsqdProcess(tls_key="/tmp/key.pem"), ConfigError, "tls_cert"),
    ("NsqdProcess(tls_root_ca without TLS)", lambda: NsqdProcess(tls_root_ca="/tmp/ca.pem"), ConfigError, "tls_root_ca"),
    ("NsqdProcess(tls_cert=5)", lambda: NsqdProcess(tls_cert=5, tls_key="/tmp/key.pem"), TypeError, "tls_cert"),
    ("NsqdProcess(data_path=5)", lambda: NsqdProcess(data_path=5), TypeError, "data_path"),
    ("NsqdProcess(data_path='')", lambda: NsqdProcess(data_path=""), ConfigError, "data_path"),
    # AuthServer(secrets=str) registered each character as a secret
    ("AuthServer(secrets=str)", lambda: AuthServer(secrets="s3cret"), TypeError, "secrets"),
    ("AuthServer(secrets=[5])", lambda: AuthServer(secrets=[5]), TypeError, "secrets"),
]


@pytest.mark.parametrize("make,error,param", [c[1:] for c in TESTING_BAD], ids=[c[0] for c in TESTING_BAD])
def test_testing_constructors_refuse_bad_input(make: Callable[[], Any], error: type, param: str) -> None:
    raises_named(make, error, param)


def test_tls_mismatch_is_still_a_value_error() -> None:
    with pytest.raises(ValueError, match="tls_cert and tls_key must be given together"):
        NsqdProcess(tls_cert="/tmp/cert.pem")


def test_add_nsqd_refuses_a_lone_str_before_starting_anything() -> None:
    cluster = LocalCluster(nsqd_count=0)
    raises_named(lambda: cluster.add_nsqd("--mem-queue-size=0"), TypeError, "extra_args")
    assert cluster.nsqds == [] and not cluster.lookupd.running


def test_testing_constructors_still_take_good_values(tmp_path: Path) -> None:
    nsqd = NsqdProcess(
        lookupd_tcp_addresses=("127.0.0.1:4160", "localhost:4161"),
        extra_args=("--mem-queue-size=0",),
        data_path=tmp_path / "data",
        tls_cert=tmp_path / "cert.pem",
        tls_key=str(tmp_path / "key.pem"),
        tls_root_ca=tmp_path / "ca.pem",
        binary=tmp_path / "nsqd",
        start_timeout=5,
    )
    assert nsqd.extra_args == ["--mem-queue-size=0"]
    assert nsqd.lookupd_tcp_addresses == ["127.0.0.1:4160", "localhost:4161"]
    assert nsqd.data_path == str(tmp_path / "data") and nsqd.tls_cert == str(tmp_path / "cert.pem")
    assert nsqd.binary == str(tmp_path / "nsqd") and nsqd.start_timeout == 5
    assert NsqlookupdProcess(iter(["--x"])).extra_args == ["--x"]
    cluster = LocalCluster(nsqd_count=0, nsqd_args=["--a"], lookupd_args=("--b",), start_timeout=0.5)
    assert cluster.nsqd_count == 0 and cluster.nsqd_args == ["--a"] and cluster.lookupd.extra_args == ["--b"]
    assert LocalCluster().nsqd_count == 2
    server = AuthServer(secrets=["a", "b"])
    assert sorted(server._responses) == ["a", "b"]


@pytest.mark.parametrize("kwargs", [{"publish_timout": 3}, {"io_loop": None}, {"max_inflight": 5, "deflate": True}])
def test_an_unknown_keyword_names_the_writer_not_asyncconn(kwargs: Dict[str, Any]) -> None:
    # It used to be "AsyncConn.__init__() got an unexpected keyword argument": the caller
    # never wrote AsyncConn, and a typo of a Writer parameter looked like a bug of ours.
    with pytest.raises(TypeError) as caught:
        Writer(["127.0.0.1:1"], **kwargs)
    message = str(caught.value)
    assert message.startswith("Writer() got unexpected keyword argument(s)"), message
    assert "AsyncConn.__init__" not in message
    for name in kwargs:
        if name != "deflate":
            assert repr(name) in message
    assert "'deflate'" not in message  # a real AsyncConn parameter is not reported
