"""Running the critic worker behind HTTP: rank 0's front, the follower ranks, clean shutdown.

Rank 0 serves HTTP (aligner.serving.server) with a :class:`CriticFront` as the handler. Each
handler call checks the request, broadcasts it to every rank (CommandBroadcaster), then runs
rank 0's part of the same collective computation; ranks > 0 sit in ``follower_loop`` and run
theirs. The server executes one call at a time, so all ranks see one command stream.

Handler calls arrive on waitress worker threads, so each call first enables what is per thread:
megatron's CPU compatibility mode and, on GPUs, the current CUDA device.

Shutdown: SIGTERM or SIGINT on rank 0 stops the HTTP loop, waits for a running call to finish,
and sends STOP; every rank then leaves its loop and exits 0. Followers ignore these signals (a
scheduler such as ``scancel`` signals every task at once) and wait for rank 0's STOP instead,
so no rank leaves while another is inside a collective.

If a call fails after its broadcast on a multi-rank job, the ranks may be out of step; the front
then reports not ready (/ready 503) and refuses further calls, and the job must be restarted.

When rank 0 dies (SIGKILL, OOM kill, lost node) the followers must not wait in a broadcast for
the process group's timeout (30 min). Liveness goes through the c10d store every rank already
shares (a TCP key-value store: backend-independent, so the same on gloo and NCCL): rank 0
increments a heartbeat key every HEARTBEAT_INTERVAL_S; a watchdog thread on each follower reads
it and exits the process (code WATCHDOG_EXIT_CODE) when it has not moved for
FOLLOWER_TIMEOUT_S, or at once when the store itself is gone (rank 0 hosted it). Under torchrun,
whose agent hosts the store, every rank also exits when the agent (its parent) dies, so no rank
outlives a SIGKILLed launcher either.
"""
from __future__ import annotations

import contextlib
import logging
import os
import signal
import sys
import threading
import time
from typing import Any, Callable, Iterator

import torch
import torch.distributed as dist

from aligner.compat import megatron_cpu
from aligner.faults import fault_point
from aligner.serving.followers import Command, CommandBroadcaster, follower_loop
from aligner.serving.protocol import IDEMPOTENCY_HEADER
from aligner.serving.server import create_app, make_server, write_ready_file

log = logging.getLogger("aligner.critic.server")


def current_idempotency_key() -> str | None:
    """The Idempotency-Key of the HTTP request being handled on this thread, if any.

    The handler protocol passes only tensors; the key is read from Flask's request context,
    which is active on the thread that calls the handler.
    """
    try:
        import flask
    except ImportError:  # pragma: no cover - flask is a dependency of the server
        return None
    if not flask.has_request_context():
        return None
    return flask.request.headers.get(IDEMPOTENCY_HEADER)


class CriticFront:
    """Rank 0's CriticHandler: check, broadcast to the followers, run rank 0's part.

    worker: the CriticWorker (aligner.trainers.critic); broadcaster: None on a one-rank job.
    """

    def __init__(self, worker, broadcaster: CommandBroadcaster | None, device: torch.device):
        self.worker = worker
        self.broadcaster = broadcaster
        self.device = device
        self._lock = threading.Lock()
        self._stopped = False
        self._broken: str | None = None

    # -- CriticHandler -----------------------------------------------------------------------

    def check_request(self, route: str, tensors: dict[str, torch.Tensor]) -> None:
        """Static checks the HTTP front runs before the request waits for the model."""
        self.worker.check_request(route, tensors)

    def infer(self, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        with self._exclusive():
            self.worker.check_infer(tensors)
            out = self._everywhere(Command.INFER, tensors, {}, lambda: self.worker.infer(tensors))
        return {name: tensor.cpu() for name, tensor in out.items()}

    def train(self, tensors: dict[str, torch.Tensor], step: int | None = None) -> dict[str, float]:
        key = current_idempotency_key()
        with self._exclusive():
            recorded = self.worker.recorded_result(key)
            if recorded is not None:  # applied before (e.g. before the checkpoint we resumed from)
                log.info("train request %r was already applied; answering with its recorded metrics", key)
                return recorded
            self.worker.check_train(tensors, step)
            metadata = {**({"key": key} if key is not None else {}), **({"step": str(step)} if step else {})}
            return self._everywhere(Command.TRAIN, tensors, metadata, lambda: self.worker.train(tensors, key, step))

    def save(self, step: int) -> dict:
        fault_point("critic.before_save")
        with self._exclusive():
            self.worker.check_save(step)
            return self._everywhere(Command.SAVE, {}, {"step": str(step)}, lambda: self.worker.save(step))

    def restore(self, step: int) -> dict:
        with self._exclusive():
            self.worker.check_restore(step)
            return self._everywhere(Command.RESTORE, {}, {"step": str(step)}, lambda: self.worker.restore(step))

    def is_ready(self) -> bool:
        return not self._stopped and self._broken is None

    def metrics(self) -> dict[str, Any]:
        return {**self.worker.metrics(), "stopping": self._stopped, "broken": self._broken}

    # -- lifecycle ---------------------------------------------------------------------------

    def shutdown(self) -> None:
        """Refuse new calls, wait for a running one, then release the followers (STOP)."""
        with self._lock:
            if self._stopped:
                return
            self._stopped = True
            if self.broadcaster is not None and self._broken is None:
                self.broadcaster.stop()

    # -- internals ---------------------------------------------------------------------------

    @contextlib.contextmanager
    def _exclusive(self) -> Iterator[None]:
        prepare_thread(self.device)
        with self._lock:
            if self._stopped:
                raise RuntimeError("the critic server is shutting down")
            if self._broken is not None:
                raise RuntimeError(f"an earlier call failed on a multi-rank job ({self._broken}); the ranks may be "
                                   "out of step: restart the critic job (it resumes from its last checkpoint)")
            yield

    def _everywhere(self, command: Command, tensors: dict, metadata: dict, run: Callable[[], Any]) -> Any:
        if self.broadcaster is not None:
            self.broadcaster.send(command, tensors, metadata)
        try:
            return run()
        except Exception as exc:
            if self.broadcaster is not None:
                self._broken = f"{command.name}: {type(exc).__name__}: {exc}"
            raise


def prepare_thread(device: torch.device) -> None:
    """What model code needs in a thread other than the one that built the model."""
    megatron_cpu.enable_in_current_thread()
    if device.type == "cuda":
        torch.cuda.set_device(device)


def remove_ready_file(path: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.remove(path)


class _StopServing(KeyboardInterrupt):
    """Raised by the signal handler inside waitress's loop, which returns on KeyboardInterrupt."""


def serve_rank0(worker, *, host: str, port: int, token: str | None, ready_file: str | None, threads: int,
                queue_limit: int, max_request_bytes: int, idempotency_cache_size: int,
                max_sequence_length: int | None = None, max_tokens_per_request: int | None = None,
                allow_unauthenticated: bool = False) -> None:
    """Serve HTTP until SIGTERM/SIGINT, then stop the followers. Blocks; call on rank 0."""
    world = dist.get_world_size() if dist.is_initialized() else 1
    device = worker.device
    broadcaster = CommandBroadcaster(device=device) if world > 1 else None
    front = CriticFront(worker, broadcaster, device)
    liveness = Heartbeat(_default_store()) if world > 1 else None
    parent_watch = ParentWatch.if_launched_by_torchrun()
    try:
        app = create_app(front, token=token, max_request_bytes=max_request_bytes, queue_limit=queue_limit,
                         idempotency_cache_size=idempotency_cache_size, max_sequence_length=max_sequence_length,
                         max_tokens_per_request=max_tokens_per_request,
                         allow_unauthenticated=allow_unauthenticated)
        server = make_server(app, host=host, port=port, threads=threads)
    except BaseException:
        front.shutdown()  # release the followers rather than leave them to the watchdog
        _stop_all(liveness, parent_watch)
        raise
    bound_port = int(server.effective_port)

    state = {"serving": False, "signal": None}

    def on_signal(signum, frame):
        state["signal"] = signal.Signals(signum).name
        if state["serving"]:
            state["serving"] = False
            raise _StopServing()

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        log.info("critic server (%s) listening on http://%s:%d (auth %s, %d rank(s), max_sequence_length=%s, "
                 "max_tokens_per_request=%s)", worker.mode, host, bound_port, "on" if token else "off", world,
                 max_sequence_length, max_tokens_per_request)
        if ready_file:
            write_ready_file(str(ready_file), host, bound_port)
        if state["signal"] is None:
            state["serving"] = True
            try:
                server.run()  # returns when on_signal raises inside its loop
            except _StopServing:  # raised outside waitress's own handler (between its calls)
                pass
            state["serving"] = False
        log.info("critic server stopping (%s)", state["signal"] or "loop ended")
    finally:
        with contextlib.suppress(Exception):
            server.close()
        if ready_file:
            remove_ready_file(str(ready_file))
        front.shutdown()
        _stop_all(liveness, parent_watch)
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def follow(worker) -> int:
    """Ranks > 0: execute rank 0's commands until STOP. Returns how many were handled."""
    rank = worker.run.layout.rank

    def on_signal(signum, frame):
        log.warning("rank %d got %s: waiting for rank 0 to send STOP", rank, signal.Signals(signum).name)

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
    watchdog = FollowerWatchdog(_default_store(), rank)
    parent_watch = ParentWatch.if_launched_by_torchrun()
    try:
        handled = follower_loop(
            {
                Command.INFER: lambda tensors, meta: worker.infer(tensors),
                Command.TRAIN: lambda tensors, meta: worker.train(
                    tensors, meta.get("key"), int(meta["step"]) if "step" in meta else None),
                Command.SAVE: lambda tensors, meta: worker.save(int(meta["step"])),
                Command.RESTORE: lambda tensors, meta: worker.restore(int(meta["step"])),
            },
            device=worker.device,
        )
    finally:
        _stop_all(watchdog, parent_watch)
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    log.info("rank %d: STOP received after %d command(s)", rank, handled)
    return handled


# --------------------------------------------------------------------------------------------
# Liveness: followers leave when rank 0 (or torchrun's agent) is gone
# --------------------------------------------------------------------------------------------

HEARTBEAT_KEY = "aligner/critic/rank0_heartbeat"
HEARTBEAT_INTERVAL_S = 1.0
# How long a follower waits for rank 0's heartbeat to move before it exits. Rank 0's heartbeat
# thread needs no GIL-free compute to beat, so this can be short; ALIGNER_FOLLOWER_TIMEOUT_S
# overrides it (seconds).
FOLLOWER_TIMEOUT_S = 15.0
WATCHDOG_EXIT_CODE = 75


def _default_store():
    """The c10d store of the default process group (the one every rank joined at start-up)."""
    from torch.distributed import distributed_c10d

    return distributed_c10d._get_default_store()


def follower_timeout_s() -> float:
    raw = os.environ.get("ALIGNER_FOLLOWER_TIMEOUT_S")
    if raw is None:
        return FOLLOWER_TIMEOUT_S
    try:
        value = float(raw)
    except ValueError:
        raise ValueError(f"ALIGNER_FOLLOWER_TIMEOUT_S={raw!r} is not a number of seconds") from None
    if not value > 0:
        raise ValueError(f"ALIGNER_FOLLOWER_TIMEOUT_S={raw!r} must be > 0")
    return value


def _exit_now(message: str) -> None:
    """Leave at once from any thread: the main thread may be inside a collective that will
    never return. Children started with aligner.compat.child_processes die with us."""
    log.error(message)
    for handler in logging.getLogger().handlers:
        with contextlib.suppress(Exception):
            handler.flush()
    with contextlib.suppress(Exception):
        sys.stdout.flush()
        sys.stderr.flush()
    os._exit(WATCHDOG_EXIT_CODE)


class _Periodic:
    """A daemon thread calling ``tick`` every ``interval_s`` until stop()."""

    def __init__(self, name: str, interval_s: float, tick: Callable[[], None]):
        self._stop = threading.Event()
        self._interval_s = interval_s
        self._tick = tick
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while not self._stop.wait(self._interval_s):
            self._tick()

    def stop(self) -> None:
        self._stop.set()
        if threading.current_thread() is not self._thread:
            self._thread.join(timeout=5)


class Heartbeat(_Periodic):
    """Rank 0: increment HEARTBEAT_KEY in the store every HEARTBEAT_INTERVAL_S."""

    def __init__(self, store, interval_s: float = HEARTBEAT_INTERVAL_S):
        self.store = store
        self._warned = False
        store.add(HEARTBEAT_KEY, 1)  # the followers' first reading already sees rank 0 alive
        super().__init__("critic-heartbeat", interval_s, self._beat)

    def _beat(self) -> None:
        try:
            self.store.add(HEARTBEAT_KEY, 1)
        except Exception as exc:  # the store (torchrun's agent) is gone: the followers will notice too
            if not self._warned:
                self._warned = True
                log.warning("heartbeat: cannot reach the c10d store (%s)", exc)


class FollowerWatchdog(_Periodic):
    """A follower: exit when rank 0's heartbeat stops moving for timeout_s, or the store is gone.

    Reads go through a helper thread with a deadline, so a store whose host vanished without
    closing its connection (a lost node) cannot block the watchdog itself.
    """

    def __init__(self, store, rank: int, timeout_s: float | None = None, interval_s: float = HEARTBEAT_INTERVAL_S,
                 on_dead: Callable[[str], None] = _exit_now):
        self.store = store
        self.rank = rank
        self.timeout_s = follower_timeout_s() if timeout_s is None else float(timeout_s)
        self.on_dead = on_dead
        self._last_value: int | None = None
        self._last_change = time.monotonic()
        super().__init__("critic-watchdog", interval_s, self._check)

    def _read(self) -> tuple[str, Any]:
        """("ok", value) | ("error", exception) | ("timeout", None), within timeout_s. A daemon
        thread per read: one stuck in a dead connection never holds up the process's exit."""
        result: list[tuple[str, Any]] = []

        def read():
            try:
                result.append(("ok", self.store.add(HEARTBEAT_KEY, 0)))
            except Exception as exc:
                result.append(("error", exc))

        reader = threading.Thread(target=read, name="critic-watchdog-read", daemon=True)
        reader.start()
        reader.join(self.timeout_s)
        return result[0] if result else ("timeout", None)

    def _check(self) -> None:
        kind, value = self._read()
        if kind == "timeout":
            self._dead(f"the c10d store did not answer within {self.timeout_s:.0f} s")
            return
        if kind == "error":
            self._dead(f"the c10d store is gone ({type(value).__name__}: {value})")
            return
        now = time.monotonic()
        if value != self._last_value:
            self._last_value, self._last_change = value, now
        elif now - self._last_change > self.timeout_s:
            self._dead(f"rank 0's heartbeat has not moved for {now - self._last_change:.0f} s")

    def _dead(self, why: str) -> None:
        self._stop.set()
        self.on_dead(f"rank {self.rank}: rank 0 of the critic job is gone ({why}); exiting instead of waiting "
                     f"in a collective (exit code {WATCHDOG_EXIT_CODE}). Restart the whole critic job: it resumes "
                     "from its last checkpoint")


class ParentWatch(_Periodic):
    """Exit when the launcher that started this rank dies (its parent pid changes)."""

    def __init__(self, interval_s: float = 0.5, on_dead: Callable[[str], None] = _exit_now):
        self.parent = os.getppid()
        self.on_dead = on_dead
        super().__init__("critic-parent-watch", interval_s, self._check)

    @classmethod
    def if_launched_by_torchrun(cls) -> "ParentWatch | None":
        """Only under torchrun: there the parent is the agent, which supervises the ranks; a rank
        started directly (python, srun, mpirun) may well outlive its shell on purpose."""
        return cls() if os.environ.get("TORCHELASTIC_RUN_ID") else None

    def _check(self) -> None:
        if os.getppid() != self.parent:
            self._stop.set()
            self.on_dead(f"the launcher (pid {self.parent}) that started this rank is gone; exiting")


def _stop_all(*watchers) -> None:
    for watcher in watchers:
        if watcher is not None:
            watcher.stop()
