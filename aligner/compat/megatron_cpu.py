"""Let megatron-core (0.16.x) run on a CPU-only torch build with the gloo backend.

megatron-core assumes CUDA in a few ways: it passes `torch.cuda.current_device()` as a device,
forks the CUDA RNG for tensor-parallel dropout, hard-codes `device="cuda"` / `.cuda()` in
pipeline schedules, grad-norm buffers and checkpoint exchange, and asserts that parameters
report `torch.cuda.FloatTensor`. On CPU we redirect each of those to the CPU.

Everything here is a no-op when CUDA is available, so GPU/NCCL clusters run megatron unchanged.
The redirection of hard-coded "cuda" devices is a `TorchFunctionMode`, whose stack is
thread-local: a thread that runs model code must call `enable_in_current_thread()`. The mode
sees every torch call from Python, which costs interpreter time on hot loops of small operators;
code that is known to pass no "cuda" device, `.cuda()` or pinning (the KV-cache sampler's decode
loop) can run under `suspended()`.

Re-run the CPU test matrix whenever megatron-core is upgraded: this touches its internals.
"""
from __future__ import annotations

import contextlib
import logging
import threading
import time

import torch
from torch.overrides import TorchFunctionMode

_lock = threading.Lock()
_installed = False
_thread_state = threading.local()


def cpu_compat_needed() -> bool:
    """True on machines without CUDA, where megatron-core needs the redirections below."""
    return not torch.cuda.is_available()


def install() -> bool:
    """Apply the CPU redirections once per process (and enable them for the calling thread).

    Returns True when the layer is active, False when CUDA is present and nothing was changed.
    """
    global _installed
    if not cpu_compat_needed():
        return False
    with _lock:
        if not _installed:
            _patch_torch_cuda()
            _patch_megatron_rng()
            _patch_megatron_moe_splits()
            _silence_cpu_rng_warning()
            _installed = True
    enable_in_current_thread()
    return True


def enable_in_current_thread() -> None:
    """Enter the cuda→cpu device mode in this thread (the mode stack is thread-local)."""
    if not cpu_compat_needed() or getattr(_thread_state, "mode", None) is not None:
        return
    mode = _CudaDeviceToCpu()
    mode.__enter__()
    _thread_state.mode = mode


def is_installed() -> bool:
    return _installed


@contextlib.contextmanager
def suspended():
    """Run a block without this thread's cuda→cpu device mode; re-enter it afterwards.

    A no-op where the mode is not active in this thread (always so with CUDA, where the mode is
    never entered) and where another mode was pushed on top of it (only the top of the mode
    stack can be popped; that other mode is left alone, and so is ours). Only for code that
    needs none of the redirections: without them a hard-coded "cuda" device fails loudly on a
    CPU-only torch build, it is never silently misplaced.
    """
    mode = getattr(_thread_state, "mode", None)
    if mode is None:
        yield
        return
    from torch.overrides import _get_current_function_mode_stack, _pop_mode_temporarily

    stack = _get_current_function_mode_stack()
    if not stack or stack[-1] is not mode:
        yield
        return
    with _pop_mode_temporarily():
        yield


def _patch_torch_cuda() -> None:
    # megatron uses current_device() as the `device=` of new tensors: "cpu" makes those CPU tensors.
    torch.cuda.current_device = lambda: "cpu"
    # The tensor-parallel RNG tracker saves/restores the "CUDA" generator; use the CPU one.
    # torch.manual_seed itself calls cuda.manual_seed_all, so seed the default generator directly
    # (calling torch.manual_seed here would recurse).
    torch.cuda.get_rng_state = lambda device="cuda": torch.get_rng_state()
    torch.cuda.set_rng_state = lambda new_state, device="cuda": torch.set_rng_state(new_state)
    torch.cuda.manual_seed = lambda seed: torch.default_generator.manual_seed(int(seed))
    torch.cuda.synchronize = lambda device=None: None
    torch.cuda.empty_cache = lambda: None
    torch.cuda.Event = _HostEvent
    torch.cuda.Stream = _HostStream
    torch.cuda.current_stream = lambda device=None: _HostStream()
    torch.cuda.stream = lambda stream=None: contextlib.nullcontext()

    import torch.cuda.nvtx as nvtx

    class _NoNvtx:
        def __getattr__(self, name):
            return lambda *args, **kwargs: 0

    nvtx._nvtx = _NoNvtx()


def _patch_megatron_rng() -> None:
    from megatron.core.tensor_parallel import random as tp_random

    tp_random._get_cuda_rng_state = (
        lambda device="cuda", clone=False, graph_safe=False: torch.get_rng_state()
    )
    tp_random._set_cuda_rng_state = (
        lambda new_state, device=-1, graph_safe=False: torch.set_rng_state(new_state)
    )


def _patch_megatron_moe_splits() -> None:
    # The MoE all-to-all dispatcher turns its split sizes into host numpy arrays only when they
    # are CUDA tensors; on CPU they stay tensors, which all_to_all_single rejects (expert parallelism).
    from megatron.core.transformer.moe import moe_utils, token_dispatcher

    original = moe_utils.maybe_move_tensor_to_cpu

    def to_host(tensor, as_numpy=False, record_stream=False):
        if as_numpy and torch.is_tensor(tensor) and not tensor.is_cuda:
            return tensor.numpy()
        return original(tensor, as_numpy=as_numpy, record_stream=record_stream)

    moe_utils.maybe_move_tensor_to_cpu = to_host
    token_dispatcher.maybe_move_tensor_to_cpu = to_host


def _silence_cpu_rng_warning() -> None:
    # With the "CUDA" RNG mapped onto the CPU RNG, every dropout fork changes the CPU RNG: expected.
    class _DropCpuRngWarning(logging.Filter):
        def filter(self, record: logging.LogRecord) -> bool:
            return "CPU RNG state changed within GPU RNG context" not in record.getMessage()

    logging.getLogger("megatron.core.tensor_parallel.random").addFilter(_DropCpuRngWarning())


def _to_cpu_device(device):
    if isinstance(device, str) and device.startswith("cuda"):
        return "cpu"
    if isinstance(device, torch.device) and device.type == "cuda":
        return torch.device("cpu")
    if isinstance(device, int):  # a bare CUDA ordinal
        return "cpu"
    return device


class _CudaDeviceToCpu(TorchFunctionMode):
    """Rewrites 'cuda' device arguments to 'cpu' and makes `.cuda()`/pinning no-ops."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.Tensor.cuda or func is torch.Tensor.pin_memory:
            return args[0]
        if func is torch.Tensor.type and len(args) == 1 and not kwargs:
            # megatron's optimizer asserts params are 'torch.cuda.*Tensor'.
            name = func(*args)
            return name if "cuda" in name else name.replace("torch.", "torch.cuda.", 1)
        if "device" in kwargs:
            kwargs["device"] = _to_cpu_device(kwargs["device"])
        if kwargs.get("pin_memory"):
            kwargs["pin_memory"] = False
        if func is torch.Tensor.to and len(args) > 1 and not isinstance(args[1], (torch.dtype, torch.Tensor)):
            args = (args[0], _to_cpu_device(args[1])) + tuple(args[2:])
        return func(*args, **kwargs)


class _HostEvent:
    """Stand-in for torch.cuda.Event: wall-clock timing on the host."""

    def __init__(self, enable_timing=False, blocking=False, interprocess=False, **kwargs):
        self._t = None

    def record(self, stream=None):
        self._t = time.perf_counter()

    def synchronize(self):
        pass

    def wait(self, stream=None):
        pass

    def query(self):
        return True

    def elapsed_time(self, end: "_HostEvent") -> float:
        return (end._t - self._t) * 1000.0


class _HostStream:
    """Stand-in for torch.cuda.Stream: work on CPU is already ordered."""

    def __init__(self, *args, **kwargs):
        pass

    def wait_event(self, event):
        pass

    def wait_stream(self, stream):
        pass

    def record_event(self, event=None):
        event = event or _HostEvent()
        event.record()
        return event

    def synchronize(self):
        pass

    def query(self):
        return True
