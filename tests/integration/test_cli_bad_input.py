"""Bad input to ``nsq-sync`` as real subprocesses against a real nsqd v1.3.0 (the in-process
versions are in tests/unit/test_bad_input_reader_cli.py):

* ``pub`` publishes the exact bytes it is given, in argv or on stdin, also bytes that are not
  valid UTF-8 (a UnicodeEncodeError/UnicodeDecodeError traceback and exit 1 before);
* ``worker`` with an ``async def`` or generator handler exits 2 with a one-line message and never
  subscribes, so nothing is consumed (before, every message was FINed with its coroutine never run);
* ``worker``/``tail --max-in-flight 200000`` run (the default concurrency is capped) instead of
  failing about ``concurrency``, an option not given;
* out-of-range numbers exit 2 with argparse's usage message before any broker starts;
* ``pub`` with stdin closed and ``tail`` with stdout closed exit 2 with one line (a TypeError or
  AttributeError traceback and exit 1 before); an empty ``pub`` argument exits 2 before anything
  is published (it was skipped silently: ``pub ""`` printed "published 0 message(s)");
* each command's ``--help`` shows every number option's range and default, and they are the
  ones the command accepts (most showed none, or only some of it, in words); every option has a
  text, and it is the command's own (``-v`` spoke of worker's rates in every command; ``pub`` and
  ``tail`` did not say they connect to 127.0.0.1:4150 by default);
* a bad TLS or AUTH setting (a missing or unreadable certificate file, one OpenSSL refuses, a TLS
  option without --tls, an empty secret) exits 2 with one line before anything connects and
  before worker imports the handler.

Commands that take ``--backend`` get the suite's backend, as in test_cli.py.
"""

from __future__ import annotations

import argparse
import re
import shlex
import signal
import subprocess
import time
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import pytest

from nsq_sync.testing import NsqdProcess, TLSFiles


from loading import load_module as _load  # noqa: E402  (tests/support)


_cli = _load(Path(__file__).with_name("test_cli.py"), "_nsq_sync_cli_bad_input_helpers")
CliProcess, cli_command, cli_env = _cli.CliProcess, _cli.cli_command, _cli.cli_env
EXIT_OK, EXIT_USAGE = _cli.EXIT_OK, _cli.EXIT_USAGE

pytestmark = pytest.mark.timeout(60)


def run_bytes(*args: object, env: Dict[str, str], input: bytes = b"", cwd: Optional[Path] = None) -> "subprocess.CompletedProcess[bytes]":  # noqa: A002
    """Run ``nsq-sync ARGS`` with argv and stdin as bytes (str arguments are encoded by the OS layer)."""
    return subprocess.run(cli_command(*args), env=env, input=input, cwd=str(cwd) if cwd else None, capture_output=True, timeout=45)  # type: ignore[arg-type]


def describe(proc: "subprocess.CompletedProcess[bytes]") -> str:
    return f"exit {proc.returncode}\n--- stdout\n{proc.stdout!r}\n--- stderr\n{proc.stderr.decode('utf-8', 'replace')}"


def tail_bodies(nsqd: NsqdProcess, topic: str, count: int, backend: str, env: Dict[str, str]) -> List[bytes]:
    # (the topic's backlog, into tail's channel, its first: --take-backlog)
    proc = run_bytes("tail", "--topic", topic, "--nsqd-tcp-address", nsqd.tcp_address, "-n", str(count), "--take-backlog", "--backend", backend, env=env)
    assert proc.returncode == EXIT_OK, describe(proc)
    return proc.stdout.split(b"\n")[:-1]


@pytest.fixture
def env() -> Dict[str, str]:
    return cli_env()


# ---------------------------------------------------------------- pub: exact bytes
def test_pub_argv_bytes_that_are_not_utf8_are_published_exactly(nsqd: NsqdProcess, env: Dict[str, str], backend: str) -> None:
    bodies = [b"\xff", b"caf\xe9", "h\u00e9llo \u2603".encode("utf-8"), b"plain"]
    # the first message creates the topic and its only channel gets the backlog; tail reads it
    proc = run_bytes("pub", "--topic", "cli_bytes", "--nsqd-tcp-address", nsqd.tcp_address, "--backend", backend, *bodies, env=env)
    assert proc.returncode == EXIT_OK, describe(proc)
    assert b"published 4 message(s) to cli_bytes" in proc.stderr and b"Traceback" not in proc.stderr, describe(proc)
    assert nsqd.topic_depth("cli_bytes") == 4
    assert sorted(tail_bodies(nsqd, "cli_bytes", 4, backend, env)) == sorted(bodies)


def test_pub_stdin_bytes_that_are_not_utf8_are_published_exactly(nsqd: NsqdProcess, env: Dict[str, str], backend: str) -> None:
    proc = run_bytes("pub", "--topic", "cli_stdin_bytes", "--nsqd-tcp-address", nsqd.tcp_address, "--backend", backend, "-",
                     input=b"\xff\xfe\n\ncaf\xe9\n\xe2\x98\x83 x\n", env=env)
    assert proc.returncode == EXIT_OK, describe(proc)
    assert b"published 3 message(s)" in proc.stderr and b"Traceback" not in proc.stderr, describe(proc)
    assert sorted(tail_bodies(nsqd, "cli_stdin_bytes", 3, backend, env)) == sorted([b"\xff\xfe", b"caf\xe9", b"\xe2\x98\x83 x"])


# ---------------------------------------------------------------- closed stdin/stdout, empty arguments
CLOSED_STREAMS = {
    "pub-dash-stdin-closed": (["pub", "--topic", "cli_closed", "-"], "<&-", "stdin is closed"),
    "pub-no-args-stdin-closed": (["pub", "--topic", "cli_closed"], "<&-", "stdin is closed"),
    "tail-stdout-closed": (["tail", "--topic", "cli_closed", "-n", "1"], ">&-", "stdout is closed"),
}


@pytest.mark.parametrize("case", sorted(CLOSED_STREAMS))
def test_a_closed_stdin_or_stdout_exits_2_with_one_line(case: str, nsqd: NsqdProcess, env: Dict[str, str], backend: str) -> None:
    args, redirect, message = CLOSED_STREAMS[case]
    command = shlex.join(cli_command(*args, "--nsqd-tcp-address", nsqd.tcp_address, "--backend", backend)) + " " + redirect
    proc = subprocess.run(["bash", "-c", command], env=env, capture_output=True, timeout=45)
    err = proc.stderr.decode()
    assert proc.returncode == EXIT_USAGE, describe(proc)
    assert err.startswith(f"nsq-sync: error: {message}") and err.count("\n") == 1, describe(proc)
    assert nsqd.topic_stats("cli_closed") is None  # (neither connected)


def test_pub_refuses_an_empty_argument_before_publishing_anything(nsqd: NsqdProcess, env: Dict[str, str], backend: str) -> None:
    proc = run_bytes("pub", "--topic", "cli_empty_arg", "--nsqd-tcp-address", nsqd.tcp_address, "--backend", backend, "a", "", "b", env=env)
    err = proc.stderr.decode()
    assert proc.returncode == EXIT_USAGE, describe(proc)
    assert err == "nsq-sync: error: argument 2 is empty: nsqd refuses empty messages (empty lines of stdin are skipped)\n", describe(proc)
    assert nsqd.topic_stats("cli_empty_arg") is None


@pytest.mark.parametrize("args", [["-", "foo"], ["foo", "-"], ["-", "-"]], ids=["dash-first", "dash-last", "two-dashes"])
def test_pub_refuses_a_dash_among_other_arguments(args: List[str], nsqd: NsqdProcess, env: Dict[str, str], backend: str) -> None:
    """'-' reads stdin only as the sole message argument: with others it is exit 2, nothing
    published. Before, `pub - foo` published the messages "-" and "foo" and ignored stdin."""
    proc = run_bytes("pub", "--topic", "cli_dash", "--nsqd-tcp-address", nsqd.tcp_address, "--backend", backend, *args, input=b"from stdin\n", env=env)
    err = proc.stderr.decode()
    assert proc.returncode == EXIT_USAGE, describe(proc)
    assert err.startswith("nsq-sync: error: '-' (read the messages from stdin) must be the only message argument") and err.count("\n") == 1, describe(proc)
    assert nsqd.topic_stats("cli_dash") is None  # (nothing published, not even connected)


# ---------------------------------------------------------------- worker: a handler that would never run
HANDLERS = {
    "async-def": ("async def handle(message):\n    open('ran', 'w').close()\n", "coroutine function"),
    "generator": ("def handle(message):\n    open('ran', 'w').close()\n    yield\n", "generator function"),
    "async-call": ("class H:\n    async def __call__(self, message):\n        open('ran', 'w').close()\n\nhandle = H()\n", "coroutine function"),
}


@pytest.mark.parametrize("case", sorted(HANDLERS))
def test_worker_with_a_handler_that_would_never_run_exits_2_and_consumes_nothing(
    case: str, nsqd: NsqdProcess, tmp_path: Path, env: Dict[str, str], backend: str
) -> None:
    source, kind = HANDLERS[case]
    (tmp_path / "never_mod.py").write_text(source)
    topic, channel = "cli_async_handler", "work"
    nsqd.create_channel(topic, channel)
    nsqd.mpublish(topic, [b"a", b"b"])
    proc = run_bytes("worker", "never_mod:handle", "--topic", topic, "--channel", channel, "--nsqd-tcp-address", nsqd.tcp_address,
                     "--backend", backend, env=env, cwd=tmp_path)
    assert proc.returncode == EXIT_USAGE, describe(proc)
    err = proc.stderr.decode()
    assert err.startswith("nsq-sync: error: handler 'never_mod:handle': message_handler must be a plain function, not"), describe(proc)
    assert kind in err and "Traceback" not in err and err.count("\n") == 1, describe(proc)
    assert proc.stdout == b""
    stats = nsqd.channel_stats(topic, channel)
    assert stats is not None and stats["depth"] == 2 and stats["in_flight_count"] == 0 and stats["client_count"] == 0, stats
    assert not (tmp_path / "ran").exists()


# ---------------------------------------------------------------- a big max-in-flight without concurrency
def test_worker_and_tail_with_a_big_max_in_flight_run(nsqd: NsqdProcess, tmp_path: Path, env: Dict[str, str], backend: str) -> None:
    topic = "cli_big_mif"
    nsqd.create_channel(topic, "work")
    nsqd.create_channel(topic, "tail")
    nsqd.publish(topic, b"first")
    tail = run_bytes("tail", "--topic", topic, "--channel", "tail", "--nsqd-tcp-address", nsqd.tcp_address, "-n", "1",
                     "--max-in-flight", "200000", "--backend", backend, env=env)
    assert tail.returncode == EXIT_OK, describe(tail)
    assert tail.stdout == b"first\n", describe(tail)
    assert nsqd.channel_stats(topic, "work")["depth"] == 1  # type: ignore[index]

    (tmp_path / "ok_mod.py").write_text("def handle(message):\n    print(message.body.decode(), flush=True)\n")
    with CliProcess.nsq_sync("worker", "ok_mod:handle", "--topic", topic, "--channel", "work", "--nsqd-tcp-address", nsqd.tcp_address,
                             "--max-in-flight", "200000", "--backend", backend, env=env, cwd=tmp_path) as worker:
        worker.wait_for_line(lambda line: line == "first", timeout=20)
        worker.signal(signal.SIGTERM)
        assert worker.wait(30) == EXIT_OK, worker.output()
        assert not any("concurrency" in line or "Traceback" in line for line in worker.stderr()), worker.output()


# ---------------------------------------------------------------- numbers out of range: exit 2, nothing started
BAD_NUMBERS = {
    "demo-count-overflow": (["demo", "-n", "10000000000000000000"], "must be at most"),
    "demo-body-size-memory": (["demo", "--body-size", "10000000000000"], "must be at most"),
    "demo-timeout-nan": (["demo", "--timeout", "nan"], "must be a number of seconds"),
    "demo-timeout-negative": (["demo", "--timeout", "-5"], "must be a number of seconds"),
    "demo-mpub-too-big": (["demo", "--batch", "100", "--body-size", "100000"], "over nsqd's default --max-body-size"),
    "pub-timeout-nan": (["pub", "--topic", "t", "--timeout", "nan", "x"], "must be a number of seconds"),
    "pub-max-msg-size-negative": (["pub", "--topic", "t", "--max-msg-size", "-1", "x"], "argument --max-msg-size: '-1' must be at least 0"),
    "tail-max-in-flight": (["tail", "--topic", "t", "--max-in-flight", "2147483648"], "must be at most 2147483647"),
    "worker-max-tries": (["worker", "m:f", "--topic", "t", "--channel", "c", "--nsqd-tcp-address", "127.0.0.1:4150", "--max-tries", "65536"], "must be at most 65535"),
    "worker-msg-timeout-below-1": (["worker", "m:f", "--topic", "t", "--channel", "c", "--nsqd-tcp-address", "127.0.0.1:4150", "--msg-timeout", "0.5"], "argument --msg-timeout: '0.5' must be a number of seconds from 1 to 900"),
    "worker-msg-timeout-over-nsqd-max": (["worker", "m:f", "--topic", "t", "--channel", "c", "--nsqd-tcp-address", "127.0.0.1:4150", "--msg-timeout", "901"], "argument --msg-timeout: '901' must be a number of seconds from 1 to 900"),
    "worker-msg-timeout-not-a-number": (["worker", "m:f", "--topic", "t", "--channel", "c", "--nsqd-tcp-address", "127.0.0.1:4150", "--msg-timeout", "1m"], "argument --msg-timeout: '1m' is not a number of seconds"),
    "worker-requeue-delay-negative": (["worker", "m:f", "--topic", "t", "--channel", "c", "--nsqd-tcp-address", "127.0.0.1:4150", "--requeue-delay", "-1"], "argument --requeue-delay: '-1' must be a number of seconds from 0 to 3600"),
    "worker-max-backoff-duration-nan": (["worker", "m:f", "--topic", "t", "--channel", "c", "--nsqd-tcp-address", "127.0.0.1:4150", "--max-backoff-duration", "nan"], "argument --max-backoff-duration: 'nan' must be a number of seconds from 0 to 3600"),
}  # (cluster --nsqd is checked in-process only: without the check it would start that many nsqd)


@pytest.mark.parametrize("case", sorted(BAD_NUMBERS))
def test_numbers_out_of_range_exit_2_before_anything_starts(case: str, env: Dict[str, str], backend: str) -> None:
    args, message = BAD_NUMBERS[case]
    args = [*args, "--backend", backend]
    started = time.monotonic()
    proc = run_bytes(*args, env=env)
    err = proc.stderr.decode()
    assert proc.returncode == EXIT_USAGE, describe(proc)
    assert message in err and "Traceback" not in err, describe(proc)
    assert "\ncluster: " not in err and proc.stdout == b"", describe(proc)  # the demo prints "cluster: ..." once its brokers run
    assert time.monotonic() - started < 20


# ---------------------------------------------------------------- TLS and AUTH settings
#: (arguments, environment, message); "{ca}", "{key}", "{dir}", "{junk}" are files made by the test
BAD_CONNECTION = {
    "ca-file-missing": (["--tls", "--tls-ca-file", "{dir}/no-such-ca.pem"], {}, "argument --tls-ca-file: no such file: '{dir}/no-such-ca.pem'"),
    "ca-file-a-directory": (["--tls", "--tls-ca-file", "{dir}"], {}, "argument --tls-ca-file: '{dir}' is not a file"),
    "ca-file-not-a-certificate": (["--tls", "--tls-ca-file", "{junk}"], {}, "error: cannot use --tls-ca-file: cannot build a TLS context"),
    "cert-file-not-a-certificate": (["--tls", "--tls-cert-file", "{junk}"], {}, "error: cannot use --tls-cert-file: cannot build a TLS context"),
    "tls-option-without-tls": (["--tls-ca-file", "{ca}"], {}, "error: --tls-ca-file needs --tls"),
    "skip-verify-without-tls": (["--tls-insecure-skip-verify"], {}, "error: --tls-insecure-skip-verify needs --tls"),
    "key-without-cert": (["--tls", "--tls-key-file", "{key}"], {}, "error: --tls-key-file needs --tls-cert-file"),
    "skip-verify-and-ca": (["--tls", "--tls-insecure-skip-verify", "--tls-ca-file", "{ca}"], {}, "error: --tls-insecure-skip-verify verifies nothing"),
    "auth-secret-empty": (["--auth-secret", ""], {}, "error: --auth-secret is empty"),
    "auth-secret-env-empty": ([], {"NSQ_SYNC_AUTH_SECRET": ""}, "error: NSQ_SYNC_AUTH_SECRET is empty"),
}
IMPORTED_MARK = "imported.txt"


@pytest.mark.parametrize("command", ["pub", "tail", "worker"])
@pytest.mark.parametrize("case", sorted(BAD_CONNECTION))
def test_a_bad_tls_or_auth_setting_exits_2_before_anything_connects(
    case: str, command: str, nsqd: NsqdProcess, tls_files: TLSFiles, tmp_path: Path, env: Dict[str, str], backend: str
) -> None:
    args, extra_env, message = BAD_CONNECTION[case]
    junk = tmp_path / "junk.pem"
    junk.write_text("not a certificate\n")
    # (a handler that says so when imported: the settings are checked before)
    (tmp_path / "marking_mod.py").write_text(f"open({IMPORTED_MARK!r}, 'w').close()\n\ndef handle(message):\n    pass\n")
    files = {"ca": tls_files.ca_cert, "key": tls_files.client_key, "dir": str(tmp_path), "junk": str(junk)}
    args = [arg.format(**files) for arg in args]
    message = message.format(**files)
    topic = "cli_bad_connection"
    argv = {"pub": ["pub", "--topic", topic, "x"], "tail": ["tail", "--topic", topic, "-n", "1"],
            "worker": ["worker", "marking_mod:handle", "--topic", topic, "--channel", "c"]}[command]
    proc = run_bytes(*argv, "--nsqd-tcp-address", nsqd.tcp_address, "--backend", backend, *args, env={**env, **extra_env}, cwd=tmp_path)
    err = proc.stderr.decode()
    assert proc.returncode == EXIT_USAGE, describe(proc)
    # one line: the error (after argparse's usage, for what argparse checks)
    assert message in err.splitlines()[-1] and (err.count("\n") == 1 or err.startswith("usage: ")) and "Traceback" not in err, describe(proc)
    assert nsqd.topic_stats(topic) is None and not (tmp_path / IMPORTED_MARK).exists(), describe(proc)


#: (arguments, message) for the HTTP commands' HTTPS options; "{ca}", "{key}", "{junk}" as above
BAD_HTTPS = {
    "no-https-address": (["--tls-ca-file", "{ca}"], "error: --tls-ca-file is for https:// addresses, and none is given"),
    "skip-verify-no-https-address": (["--tls-insecure-skip-verify"], "error: --tls-insecure-skip-verify is for https:// addresses"),
    "key-without-cert": (["--https", "--tls-key-file", "{key}"], "error: --tls-key-file needs --tls-cert-file"),
    "skip-verify-and-ca": (["--https", "--tls-insecure-skip-verify", "--tls-ca-file", "{ca}"], "error: --tls-insecure-skip-verify verifies nothing"),
    "ca-file-not-a-certificate": (["--https", "--tls-ca-file", "{junk}"], "error: cannot use --tls-ca-file: cannot build a TLS context"),
}


@pytest.mark.parametrize("command", ["stats", "topic", "channel"])
@pytest.mark.parametrize("case", sorted(BAD_HTTPS))
def test_a_bad_https_setting_exits_2_before_anything_is_asked(
    case: str, command: str, nsqd: NsqdProcess, tls_files: TLSFiles, tmp_path: Path, env: Dict[str, str]
) -> None:
    """The --tls-* options of stats, topic and channel are checked before any request: with no
    https:// address they would go unused (nsqlookupd lists nsqd's plain HTTP port)."""
    args, message = BAD_HTTPS[case]
    junk = tmp_path / "junk.pem"
    junk.write_text("not a certificate\n")
    files = {"ca": tls_files.ca_cert, "key": tls_files.client_key, "junk": str(junk)}
    # "--https": one https:// address besides the plain one (nothing listens there: never asked)
    https = ["--nsqd-http-address", "https://127.0.0.1:9"] if "--https" in args else []
    args = [arg.format(**files) for arg in args if arg != "--https"]
    topic = "cli_bad_https"
    argv = {"stats": ["stats"], "topic": ["topic", "create", topic], "channel": ["channel", "create", topic, "c"]}[command]
    proc = run_bytes(*argv, "--nsqd-http-address", nsqd.http_address, *https, *args, env=env)
    err = proc.stderr.decode()
    assert proc.returncode == EXIT_USAGE, describe(proc)
    assert message in err.splitlines()[-1] and err.count("\n") == 1 and "Traceback" not in err, describe(proc)
    assert nsqd.topic_stats(topic) is None and proc.stdout == b"", describe(proc)


# ---------------------------------------------------------------- --help: the ranges the checks apply
#: every number option of each command, and what the command needs besides to parse
NUMBER_OPTIONS = {
    "demo": (["-n", "--threads", "--batch", "--body-size", "--max-in-flight", "--concurrency", "--timeout"], []),
    "worker": (["--max-in-flight", "--concurrency", "--max-tries", "--close-timeout", "--msg-timeout", "--requeue-delay", "--max-backoff-duration"],
               ["m:f", "--topic", "t", "--channel", "c"]),
    "pub": (["--timeout", "--max-msg-size"], ["--topic", "t"]),
    "tail": (["-n", "--max-in-flight", "--lookupd-poll-interval", "--timeout"], ["--topic", "t"]),
    "cluster": (["--nsqd"], []),
    "stats": (["--timeout"], []),
    "topic": (["--timeout"], ["create", "t"]),
    "channel": (["--timeout"], ["create", "t", "c"]),
}
#: "(1..2,147,483,647, default 200)", "(0.001..86,400, default 10)", "(1 or more)"
RANGE = re.compile(r"\((?P<low>[\d,.]+)(?:\.\.(?P<high>[\d,.]+)| or more)(?:, default (?P<default>[\d,.]+))?\)$")


def help_entries(text: str) -> Dict[str, Tuple[str, str]]:
    """Each option of a --help (printed unwrapped: COLUMNS=1000), by option string: its metavar
    and its help text (an entry's lines joined)."""
    entries: Dict[str, Tuple[str, str]] = {}
    names: List[str] = []
    for line in text.splitlines():
        if line.startswith("  -"):
            invocation, _, help_text = line.strip().partition("  ")
            words = invocation.replace(",", "").split()
            names = [word for word in words if word.startswith("-")]
            # "-n N, --count N" up to Python 3.12, "-n, --count N" from 3.13
            metavar = next((word for word in words if not word.startswith("-")), "")
            for name in names:
                entries[name] = (metavar, help_text.strip())
        elif names and line.startswith("    ") and line.strip():
            for name in names:
                entries[name] = (entries[name][0], f"{entries[name][1]} {line.strip()}".strip())
        else:
            names = []
    return entries


@pytest.mark.parametrize("command", sorted(NUMBER_OPTIONS))
def test_help_shows_each_number_options_range_and_default_as_the_command_applies_them(command: str, env: Dict[str, str]) -> None:
    """Every number option's --help ends with its range and default, "(1..2,147,483,647, default
    200)", and they are what the command does: both bounds accepted, one step beyond each
    refused (exit 2), the default the one it runs with. Before, most options showed neither,
    and the others said some of it in words."""
    from nsq_sync import cli

    options, needed = NUMBER_OPTIONS[command]
    proc = run_bytes(command, "--help", env={**env, "COLUMNS": "1000"})
    assert proc.returncode == EXIT_OK, describe(proc)
    entries = help_entries(proc.stdout.decode())
    parser = cli.build_parser()
    sub = next(action for action in parser._actions if isinstance(action, argparse._SubParsersAction)).choices[command]

    def parsed(*extra: str) -> object:
        """The option's value when the command line is parsed with *extra*, or the exit code."""
        try:
            return getattr(parser.parse_args([command, *needed, *extra]), dest)
        except SystemExit as exc:
            return exc.code

    numbers = {sub._option_string_actions[name].dest for name, (metavar, _) in entries.items() if metavar in ("N", "SECONDS")}
    assert numbers == {sub._option_string_actions[option].dest for option in options}, "NUMBER_OPTIONS is to list every one"
    for option in options:
        metavar, text = entries.get(option, ("", ""))
        match = RANGE.search(text)
        assert match, f"{command} {option}: no range in --help: {text!r}"
        kind = {"N": int, "SECONDS": float}[metavar]
        low = kind(match["low"].replace(",", ""))
        high = kind(match["high"].replace(",", "")) if match["high"] else None
        step = 1 if kind is int else max(abs(low), 1.0) * 1e-6
        dest = sub._option_string_actions[option].dest
        assert parsed(option, repr(low)) == low and parsed(option, repr(low - step)) == EXIT_USAGE, (command, option, low)
        if high is not None:
            assert parsed(option, repr(high)) == high and parsed(option, repr(high + high * 1e-6 if kind is float else high + 1)) == EXIT_USAGE, (command, option, high)
        else:
            assert parsed(option, repr(kind(10**12))) == 10**12, (command, option)
        default = kind(match["default"].replace(",", "")) if match["default"] else None
        assert parsed() == default, (command, option, default)


def command_parser(command: str) -> argparse.ArgumentParser:
    from nsq_sync import cli

    parser = cli.build_parser()
    return next(action for action in parser._actions if isinstance(action, argparse._SubParsersAction)).choices[command]


@pytest.mark.parametrize("command", sorted(NUMBER_OPTIONS))
def test_help_gives_every_option_a_text_that_holds_for_the_command(command: str, env: Dict[str, str]) -> None:
    """Each command's --help has a text for every option and argument, and each text is the
    command's own: -v speaks of a line of rates only for worker (every command said "worker also
    logs a line of rates every second"), and pub and tail show where they connect when given no
    address, 127.0.0.1:4150. Before, pub -q and every --topic had no text, and neither pub nor
    tail showed the default address."""
    proc = run_bytes(command, "--help", env={**env, "COLUMNS": "1000"})
    assert proc.returncode == EXIT_OK, describe(proc)
    text = proc.stdout.decode()
    entries = help_entries(text)
    for action in command_parser(command)._actions:
        for option in action.option_strings:
            assert entries.get(option, ("", ""))[1], f"{command} {option}: no help text in\n{text}"
        if not action.option_strings:  # (a positional argument: its line is "  NAME  text")
            assert any(line.split(None, 1)[:1] == [action.metavar or action.dest] and len(line.split()) > 1 for line in text.splitlines()), \
                f"{command} {action.dest}: no help text in\n{text}"
    verbose = entries["-v"][1]
    assert verbose.startswith("log at INFO on stderr") and "worker" not in verbose, verbose
    assert ("rates" in verbose) == (command == "worker"), verbose
    if command in ("pub", "tail"):
        assert "default 127.0.0.1:4150" in entries["--nsqd-tcp-address"][1], entries["--nsqd-tcp-address"]

