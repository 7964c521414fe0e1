"""The critic job's liveness checks (critic_server.FollowerWatchdog, Heartbeat, ParentWatch) with
a fake c10d store: when they declare rank 0 gone, and that they stay quiet while it beats."""
import threading
import time

import pytest

from aligner.trainers import critic_server as cs


class FakeStore:
    """c10d Store.add semantics: add(key, n) adds n and returns the new value (0 reads)."""

    def __init__(self):
        self.values = {}
        self.lock = threading.Lock()
        self.gone = False
        self.hang = threading.Event()

    def add(self, key, amount):
        if self.hang.is_set():
            time.sleep(3600)
        if self.gone:
            raise RuntimeError("Connection reset by peer")
        with self.lock:
            self.values[key] = self.values.get(key, 0) + amount
            return self.values[key]


def _watch(store, timeout_s=0.6, interval_s=0.05):
    dead = []
    fired = threading.Event()

    def on_dead(message):
        dead.append(message)
        fired.set()

    return cs.FollowerWatchdog(store, rank=1, timeout_s=timeout_s, interval_s=interval_s, on_dead=on_dead), dead, fired


def test_quiet_while_rank0_beats_then_fires_when_the_heartbeat_stops():
    store = FakeStore()
    beat = cs.Heartbeat(store, interval_s=0.05)
    watchdog, dead, fired = _watch(store)
    try:
        assert not fired.wait(1.5)  # 2.5 timeouts of beating: never fires
        beat.stop()
        stopped = time.monotonic()
        assert fired.wait(5)
        assert 0.5 < time.monotonic() - stopped < 3
        assert "rank 1: rank 0 of the critic job is gone (rank 0's heartbeat has not moved" in dead[0]
        assert "Restart the whole critic job" in dead[0]
    finally:
        beat.stop()
        watchdog.stop()


def test_fires_at_once_when_the_store_is_gone():
    store = FakeStore()
    watchdog, dead, fired = _watch(store, timeout_s=30)
    try:
        store.gone = True
        assert fired.wait(2)
        assert "the c10d store is gone (RuntimeError: Connection reset by peer)" in dead[0]
        assert len(dead) == 1  # it stops after firing
    finally:
        watchdog.stop()


def test_fires_when_the_store_stops_answering():
    """A store whose host vanished without closing the connection: the read itself never returns."""
    store = FakeStore()
    watchdog, dead, fired = _watch(store, timeout_s=0.5)
    try:
        store.hang.set()
        assert fired.wait(5)
        assert "did not answer" in dead[0]
    finally:
        watchdog.stop()


def test_parent_watch_fires_when_the_parent_pid_changes(monkeypatch):
    parent = [4242]
    monkeypatch.setattr(cs.os, "getppid", lambda: parent[0])
    dead = []
    watch = cs.ParentWatch(interval_s=0.05, on_dead=dead.append)
    try:
        time.sleep(0.3)
        assert dead == []
        parent[0] = 1  # reparented: the launcher died
        deadline = time.monotonic() + 3
        while not dead and time.monotonic() < deadline:
            time.sleep(0.05)
        assert dead and "pid 4242" in dead[0]
    finally:
        watch.stop()


def test_parent_watch_only_under_torchrun(monkeypatch):
    monkeypatch.delenv("TORCHELASTIC_RUN_ID", raising=False)
    assert cs.ParentWatch.if_launched_by_torchrun() is None
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "abc")
    watch = cs.ParentWatch.if_launched_by_torchrun()
    assert isinstance(watch, cs.ParentWatch)
    watch.stop()


@pytest.mark.parametrize("raw, ok", [(None, cs.FOLLOWER_TIMEOUT_S), ("2.5", 2.5), ("0", None), ("x", None)])
def test_follower_timeout_from_the_environment(monkeypatch, raw, ok):
    if raw is None:
        monkeypatch.delenv("ALIGNER_FOLLOWER_TIMEOUT_S", raising=False)
    else:
        monkeypatch.setenv("ALIGNER_FOLLOWER_TIMEOUT_S", raw)
    if ok is None:
        with pytest.raises(ValueError, match="ALIGNER_FOLLOWER_TIMEOUT_S"):
            cs.follower_timeout_s()
    else:
        assert cs.follower_timeout_s() == ok
