"""The process a reward function runs in (one per function), and the frames both sides speak.

Why a process: a function that hangs must not hang the run. A thread cannot be stopped, and one
stuck in C code that holds the GIL (a regex, a parser, a busy loop in an extension) stops every
other thread too; a process can be killed. The parent (``reward_functions.RewardFunctions``)
starts this module as ``python -c`` (no ``multiprocessing``, so the trainer's ``__main__`` is
never re-imported), keeps it warm across calls, and kills its whole process group on a timeout.

Protocol over the child's stdin/stdout, which the worker moves to private descriptors at start
(fd 1 is then pointed at stderr, so a function's ``print`` lands in the log instead of
corrupting the stream): frames of an 8-byte big-endian length and a pickle.

  parent -> worker  {"sys_path", "cwd", "path", "key"}        once, first
  worker -> parent  {"ready": True, "error": None | str}       once, after loading the function
  parent -> worker  {"kwargs": {...}}                         per call
  worker -> parent  {"ok": True, "values": [float | None]}    per call, or
                    {"ok": False, "kind": "error" | "bad_output", "error": str}

The worker dies with its parent: Linux ``PR_SET_PDEATHSIG`` (SIGKILL), a check that the parent
did not die before that took effect, and end-of-file on stdin. Imports no torch, so it starts in
about the time of a bare interpreter plus the function's own imports.
"""
from __future__ import annotations

import inspect
import os
import pickle
import struct
import sys
import traceback
from typing import Any, Callable

_HEADER = struct.Struct(">Q")


# --------------------------------------------------------------------------------------------
# Frames (blocking; the parent side adds deadlines in reward_functions.py)
# --------------------------------------------------------------------------------------------


def encode_frame(obj: Any) -> bytes:
    data = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
    return _HEADER.pack(len(data)) + data


def _write_frame(fd: int, obj: Any) -> None:
    view = memoryview(encode_frame(obj))
    while view:
        view = view[os.write(fd, view):]


def _read_exact(fd: int, n: int) -> bytes | None:
    chunks, remaining = [], n
    while remaining:
        chunk = os.read(fd, min(remaining, 1 << 20))
        if not chunk:
            return None
        chunks.append(chunk)
        remaining -= len(chunk)
    return b"".join(chunks)


def _read_frame(fd: int) -> Any:
    header = _read_exact(fd, _HEADER.size)
    if header is None:
        return None
    body = _read_exact(fd, _HEADER.unpack(header)[0])
    return None if body is None else pickle.loads(body)


# --------------------------------------------------------------------------------------------
# Calling the function
# --------------------------------------------------------------------------------------------


def keyword_filter(fn: Callable) -> Callable[[dict], dict]:
    """Pass a function only the keyword arguments it declares, unless it takes ``**kwargs``
    (then all): a function ``f(prompts, responses, answer)`` keeps working when the dataset
    gains a column."""
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):  # some builtins have no signature: pass everything
        return lambda kwargs: kwargs
    if any(p.kind == inspect.Parameter.VAR_KEYWORD for p in params):
        return lambda kwargs: kwargs
    names = {p.name for p in params if p.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)}
    return lambda kwargs: {k: v for k, v in kwargs.items() if k in names}


class BadOutput(TypeError):
    """The function returned something that is not one number (or None) per response."""


def as_scores(value: Any) -> list[float | None]:
    """A function's return value as a list of floats and Nones (NaN/inf kept; the parent
    decides what they mean). Accepts any sequence, numpy array or tensor of numbers."""
    if isinstance(value, (str, bytes, dict)) or not hasattr(value, "__iter__"):
        raise BadOutput(f"returned {type(value).__name__}, expected a list with one float (or None) per response")
    if hasattr(value, "tolist"):  # numpy arrays and tensors: plain Python numbers, no pickling of their types
        value = value.tolist()
    scores: list[float | None] = []
    for i, item in enumerate(value):
        if item is None:
            scores.append(None)
            continue
        try:
            scores.append(float(item))
        except (TypeError, ValueError):
            raise BadOutput(f"element {i} is {item!r} ({type(item).__name__}), not a number or None") from None
    return scores


def _die_with_parent(parent_pid: int) -> None:
    if sys.platform.startswith("linux"):
        import ctypes
        import signal

        try:
            ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL, 0, 0, 0)  # PR_SET_PDEATHSIG
        except (OSError, AttributeError):  # pragma: no cover - no prctl: rely on stdin EOF
            pass
    if os.getppid() != parent_pid:  # the parent died before the request took effect
        os._exit(1)


def main(parent_pid: int) -> None:
    proto_in, proto_out = os.dup(0), os.dup(1)
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    os.dup2(2, 1)  # the function's prints go to stderr
    _die_with_parent(parent_pid)

    init = _read_frame(proto_in)
    if init is None:
        return
    sys.path[:] = init["sys_path"]
    os.chdir(init["cwd"])
    fn, select_kwargs, load_error = None, None, None
    try:
        from aligner.rollout.function_loader import load_function

        fn = load_function(init["path"], init["key"])
        select_kwargs = keyword_filter(fn)
    except BaseException:
        load_error = traceback.format_exc()
    _write_frame(proto_out, {"ready": True, "error": load_error})

    while True:
        request = _read_frame(proto_in)
        if request is None:  # the parent closed the pipe or died
            return
        if load_error is not None:
            reply = {"ok": False, "kind": "error", "error": load_error}
        else:
            try:
                scores = as_scores(fn(**select_kwargs(request["kwargs"])))
                reply = {"ok": True, "values": scores}
            except BadOutput as e:
                reply = {"ok": False, "kind": "bad_output", "error": str(e)}
            except BaseException:
                reply = {"ok": False, "kind": "error", "error": traceback.format_exc()}
        _write_frame(proto_out, reply)


if __name__ == "__main__":  # pragma: no cover - started by reward_functions.RewardFunctions
    main(int(sys.argv[1]))
