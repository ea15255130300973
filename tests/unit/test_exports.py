"""The public surface: nsq_sync.__all__, the error tree at top level, pynsq's names."""

from __future__ import annotations

import inspect

import pytest

import nsq_sync
from nsq_sync import errors


def test_all_names_exist():
    missing = [name for name in nsq_sync.__all__ if not hasattr(nsq_sync, name)]
    assert missing == []


def test_all_has_no_duplicates():
    assert len(nsq_sync.__all__) == len(set(nsq_sync.__all__))


def test_star_import_gives_all():
    namespace: dict = {}
    exec("from nsq_sync import *", namespace)
    assert set(nsq_sync.__all__) <= set(namespace)


@pytest.mark.parametrize("name", errors.__all__)
def test_error_names_exported_at_top_level(name):
    assert name in nsq_sync.__all__
    assert getattr(nsq_sync, name) is getattr(errors, name)


def test_every_public_error_class_is_in_errors_all():
    classes = {
        name
        for name, obj in vars(errors).items()
        if inspect.isclass(obj) and issubclass(obj, BaseException) and obj.__module__ == errors.__name__ and not name.startswith("_")
    }
    assert classes <= set(errors.__all__)
    assert classes <= set(nsq_sync.__all__)


PYNSQ_NAMES = [
    "AsyncConn",
    "Message",
    "Error",
    "identify",
    "auth",
    "subscribe",
    "ready",
    "finish",
    "requeue",
    "touch",
    "nop",
    "pub",
    "mpub",
    "dpub",
    "valid_topic_name",
    "valid_channel_name",
    "unpack_response",
    "decode_message",
    "FRAME_TYPE_RESPONSE",
    "FRAME_TYPE_ERROR",
    "FRAME_TYPE_MESSAGE",
    "IntegrityError",
    "SendError",
    "ConnectionClosedError",
]


@pytest.mark.parametrize("name", PYNSQ_NAMES)
def test_pynsq_names(name):
    assert hasattr(nsq_sync, name)
    assert name in nsq_sync.__all__


def test_frame_type_values():
    assert (nsq_sync.FRAME_TYPE_RESPONSE, nsq_sync.FRAME_TYPE_ERROR, nsq_sync.FRAME_TYPE_MESSAGE) == (0, 1, 2)


def test_helpers_are_callables_and_classes_are_classes():
    for name in ("identify", "auth", "subscribe", "ready", "finish", "requeue", "touch", "nop", "pub", "mpub", "dpub"):
        assert callable(getattr(nsq_sync, name)), name
    assert inspect.isclass(nsq_sync.AsyncConn) and inspect.isclass(nsq_sync.Message)
    assert issubclass(nsq_sync.Error, Exception)
    assert nsq_sync.valid_topic_name("t") and not nsq_sync.valid_topic_name("bad name")


def test_version():
    assert isinstance(nsq_sync.__version__, str) and nsq_sync.__version__
