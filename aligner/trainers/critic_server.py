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
"""
from __future__ import annotations

import contextlib
import logging
import os
import signal
import threading
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

    def save(self, step: int, path: str | None) -> dict:
        fault_point("critic.before_save")
        metadata = {"step": str(step), **({"path": path} if path is not None else {})}
        with self._exclusive():
            self.worker.check_save(step)
            return self._everywhere(Command.SAVE, {}, metadata, lambda: self.worker.save(step, path))

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
                queue_limit: int, max_request_bytes: int, idempotency_cache_size: int) -> None:
    """Serve HTTP until SIGTERM/SIGINT, then stop the followers. Blocks; call on rank 0."""
    world = dist.get_world_size() if dist.is_initialized() else 1
    device = worker.device
    broadcaster = CommandBroadcaster(device=device) if world > 1 else None
    front = CriticFront(worker, broadcaster, device)
    app = create_app(front, token=token, max_request_bytes=max_request_bytes, queue_limit=queue_limit,
                     idempotency_cache_size=idempotency_cache_size)
    server = make_server(app, host=host, port=port, threads=threads)
    bound_port = int(server.effective_port)

    state = {"serving": False, "signal": None}

    def on_signal(signum, frame):
        state["signal"] = signal.Signals(signum).name
        if state["serving"]:
            state["serving"] = False
            raise _StopServing()

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        log.info("critic server (%s) listening on http://%s:%d (auth %s, %d rank(s))", worker.mode, host,
                 bound_port, "on" if token else "off", world)
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
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def follow(worker) -> int:
    """Ranks > 0: execute rank 0's commands until STOP. Returns how many were handled."""
    def on_signal(signum, frame):
        log.warning("rank %d got %s: waiting for rank 0 to send STOP", worker.run.layout.rank,
                    signal.Signals(signum).name)

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        handled = follower_loop(
            {
                Command.INFER: lambda tensors, meta: worker.infer(tensors),
                Command.TRAIN: lambda tensors, meta: worker.train(
                    tensors, meta.get("key"), int(meta["step"]) if "step" in meta else None),
                Command.SAVE: lambda tensors, meta: worker.save(int(meta["step"]), meta.get("path")),
            },
            device=worker.device,
        )
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    log.info("rank %d: STOP received after %d command(s)", worker.run.layout.rank, handled)
    return handled
