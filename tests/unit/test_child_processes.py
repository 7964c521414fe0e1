"""Children of a process die with it after a SIGKILL, and free what they inherited (a server's
listening socket), so a restarted server binds its port at once (aligner/compat/child_processes)."""
import os
import signal
import socket
import subprocess
import sys
import time

import psutil
import pytest

from tests.launch import REPO, child_env

PARENT = """
import multiprocessing, socket, sys, time
if sys.argv[1] == "install":
    from aligner.compat import child_processes
    child_processes.install()
server = socket.socket()
server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
server.bind(("127.0.0.1", 0))
server.listen()
child = multiprocessing.get_context("fork").Process(target=time.sleep, args=(120,))
child.start()
print(server.getsockname()[1], child.pid, flush=True)
time.sleep(120)
"""


def _alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _bind(port: int) -> bool:
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(("127.0.0.1", port))
        return True
    except OSError:
        return False
    finally:
        sock.close()


def _kill_parent(mode: str) -> tuple[int, int]:
    parent = subprocess.Popen([sys.executable, "-c", PARENT, mode], stdout=subprocess.PIPE, text=True,
                              env=child_env(), cwd=str(REPO))
    port, child = map(int, parent.stdout.readline().split())
    parent.send_signal(signal.SIGKILL)
    parent.wait()
    return port, child


def test_forked_child_dies_with_its_parent_and_the_port_binds_at_once():
    port, child = _kill_parent("install")
    deadline = time.time() + 5
    while _alive(child) and time.time() < deadline:
        time.sleep(0.05)
    assert not _alive(child)
    assert _bind(port)


def test_without_the_guard_the_child_outlives_its_parent_and_holds_the_port():
    """The failure the guard prevents (and proof that the test above can fail)."""
    port, child = _kill_parent("plain")
    try:
        time.sleep(0.5)
        assert _alive(child)
        assert not _bind(port)
    finally:
        os.kill(child, signal.SIGKILL)


def test_megatron_checkpoint_writer_starts_no_manager_process():
    code = """
from aligner.compat import child_processes
child_processes.install()
from megatron.core.dist_checkpointing.strategies import filesystem_async
import psutil, queue
q = filesystem_async._get_write_results_queue()
q.put({"ok": 1}); assert q.get_nowait() == {"ok": 1}
assert isinstance(q, queue.Queue), type(q)
assert psutil.Process().children(recursive=True) == []
print("ok")
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=child_env(),
                         cwd=str(REPO), timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]


def test_install_is_idempotent():
    from aligner.compat import child_processes

    child_processes.install()
    child_processes.install()  # a second call registers nothing more
    assert child_processes._installed


@pytest.mark.parametrize("spec,plan", [("a", {"a": 1}), ("a@2, b@1", {"a": 2, "b": 1}), ("", {})])
def test_fault_spec_parses(spec, plan):
    from aligner.faults import parse

    assert parse(spec) == plan


@pytest.mark.parametrize("spec", ["a@0", "a@x", "@2"])
def test_bad_fault_spec_names_the_variable(spec):
    from aligner.faults import parse

    with pytest.raises(ValueError, match="ALIGNER_FAULT"):
        parse(spec)


def test_fault_point_kills_on_the_named_arrival_only():
    code = """
from aligner.faults import fault_point
for i in range(1, 4):
    print(i, flush=True)
    fault_point("x.y")
print("survived", flush=True)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env=child_env(ALIGNER_FAULT="x.y@2"), cwd=str(REPO), timeout=60)
    assert out.returncode == -signal.SIGKILL
    assert out.stdout.split() == ["1", "2"]
