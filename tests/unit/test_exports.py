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


def _module_level_blocks():
    """nsq_sync/__init__.py's ``if TYPE_CHECKING:`` block and its ``else:`` (ast statements)."""
    import ast
    from pathlib import Path

    tree = ast.parse(Path(nsq_sync.__file__).read_text(encoding="utf-8"))
    blocks = [
        node for node in tree.body
        if isinstance(node, ast.If) and isinstance(node.test, (ast.Name, ast.Attribute))
        and (node.test.id if isinstance(node.test, ast.Name) else node.test.attr) == "TYPE_CHECKING"
    ]
    assert len(blocks) == 1
    return tree, blocks[0].body, blocks[0].orelse


def test_lazy_names_are_imported_for_type_checkers():
    """Reader and the HTTP clients load on first use (a module ``__getattr__``, which type checkers
    do not see): checkers see them through ``if TYPE_CHECKING:`` imports, which must name exactly
    the lazily loaded names, from the modules they load from (they were ``Any`` to checkers)."""
    import ast

    _, checking, _ = _module_level_blocks()
    imported = {}
    for node in checking:
        assert isinstance(node, ast.ImportFrom) and node.level == 1, ast.dump(node)
        for alias in node.names:
            imported[alias.asname or alias.name] = (node.module, alias.name)
    assert imported == nsq_sync._LAZY
    for name, (module, attr) in imported.items():
        assert getattr(nsq_sync, name) is getattr(__import__(f"nsq_sync.{module}", fromlist=[attr]), attr)


def test_module_getattr_is_hidden_from_type_checkers():
    """A module ``__getattr__`` a type checker sees makes every attribute of nsq_sync valid to it
    (a misspelled ``nsq_sync.Rader`` too): it is defined only in the ``else:`` of ``if TYPE_CHECKING``."""
    import ast

    tree, _, runtime = _module_level_blocks()
    top_level = {node.name for node in tree.body if isinstance(node, ast.FunctionDef)}
    assert "__getattr__" not in top_level
    assert "__getattr__" in {node.name for node in runtime if isinstance(node, ast.FunctionDef)}
    with pytest.raises(AttributeError, match="Rader"):
        nsq_sync.Rader  # noqa: B018


def test_no_stray_public_names():
    """Every public name of nsq_sync is in __all__ or is one of its submodules: names bound only
    by its own imports (typing's Any and List, __future__'s ``annotations``) do not leak."""
    import types

    stray = [
        name for name, value in vars(nsq_sync).items()
        if not name.startswith("_") and name.isidentifier()  # (pytest's assertion rewriting adds "@pytest_ar")
        and name not in nsq_sync.__all__
        and not (isinstance(value, types.ModuleType) and value.__name__ == f"nsq_sync.{name}")
    ]
    assert stray == []


def _public_callables() -> list:
    """Every class in nsq_sync.__all__ with its public methods and __init__, and every function."""
    found = []
    for name in nsq_sync.__all__:
        obj = getattr(nsq_sync, name)
        if inspect.isclass(obj):
            if issubclass(obj, BaseException):
                continue  # (the error tree: constructors take a message)
            found.append((name, obj))
            for attr, value in vars(obj).items():
                if callable(value) and (attr == "__init__" or not attr.startswith("_")):
                    found.append((f"{name}.{attr}", value))
        elif inspect.isfunction(obj):
            found.append((name, obj))
    return found


def test_public_annotations_resolve():
    """typing.get_type_hints() (Sphinx autodoc, typer, pydantic) on every public class,
    method and function: AsyncConn's ``tls_options: ssl.SSLContext`` raised NameError, ssl
    being imported for type checkers only."""
    import typing

    failed = []
    for name, obj in _public_callables():
        try:
            typing.get_type_hints(obj)
        except Exception as exc:  # pragma: no cover - the assertion below reports it
            failed.append(f"{name}: {type(exc).__name__}: {exc}")
    assert failed == []
    import ssl

    hints = typing.get_type_hints(nsq_sync.AsyncConn.__init__)
    assert ssl.SSLContext in typing.get_args(hints["tls_options"])
