"""Load a Python function named in a config as ``"pkg.module:function"`` or ``"path/to/file.py:function"``.

Errors name the config key and say what to fix. Imports nothing heavy (no torch), because the
reward-function worker process uses it too.
"""
from __future__ import annotations

import difflib
import hashlib
import importlib
import importlib.util
import os
import sys
from typing import Callable, Optional


class FunctionPathError(ValueError):
    """A function path from the config cannot be loaded; the message names the config key."""


def parse_function_path(path: object, key: str) -> tuple[str, str, str]:
    """Split a function path into ``(kind, target, attribute)``.

    ``kind`` is ``"file"`` for ``file.py:function`` (target: the file path as written) or
    ``"module"`` for ``pkg.module:function``; ``attribute`` may be dotted
    (``module:Class.method``).
    """
    expected = '"pkg.module:function" or "path/to/file.py:function"'
    if not isinstance(path, str):
        raise FunctionPathError(f"{key}={path!r}: expected a string {expected}")
    target, sep, attribute = path.rpartition(":")
    if not sep or not target or not attribute:
        raise FunctionPathError(f"{key}={path!r}: expected {expected} (module or file, a colon, then the function name)")
    if not all(part.isidentifier() for part in attribute.split(".")):
        raise FunctionPathError(f"{key}={path!r}: {attribute!r} after the colon is not a Python name")
    if target.endswith(".py"):
        return "file", target, attribute
    if not all(part.isidentifier() for part in target.split(".")):
        raise FunctionPathError(
            f"{key}={path!r}: {target!r} is neither a dotted module name nor a path ending in .py"
        )
    return "module", target, attribute


def resolve_file(target: str, base_dir: Optional[str] = None) -> str:
    """Absolute path of a ``file.py`` target, relative paths taken from ``base_dir`` (default:
    the current directory)."""
    return os.path.abspath(os.path.join(base_dir or os.getcwd(), os.path.expanduser(target)))


def _import_file(path: str, key: str, spec_text: str):
    if not os.path.isfile(path):
        raise FunctionPathError(f"{key}={spec_text!r}: file {path} does not exist")
    digest = hashlib.sha1(path.encode("utf-8")).hexdigest()[:12]
    name = f"_aligner_user_{digest}_{os.path.splitext(os.path.basename(path))[0]}"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise FunctionPathError(f"{key}={spec_text!r}: cannot load {path} as a Python module")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # registered first, so that the file's own classes pickle
    try:
        spec.loader.exec_module(module)
    except BaseException as e:
        del sys.modules[name]
        raise FunctionPathError(f"{key}={spec_text!r}: running {path} raised {type(e).__name__}: {e}") from e
    return module


def _import_module(target: str, key: str, spec_text: str):
    try:
        return importlib.import_module(target)
    except ModuleNotFoundError as e:
        missing = e.name or target
        if target == missing or target.startswith(missing + "."):
            raise FunctionPathError(
                f"{key}={spec_text!r}: no module named {missing!r} (is it installed, or on PYTHONPATH? "
                f"for a file, write path/to/file.py:function)"
            ) from e
        raise FunctionPathError(f"{key}={spec_text!r}: importing {target} failed: {e}") from e
    except BaseException as e:
        raise FunctionPathError(f"{key}={spec_text!r}: importing {target} raised {type(e).__name__}: {e}") from e


def load_function(path: str, key: str, base_dir: Optional[str] = None) -> Callable:
    """Import and return the callable ``path`` names.

    Args:
        path: ``"pkg.module:function"`` or ``"file.py:function"``.
        key: the config key ``path`` came from, e.g. ``"reward.functions[0].path"``.
        base_dir: directory relative file paths start from (default: the current directory).
    Raises:
        FunctionPathError: bad syntax, missing module or file, an import that raises, missing
            attribute, or an attribute that is not callable; the message names ``key``.
    """
    kind, target, attribute = parse_function_path(path, key)
    if kind == "file":
        module = _import_file(resolve_file(target, base_dir), key, path)
    else:
        module = _import_module(target, key, path)
    obj = module
    for i, part in enumerate(attribute.split(".")):
        if not hasattr(obj, part):
            where = target if i == 0 else f"{target}:{'.'.join(attribute.split('.')[:i])}"
            names = [n for n in dir(obj) if not n.startswith("_")]
            close = difflib.get_close_matches(part, names, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise FunctionPathError(f"{key}={path!r}: {where} has no attribute {part!r}{hint}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise FunctionPathError(f"{key}={path!r}: {attribute} is a {type(obj).__name__}, not a function")
    return obj
