"""Processes we start die with us, even after a SIGKILL.

megatron-core's checkpoint writer (dist_checkpointing, torch_dist strategy) forks one process
per write bucket and keeps a spawned ``multiprocessing.Manager`` alive for its results queue.
When our process is killed, the Manager lives on forever (about 340 MB), and a forked writer
lives until its bucket is written, holding its inherited copy of a server's listening socket,
so a restarted server cannot bind its port. Two measures, both idempotent:

* every ``os.fork`` of this process makes the child ask the kernel for SIGKILL when the forking
  thread dies (Linux ``PR_SET_PDEATHSIG``), before the child runs anything of its own;
* the writer's results go through an in-process queue: we always save synchronously, so the
  process that puts the results is the one that reads them, and no Manager is started.
"""
from __future__ import annotations

import ctypes
import os
import queue
import signal
import sys

_PR_SET_PDEATHSIG = 1
_installed = False
_forking_pid = 0


def _before_fork() -> None:
    global _forking_pid
    _forking_pid = os.getpid()


def _die_with_parent() -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != _forking_pid:  # the parent died before prctl took effect
        os._exit(1)


def install() -> None:
    """Call once per process before anything forks (cheap to call again)."""
    global _installed
    if _installed:
        return
    _installed = True
    if sys.platform.startswith("linux"):
        os.register_at_fork(before=_before_fork, after_in_child=_die_with_parent)
    try:
        from megatron.core.dist_checkpointing.strategies import filesystem_async
    except ImportError:  # pragma: no cover - megatron-core is a dependency
        return
    if getattr(filesystem_async, "_results_queue", "absent") is None:
        filesystem_async._results_queue = queue.Queue()
