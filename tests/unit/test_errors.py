"""The error tree: E_* frames to typed exceptions, ConfigError, TimeoutError, pickling."""

from __future__ import annotations

import builtins
import inspect
import pickle

import pytest

import nsq_sync
from nsq_sync import errors
from nsq_sync.errors import (
    ConfigError,
    Error,
    HTTPError,
    ServerError,
    error_from_frame,
)

# Every E_* code nsqd 1.3.0 sends (nsqd/protocol_v2.go), with its class and fatality.
NSQD_CODES = [
    ("E_INVALID", errors.InvalidError, True),
    ("E_BAD_PROTOCOL", errors.BadProtocolError, True),
    ("E_BAD_BODY", errors.BadBodyError, True),
    ("E_BAD_TOPIC", errors.BadTopicError, True),
    ("E_BAD_CHANNEL", errors.BadChannelError, True),
    ("E_BAD_MESSAGE", errors.BadMessageError, True),
    ("E_PUB_FAILED", errors.PubFailedError, True),
    ("E_MPUB_FAILED", errors.MPubFailedError, True),
    ("E_DPUB_FAILED", errors.DPubFailedError, True),
    ("E_FIN_FAILED", errors.FinFailedError, False),
    ("E_REQ_FAILED", errors.ReqFailedError, False),
    ("E_TOUCH_FAILED", errors.TouchFailedError, False),
    ("E_IDENTIFY_FAILED", errors.IdentifyFailedError, True),
    ("E_SUB_FAILED", errors.SubFailedError, True),
    ("E_AUTH_DISABLED", errors.AuthDisabledError, True),
    ("E_AUTH_FAILED", errors.AuthFailedError, True),
    ("E_AUTH_FIRST", errors.AuthFirstError, True),
    ("E_AUTH_ERROR", errors.AuthServerError, True),
    ("E_UNAUTHORIZED", errors.UnauthorizedError, True),
]


@pytest.mark.parametrize("code, cls, fatal", NSQD_CODES, ids=[c for c, _, _ in NSQD_CODES])
def test_error_from_frame(code, cls, fatal):
    text = 'something "quoted" went wrong: x y'
    err = error_from_frame(code.encode() + b" " + text.encode())
    assert type(err) is cls
    assert isinstance(err, ServerError) and isinstance(err, Error) and isinstance(err, nsq_sync.Error)
    assert err.code == code
    assert err.text == text
    assert err.fatal is fatal
    assert str(err) == f"{code} {text}"
    assert errors.SERVER_ERRORS[code] is cls


def test_all_server_codes_are_mapped():
    assert set(errors.SERVER_ERRORS) == {c for c, _, _ in NSQD_CODES}


def test_only_fin_req_touch_are_non_fatal():
    non_fatal = {code for code, cls in errors.SERVER_ERRORS.items() if not cls.fatal}
    assert non_fatal == {"E_FIN_FAILED", "E_REQ_FAILED", "E_TOUCH_FAILED"}


def test_code_without_text():
    err = error_from_frame(b"E_INVALID")
    assert type(err) is errors.InvalidError
    assert err.text == ""
    assert str(err) == "E_INVALID"


def test_real_nsqd_texts():
    err = error_from_frame(b"E_FIN_FAILED FIN 0a1b2c3d4e5f6a7b failed ID not in flight")
    assert isinstance(err, errors.FinFailedError) and not err.fatal
    assert err.text == "FIN 0a1b2c3d4e5f6a7b failed ID not in flight"
    err = error_from_frame(b'E_BAD_TOPIC SUB topic name "x y" is not valid')
    assert err.text == 'SUB topic name "x y" is not valid'


def test_unknown_e_code():
    err = error_from_frame(b"E_SOMETHING_NEW a new server error")
    assert type(err) is ServerError
    assert err.code == "E_SOMETHING_NEW"
    assert err.text == "a new server error"
    assert err.fatal is True
    assert "E_SOMETHING_NEW" in str(err)


def test_non_e_text():
    err = error_from_frame(b"garbage without a code")
    assert type(err) is ServerError
    assert err.code == "E_UNKNOWN"
    assert err.text == "garbage without a code"
    assert err.fatal is True


def test_invalid_utf8_and_buffer_types():
    err = error_from_frame(b"E_INVALID bad \xff\xfe bytes")
    assert type(err) is errors.InvalidError
    assert "bad" in err.text
    assert type(error_from_frame(bytearray(b"E_BAD_BODY x"))) is errors.BadBodyError
    assert type(error_from_frame(memoryview(b"E_BAD_BODY x"))) is errors.BadBodyError


def test_empty_frame():
    err = error_from_frame(b"")
    assert isinstance(err, ServerError) and err.fatal


def _error_classes():
    return [
        obj
        for name, obj in vars(errors).items()
        if inspect.isclass(obj) and issubclass(obj, BaseException) and not name.startswith("_") and obj.__module__ == errors.__name__
    ]


def test_every_error_class_derives_from_error():
    classes = _error_classes()
    assert len(classes) >= 35
    for cls in classes:
        assert issubclass(cls, Error), cls
        assert issubclass(cls, nsq_sync.Error), cls


def test_every_error_class_is_in_all():
    assert {cls.__name__ for cls in _error_classes()} <= set(errors.__all__)


def test_tree_shape():
    assert issubclass(errors.IntegrityError, errors.ProtocolError)
    for cls in (errors.ConnectError, errors.TLSError, errors.SendError, errors.ConnectionClosedError):
        assert issubclass(cls, errors.TransportError)
    assert issubclass(errors.StaleConnectionError, errors.ConnectionClosedError)
    # pynsq's Writer reports "no open connections" as a SendError: ported checks must see ours
    assert issubclass(errors.NoConnectionsError, errors.SendError)


def test_config_error():
    err = ConfigError("heartbeat_interval", 61, "must be between 1 and 60")
    assert isinstance(err, ValueError)
    assert isinstance(err, Error)
    assert (err.param, err.value, err.reason) == ("heartbeat_interval", 61, "must be between 1 and 60")
    assert "heartbeat_interval" in str(err) and "61" in str(err)
    assert str(err) == "heartbeat_interval=61: must be between 1 and 60"
    with pytest.raises(ValueError):
        raise err


def test_config_type_error_is_a_config_error_and_a_type_error():
    err = errors.ConfigTypeError("delay", "5", "must be a number of seconds, not str")
    assert isinstance(err, ConfigError) and isinstance(err, ValueError) and isinstance(err, TypeError) and isinstance(err, Error)
    assert (err.param, err.value, str(err)) == ("delay", "5", "delay='5': must be a number of seconds, not str")
    assert nsq_sync.ConfigTypeError is errors.ConfigTypeError


def test_timeout_error():
    err = errors.TimeoutError("took too long")
    assert isinstance(err, builtins.TimeoutError)
    assert isinstance(err, OSError)
    assert isinstance(err, Error)
    assert nsq_sync.TimeoutError is errors.TimeoutError
    assert errors.TimeoutError is not builtins.TimeoutError
    with pytest.raises(builtins.TimeoutError):
        raise err
    assert "took too long" in str(err)


def test_http_error():
    err = HTTPError(404, "TOPIC_NOT_FOUND", "http://127.0.0.1:4151/stats")
    assert (err.status, err.message, err.url) == (404, "TOPIC_NOT_FOUND", "http://127.0.0.1:4151/stats")
    assert "404" in str(err) and "TOPIC_NOT_FOUND" in str(err)
    refused = HTTPError(0, "connection refused")
    assert str(refused) == "connection refused"


def _sample(cls):
    if issubclass(cls, ConfigError):
        return cls("param", [1, "v"], "reason")
    if cls is HTTPError:
        return cls(503, "busy", "http://h:1/x")
    if issubclass(cls, ServerError):
        return cls("some text")
    return cls("a message")


@pytest.mark.parametrize("cls", _error_classes(), ids=lambda c: c.__name__)
def test_pickle_round_trip(cls):
    err = _sample(cls)
    copy = pickle.loads(pickle.dumps(err))
    assert type(copy) is cls
    assert str(copy) == str(err)
    for attr in ("param", "value", "reason", "code", "text", "fatal", "status", "message", "url"):
        if hasattr(err, attr):
            assert getattr(copy, attr) == getattr(err, attr), attr


def test_pickle_unknown_server_error_keeps_code():
    err = error_from_frame(b"E_NEW something")
    copy = pickle.loads(pickle.dumps(err))
    assert (type(copy), copy.code, copy.text, str(copy)) == (ServerError, "E_NEW", "something", "E_NEW something")


@pytest.mark.parametrize("code, cls, fatal", NSQD_CODES, ids=[c for c, _, _ in NSQD_CODES])
def test_pickle_from_frame(code, cls, fatal):
    err = error_from_frame(code.encode() + b" text here")
    copy = pickle.loads(pickle.dumps(err))
    assert type(copy) is cls and copy.code == code and copy.text == "text here" and copy.fatal is fatal


# ------------------------------------------------- a peer's text: bounded and escaped


def test_error_frame_text_is_bounded_and_escaped():
    # an 8 MB E_PUB_FAILED used to become an 8,388,692-character message, and its newline
    # forged a log line ("... CRITICAL ...") wherever the error was logged
    forged = "boom\nCRITICAL forged line\r\x1b[31m"
    huge = "E_PUB_FAILED " + forged + "x" * (8 * 1024 * 1024)
    err = error_from_frame(huge.encode())
    assert type(err) is errors.PubFailedError and err.code == "E_PUB_FAILED" and err.fatal
    for text in (err.text, str(err)):
        assert "\n" not in text and "\r" not in text and "\x1b" not in text
        assert len(text) < 600
    assert err.text.startswith("boom\\nCRITICAL forged line\\r\\x1b[31mxxx")
    kept = len(err.text.partition("...")[0].encode().decode("unicode_escape"))  # (the peer's characters kept)
    assert err.text.endswith(f"... ({len(forged) + 8 * 1024 * 1024 - kept} more characters)")
    assert str(err) == f"E_PUB_FAILED {err.text}"
    copy = pickle.loads(pickle.dumps(err))
    assert (copy.text, str(copy)) == (err.text, str(err))


def test_error_frame_unknown_code_must_look_like_a_code():
    # the code is the text before the first space: a newline or 1 MB in it went into str(err)
    err = error_from_frame(b"E_X\nCRITICAL forged")
    assert (type(err), err.code) == (ServerError, "E_UNKNOWN")
    assert err.text == "E_X\\nCRITICAL forged" and "\n" not in str(err)
    err = error_from_frame(b"E_" + b"A" * 100_000 + b" x")
    assert err.code == "E_UNKNOWN" and len(str(err)) < 600
    assert error_from_frame(b"E_NEW_THING 2 x").code == "E_NEW_THING"


@pytest.mark.parametrize("text", ["", "plain text", 'SUB topic name "x y" is not valid', "déjà vu, 日本語, emoji 🎉", "a" * 500])
def test_peer_text_keeps_ordinary_text(text):
    assert errors.peer_text(text) == text


@pytest.mark.parametrize("char, escaped", [
    ("\n", "\\n"), ("\r", "\\r"), ("\t", "\\t"), ("\0", "\\x00"), ("\x1b", "\\x1b"), ("\x7f", "\\x7f"),
    ("\x85", "\\x85"), ("\u2028", "\\u2028"), ("\u2029", "\\u2029"), ("\u202e", "\\u202e"), ("\ud800", "\\ud800"),
])
def test_peer_text_escapes_control_characters(char, escaped):
    assert errors.peer_text(f"a{char}b") == f"a{escaped}b"


def test_peer_text_limit_counts_escapes_and_says_what_was_cut():
    assert errors.peer_text("a" * 501) == "a" * 500 + "... (1 more characters)"
    cut = errors.peer_text("\n" * 1000)  # 2 characters each once escaped
    assert cut == "\\n" * 250 + "... (750 more characters)"
    assert errors.peer_text("abcdef", limit=3) == "abc... (3 more characters)"
