"""Python reward functions named in the config, each run in its own worker process.

Config (``reward.*``)::

    reward:
      functions:                       # summed with their weights
        - path: aligner.rollout.rewards.arithmetic:exact_match   # or path/to/file.py:function
          weight: 1.0                  # optional, default 1.0
          name: exact_match            # optional metric name, default the function's name
      timeout_s: 10.0                  # per call (one call scores the whole batch)
      fallback: 0.0                    # value for samples a function failed on; null: mark invalid

A function is called once per batch with keyword arguments ``prompts`` (list of str),
``responses`` (list of str) and every other field of the prompt dataset's rows, as lists
aligned with the batch (e.g. ``answer``). It receives only the keywords it declares unless it
takes ``**kwargs``. It returns one number per response, or ``None`` for "cannot score":

=====================================  =============================================
what the function does                 what its samples get
=====================================  =============================================
returns a number                       that number (times the weight)
returns ``None`` for a sample          sample marked invalid (``valid=False``): the
                                       engine gives it zero advantage
returns NaN / inf for a sample         ``fallback`` for that sample
raises, returns the wrong length or    ``fallback`` for every sample of the call
something that is not numbers
runs past ``timeout_s``                the worker is killed (and restarted warm);
                                       ``fallback`` for every sample of the call
=====================================  =============================================

With ``fallback=None`` the failing samples are marked invalid instead. Each call's counts come
back in the result (``RewardResult.counts``, ``metrics()``) for the trainer to log every step;
the first failure of each kind per function is logged with its traceback or reason, later ones
are only counted.

Functions run concurrently (one warm worker process each) and within one shared deadline, so a
batch costs the slowest function, not the sum. See ``reward_worker`` for why a process and how
it dies with its parent.
"""
from __future__ import annotations

import logging
import math
import os
import pickle
import select
import signal
import struct
import subprocess
import sys
import threading
import time
import weakref
from dataclasses import dataclass, field
from typing import Any, Mapping, Optional, Sequence

import torch

from aligner.rollout.function_loader import load_function, parse_function_path, resolve_file
from aligner.rollout.reward_worker import encode_frame

log = logging.getLogger("aligner.rollout.reward")

_SPEC_KEYS = ("path", "weight", "name")
# Sample counts per function per call; ``failed`` (given the fallback) sums nonfinite .. timeout.
COUNT_KINDS = ("none", "nonfinite", "error", "bad_output", "wrong_length", "timeout", "failed")
_RESERVED_FIELDS = ("prompts", "responses")


class RewardConfigError(ValueError):
    """A ``reward.*`` setting is unusable; the message names the key."""


@dataclass(frozen=True)
class RewardFunctionSpec:
    """One entry of ``reward.functions``, checked and with its function loadable."""

    path: str  # as written; file paths made absolute
    weight: float
    name: str
    key: str  # the config key of this entry, e.g. "reward.functions[0]"


@dataclass
class RewardResult:
    """One batch's rewards.

    rewards: ``[N]`` float32, ``sum_f weight_f * value_f``; 0 where ``valid`` is False.
    valid: ``[N]`` bool; False where some function returned None (or failed, with
        ``fallback=None``).
    per_function: name -> ``[N]`` float32 values before weighting (after fallback); NaN where
        invalid.
    counts: ``"<name>/<kind>"`` -> number of samples this call, for every kind in
        ``COUNT_KINDS`` (``none``: returned None; ``failed``: got the fallback, the sum of
        ``nonfinite``, ``error``, ``bad_output``, ``wrong_length`` and ``timeout``); plus
        ``"invalid"``, the samples with ``valid`` False.
    seconds: name -> wall time of the function's call (including any restart wait).
    """

    rewards: torch.Tensor
    valid: torch.Tensor
    per_function: dict[str, torch.Tensor]
    counts: dict[str, int]
    seconds: dict[str, float] = field(default_factory=dict)

    def metrics(self, prefix: str = "reward/") -> dict[str, float]:
        """Flat floats for a metrics log: counts, each function's mean over its valid samples,
        and its call time."""
        out = {f"{prefix}{k}": float(v) for k, v in self.counts.items()}
        for name, values in self.per_function.items():
            finite = values[~values.isnan()]
            out[f"{prefix}{name}/mean"] = float(finite.mean()) if finite.numel() else float("nan")
        out.update({f"{prefix}{name}/seconds": s for name, s in self.seconds.items()})
        return out


def parse_reward_functions(
    functions: Sequence[Mapping[str, Any]] | None, key: str = "reward.functions", base_dir: Optional[str] = None
) -> list[RewardFunctionSpec]:
    """Check ``reward.functions`` and load each function once (in this process) so that every
    mistake stops the run at start-up, naming its key.

    Raises:
        RewardConfigError: the list or an entry is malformed (unknown key, missing path,
            non-numeric or non-finite weight, duplicate name).
        FunctionPathError: a path cannot be loaded (syntax, module or file, attribute,
            not callable); see ``function_loader.load_function``.
    """
    if functions is None:
        return []
    if isinstance(functions, (str, bytes)) or not isinstance(functions, Sequence):
        raise RewardConfigError(f"{key} must be a list of {{path, weight}} entries, got {type(functions).__name__}")
    specs: list[RewardFunctionSpec] = []
    for i, entry in enumerate(functions):
        entry_key = f"{key}[{i}]"
        if isinstance(entry, str):
            entry = {"path": entry}
        if not isinstance(entry, Mapping):
            raise RewardConfigError(f"{entry_key} must be a mapping {{path, weight}}, got {type(entry).__name__}")
        unknown = sorted(set(entry) - set(_SPEC_KEYS))
        if unknown:
            raise RewardConfigError(f"{entry_key} has unknown key(s) {unknown}; allowed: {list(_SPEC_KEYS)}")
        if "path" not in entry:
            raise RewardConfigError(f"{entry_key}.path is missing (\"pkg.module:function\" or \"file.py:function\")")
        path = entry["path"]
        kind, target, attribute = parse_function_path(path, f"{entry_key}.path")
        fn = load_function(path, f"{entry_key}.path", base_dir)
        if kind == "file":  # absolute, so the worker (and a later chdir) finds the same file
            path = f"{resolve_file(target, base_dir)}:{attribute}"
        weight = entry.get("weight", 1.0)
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(weight):
            raise RewardConfigError(f"{entry_key}.weight={weight!r}: need a finite number")
        name = entry.get("name") or getattr(fn, "__name__", attribute.rsplit(".", 1)[-1])
        if not isinstance(name, str) or "/" in name:
            raise RewardConfigError(f"{entry_key}.name={name!r}: need a string without '/'")
        specs.append(RewardFunctionSpec(path=path, weight=float(weight), name=name, key=entry_key))
    names = [s.name for s in specs]
    for spec in specs:
        if names.count(spec.name) > 1:
            raise RewardConfigError(
                f"{key}: two functions are both named {spec.name!r} (metrics would collide); set a distinct "
                f"{key}[i].name"
            )
    return specs


# --------------------------------------------------------------------------------------------
# The parent's side of one worker process
# --------------------------------------------------------------------------------------------


class _WorkerGone(Exception):
    """The worker exited (crashed, or was killed)."""


class _Deadline(Exception):
    """The deadline passed before the worker answered."""


_BOOTSTRAP = (
    "import sys; sys.path.insert(0, {root!r}); "
    "from aligner.rollout.reward_worker import main; main({pid})"
)


class _Worker:
    """A warm process running one reward function; restartable."""

    def __init__(self, spec: RewardFunctionSpec):
        self.spec = spec
        self.proc: Optional[subprocess.Popen] = None
        self.ready = False
        self._buffer = b""
        self.start()

    def start(self) -> None:
        import aligner

        root = os.path.dirname(os.path.dirname(os.path.abspath(aligner.__file__)))
        self.proc = subprocess.Popen(
            [sys.executable, "-c", _BOOTSTRAP.format(root=root, pid=os.getpid())],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=None,
            start_new_session=True,  # its own process group: a kill reaches anything it started
            close_fds=True,
        )
        os.set_blocking(self.proc.stdin.fileno(), False)
        os.set_blocking(self.proc.stdout.fileno(), False)
        self.ready = False
        self._buffer = b""
        init = {"sys_path": list(sys.path), "cwd": os.getcwd(), "path": self.spec.path, "key": f"{self.spec.key}.path"}
        try:
            self._write(encode_frame(init), time.monotonic() + 30.0)
        except (_WorkerGone, _Deadline):
            pass  # noticed (and restarted) at the next call

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill(self) -> None:
        proc, self.proc = self.proc, None
        if proc is None:
            return
        _kill_process_group(proc)
        for pipe in (proc.stdin, proc.stdout):
            try:
                pipe.close()
            except OSError:
                pass

    def restart(self) -> None:
        self.kill()
        self.start()

    # -- frames with a deadline
    def _write(self, data: bytes, deadline: float) -> None:
        fd = self.proc.stdin.fileno()
        view = memoryview(data)
        while view:
            # past the deadline still one non-blocking look: the pipe may have room
            remaining = max(deadline - time.monotonic(), 0.0)
            _, writable, _ = select.select([], [fd], [], remaining)
            if not writable:
                raise _Deadline()
            try:
                view = view[os.write(fd, view[:1 << 16]):]
            except BlockingIOError:
                continue
            except (BrokenPipeError, OSError):
                raise _WorkerGone() from None

    def _read(self, deadline: float) -> Any:
        fd = self.proc.stdout.fileno()
        need = 8
        length = None
        while True:
            if length is None and len(self._buffer) >= 8:
                length = struct.unpack(">Q", self._buffer[:8])[0]
                need = 8 + length
            if length is not None and len(self._buffer) >= need:
                frame, self._buffer = self._buffer[8:need], self._buffer[need:]
                return pickle.loads(frame)
            # past the deadline still one non-blocking look: an answer may be waiting while
            # another worker's deadline was being waited out
            remaining = max(deadline - time.monotonic(), 0.0)
            readable, _, _ = select.select([fd], [], [], remaining)
            if not readable:
                raise _Deadline()
            try:
                chunk = os.read(fd, max(need - len(self._buffer), 1 << 16))
            except BlockingIOError:
                continue
            if not chunk:
                raise _WorkerGone()
            self._buffer += chunk

    def wait_ready(self, deadline: float) -> Optional[str]:
        """Block until the worker has loaded its function; returns its load error, if any."""
        if self.ready:
            return None
        reply = self._read(deadline)
        self.ready = True
        return reply.get("error")

    def send(self, kwargs: dict, deadline: float) -> None:
        self._write(encode_frame({"kwargs": kwargs}), deadline)

    def receive(self, deadline: float) -> dict:
        return self._read(deadline)


def _kill_process_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:  # pragma: no cover - SIGKILL is not ignorable
        pass


def _kill_all(workers: list) -> None:
    for worker in workers:
        worker.kill()


# --------------------------------------------------------------------------------------------
# Scoring a batch
# --------------------------------------------------------------------------------------------


class RewardFunctions:
    """The configured reward functions, each warm in its own process; call it on a batch.

    Args:
        specs: from ``parse_reward_functions``.
        timeout_s: how long one call (all functions, concurrently) may take.
        fallback: the value a failed sample gets from the failing function (before its weight);
            None marks such samples invalid instead.
        startup_timeout_s: how long a (re)started worker may take to import its function before
            the call counts as timed out; not part of ``timeout_s``.
    Close it (or use it as a context manager) to stop the workers; they also die with this
    process.
    """

    def __init__(self, specs: Sequence[RewardFunctionSpec], timeout_s: float, fallback: Optional[float] = 0.0,
                 startup_timeout_s: float = 120.0):
        if not specs:
            raise RewardConfigError("reward.functions is empty: name at least one {path, weight}")
        if not (isinstance(timeout_s, (int, float)) and timeout_s > 0):
            raise RewardConfigError(f"reward.timeout_s={timeout_s!r}: need a number of seconds > 0")
        if fallback is not None and not (isinstance(fallback, (int, float)) and math.isfinite(fallback)):
            raise RewardConfigError(f"reward.fallback={fallback!r}: need a finite number, or null to mark invalid")
        self.specs = list(specs)
        self.timeout_s = float(timeout_s)
        self.fallback = None if fallback is None else float(fallback)
        self.startup_timeout_s = float(startup_timeout_s)
        self.totals = {f"{s.name}/{kind}": 0 for s in self.specs for kind in COUNT_KINDS}
        self.totals["invalid"] = 0
        self.totals["calls"] = 0
        self._logged: set[tuple[str, str]] = set()
        self._lock = threading.Lock()
        self._workers = [_Worker(spec) for spec in self.specs]
        self._finalizer = weakref.finalize(self, _kill_all, self._workers)

    @classmethod
    def from_config(cls, reward_cfg: Mapping[str, Any], key: str = "reward", base_dir: Optional[str] = None
                    ) -> "RewardFunctions":
        """From a ``reward`` config section with ``functions``, ``timeout_s`` and ``fallback``."""
        specs = parse_reward_functions(reward_cfg.get("functions"), f"{key}.functions", base_dir)
        if not specs:
            raise RewardConfigError(f"{key}.functions is empty: name at least one {{path, weight}}")
        return cls(specs, timeout_s=reward_cfg.get("timeout_s", 10.0), fallback=reward_cfg.get("fallback", 0.0))

    def close(self) -> None:
        self._finalizer()

    def __enter__(self) -> "RewardFunctions":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __call__(self, prompts: Sequence[str], responses: Sequence[str], /, **fields: Sequence[Any]) -> RewardResult:
        """Score one batch.

        Args:
            prompts: ``N`` prompt texts.
            responses: ``N`` response texts.
            fields: every other column of the prompt rows, each a length-``N`` sequence of plain
                Python values (they are pickled to the workers).
        Returns:
            a ``RewardResult``.
        """
        n = len(responses)
        if len(prompts) != n:
            raise ValueError(f"{len(prompts)} prompts for {n} responses")
        for name, column in fields.items():
            if name in _RESERVED_FIELDS:
                raise ValueError(f"a prompt field may not be called {name!r}: the reward functions' own argument")
            if len(column) != n:
                raise ValueError(f"field {name!r} has {len(column)} values for {n} responses")
        kwargs = {"prompts": list(prompts), "responses": list(responses), **{k: list(v) for k, v in fields.items()}}
        with self._lock:
            outcomes, seconds = self._run(kwargs)
        return self._combine(outcomes, seconds, n)

    # -- internals
    def _run(self, kwargs: dict) -> tuple[list[dict], dict[str, float]]:
        """Each worker's reply (or a synthetic failure), all within one deadline."""
        outcomes: list[Optional[dict]] = [None] * len(self._workers)
        started = time.monotonic()
        for i, worker in enumerate(self._workers):
            if not worker.alive:
                worker.restart()
            try:
                error = worker.wait_ready(time.monotonic() + self.startup_timeout_s)
            except _Deadline:
                outcomes[i] = {"ok": False, "kind": "timeout",
                               "error": f"did not load within {self.startup_timeout_s:g} s"}
                worker.restart()
                continue
            except _WorkerGone:
                outcomes[i] = {"ok": False, "kind": "error", "error": _exit_reason(worker)}
                worker.restart()
                continue
            if error is not None:
                outcomes[i] = {"ok": False, "kind": "error", "error": error}

        call_start = time.monotonic()
        deadline = call_start + self.timeout_s
        sent, to_restart = [], []
        for i, worker in enumerate(self._workers):
            if outcomes[i] is not None:
                continue
            try:
                worker.send(kwargs, deadline)
                sent.append(i)
            except (_Deadline, _WorkerGone) as e:
                outcomes[i] = self._failure(worker, e)
                to_restart.append(worker)
        seconds = {}
        for i in sent:
            worker = self._workers[i]
            try:
                outcomes[i] = worker.receive(deadline)
            except (_Deadline, _WorkerGone) as e:
                outcomes[i] = self._failure(worker, e)
                to_restart.append(worker)
            seconds[worker.spec.name] = time.monotonic() - call_start
        for worker in to_restart:  # after every answer is in: warm again by the next call
            worker.restart()
        for worker in self._workers:
            seconds.setdefault(worker.spec.name, time.monotonic() - started)
        return outcomes, seconds

    def _failure(self, worker: _Worker, error: Exception) -> dict:
        if isinstance(error, _Deadline):
            return {"ok": False, "kind": "timeout",
                    "error": f"no answer within reward.timeout_s={self.timeout_s:g} s; worker killed and restarted"}
        return {"ok": False, "kind": "error", "error": _exit_reason(worker)}

    def _log_once(self, spec: RewardFunctionSpec, kind: str, message: str) -> None:
        if (spec.name, kind) in self._logged:
            return
        self._logged.add((spec.name, kind))
        log.warning("reward function %s (%s = %s) %s: %s\n(further %s failures of this function are counted, "
                    "not logged)", spec.name, f"{spec.key}.path", spec.path, kind, message.rstrip(), kind)

    def _combine(self, outcomes: list[dict], seconds: dict[str, float], n: int) -> RewardResult:
        counts = {f"{s.name}/{kind}": 0 for s in self.specs for kind in COUNT_KINDS}
        total = torch.zeros(n, dtype=torch.float64)
        valid = torch.ones(n, dtype=torch.bool)
        per_function: dict[str, torch.Tensor] = {}
        for spec, outcome in zip(self.specs, outcomes):
            values: list[Optional[float]]
            failed = [False] * n
            if outcome.get("ok"):
                values = list(outcome["values"])
                if len(values) != n:
                    self._log_once(spec, "wrong_length", f"returned {len(values)} values for {n} responses")
                    counts[f"{spec.name}/wrong_length"] += n
                    values, failed = [None] * n, [True] * n
            else:
                kind = outcome["kind"]
                self._log_once(spec, kind, outcome["error"])
                counts[f"{spec.name}/{kind}"] += n
                values, failed = [None] * n, [True] * n
            nonfinite = [i for i, v in enumerate(values) if v is not None and not math.isfinite(v)]
            if nonfinite:
                self._log_once(spec, "nonfinite", f"returned {values[nonfinite[0]]} for sample {nonfinite[0]} "
                               f"({len(nonfinite)} of {n} non-finite)")
                counts[f"{spec.name}/nonfinite"] += len(nonfinite)
                for i in nonfinite:
                    values[i], failed[i] = None, True
            counts[f"{spec.name}/none"] += sum(1 for v, f in zip(values, failed) if v is None and not f)
            counts[f"{spec.name}/failed"] += sum(failed)
            if self.fallback is not None:
                values = [self.fallback if f else v for v, f in zip(values, failed)]
            column = torch.tensor([math.nan if v is None else v for v in values], dtype=torch.float64)
            missing = column.isnan()
            valid &= ~missing
            total += torch.where(missing, 0.0, column) * spec.weight
            per_function[spec.name] = column.float()
        counts["invalid"] = int((~valid).sum())
        for k, v in counts.items():
            self.totals[k] = self.totals.get(k, 0) + v
        self.totals["calls"] += 1
        rewards = torch.where(valid, total, 0.0).float()
        return RewardResult(rewards=rewards, valid=valid, per_function=per_function, counts=counts, seconds=seconds)


def _exit_reason(worker: _Worker) -> str:
    proc = worker.proc
    if proc is None:
        return "the worker process is gone"
    try:
        code = proc.wait(timeout=1.0)  # it closed its pipe: give it a moment to finish exiting
    except subprocess.TimeoutExpired:
        code = None
    if code is None:
        return "the worker process stopped answering"
    if code < 0:
        try:
            return f"the worker process died from signal {signal.Signals(-code).name}"
        except ValueError:
            return f"the worker process died from signal {-code}"
    return f"the worker process exited with code {code}"
