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


def _static_all(path):
    """The names ``__all__`` holds, read from *path*'s source in the forms both mypy --strict and
    pyright take a module's exports from: ``__all__ = [<str>, ...]``, ``__all__ += [<str>, ...]``
    and ``__all__ += <module>.__all__``, *module* imported as ``from . import <name> [as <alias>]``.
    Any other statement that names ``__all__`` is an AssertionError: ``= [...] + list(x)`` (neither
    checker reads it: every name was "not explicitly exported"), ``+= x`` of a variable (pyright
    does not read it), or a form this reader does not know, such as ``.extend(...)``."""
    import ast
    import importlib

    tree = ast.parse(path.read_text(encoding="utf-8"))
    submodules = {}
    for node in tree.body:
        if isinstance(node, ast.ImportFrom) and node.level == 1 and node.module is None:
            for alias in node.names:
                submodules[alias.asname or alias.name] = alias.name

    def literal(value):
        assert isinstance(value, (ast.List, ast.Tuple)), ast.dump(value)
        assert all(isinstance(item, ast.Constant) and isinstance(item.value, str) for item in value.elts), ast.dump(value)
        return [item.value for item in value.elts]

    names = None
    for node in ast.walk(tree):
        if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == "__all__" for t in node.targets):
            assert names is None, "__all__ is assigned twice"
            names = literal(node.value)
        elif isinstance(node, ast.AugAssign) and isinstance(node.target, ast.Name) and node.target.id == "__all__":
            assert names is not None and isinstance(node.op, ast.Add), ast.dump(node)
            value = node.value
            if isinstance(value, ast.Attribute):
                assert value.attr == "__all__" and isinstance(value.value, ast.Name), ast.dump(value)
                assert value.value.id in submodules, f"{value.value.id} is not imported as 'from . import {value.value.id}'"
                names += importlib.import_module(f"nsq_sync.{submodules[value.value.id]}").__all__
            else:
                names += literal(value)
        elif isinstance(node, ast.Name) and node.id == "__all__" and isinstance(node.ctx, ast.Load):
            raise AssertionError(f"line {node.lineno}: __all__ used in a form type checkers do not read")
    assert names is not None, "no __all__"
    return names


def test_all_is_in_a_form_type_checkers_read():
    """``from nsq_sync import Writer`` under ``mypy --strict`` needs Writer in an ``__all__``
    mypy can read (``[...] + list(_errors_all)`` is not: every name was "not explicitly
    exported"); the names read from the source are the names the module exports."""
    from pathlib import Path

    assert _static_all(Path(nsq_sync.__file__)) == nsq_sync.__all__


def test_static_all_reader_refuses_other_forms(tmp_path):
    """The reader above fails on the forms checkers skip."""
    for source in (
        '__all__ = ["a"] + list(_other)\n',
        '__all__ = ["a"]\n__all__ += _other\n',
        '__all__ = ["a"]\n__all__.extend(_other)\n',
        '__all__ = ["a", name]\n',
    ):
        path = tmp_path / "mod.py"
        path.write_text(source)
        with pytest.raises(AssertionError):
            _static_all(path)
