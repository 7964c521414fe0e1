"""Move optimizer states (Adam's moments) off the accelerator while generating, and back.

Works on megatron-core's optimizers (plain, mixed-precision, distributed, chained), not only
apex's: it walks the torch optimizers they wrap and swaps each state tensor's storage. Tensor
identity is kept (`.data` is reassigned), so the optimizer needs no re-initialisation, and the
round trip is bitwise lossless.

On a CUDA machine states go to pinned host memory. On a CPU-only machine the round trip is
still real: states are copied into one flat host buffer and their original storage is freed,
which is what frees memory for generation on a GPU and is what the tests check.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


def torch_optimizers(optimizer) -> list[torch.optim.Optimizer]:
    parts = getattr(optimizer, "chained_optimizers", [optimizer])
    return [getattr(part, "optimizer", part) for part in parts]


@dataclass
class _Slot:
    tensor: torch.Tensor
    device: torch.device
    offset: int
    numel: int
    shape: torch.Size


class OptimizerStateOffloader:
    """`offload()` before generation, `restore()` before the PPO update (model.ppo.offload_adam_states)."""

    def __init__(self, optimizer, offload_device: str | torch.device = "cpu"):
        self.optimizer = optimizer
        self.offload_device = torch.device(offload_device)
        self._buffers: dict[torch.dtype, torch.Tensor] = {}
        self._slots: dict[torch.dtype, list[_Slot]] = {}
        self.offloaded = False

    def _state_tensors(self):
        for opt in torch_optimizers(self.optimizer):
            for state in opt.state.values():
                for value in state.values():
                    if isinstance(value, torch.Tensor) and value.dim() > 0:
                        yield value

    @torch.no_grad()
    def offload(self) -> int:
        """Returns the number of bytes moved (0 if there is no state yet, e.g. before step 1)."""
        if self.offloaded:
            return 0
        tensors = list(self._state_tensors())
        by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
        for tensor in tensors:
            by_dtype.setdefault(tensor.dtype, []).append(tensor)
        moved = 0
        pin = torch.cuda.is_available() and self.offload_device.type == "cpu"
        for dtype, group in by_dtype.items():
            total = sum(t.numel() for t in group)
            buffer = torch.empty(total, dtype=dtype, device=self.offload_device, pin_memory=pin)
            slots, offset = [], 0
            for tensor in group:
                n = tensor.numel()
                buffer[offset:offset + n].copy_(tensor.reshape(-1), non_blocking=pin)
                slots.append(_Slot(tensor, tensor.device, offset, n, tensor.shape))
                offset += n
            self._buffers[dtype], self._slots[dtype] = buffer, slots
            moved += total * buffer.element_size()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        for slots in self._slots.values():
            for slot in slots:  # free the original storage; identity of the tensor object stays
                slot.tensor.data = torch.empty(0, dtype=slot.tensor.dtype, device=slot.device)
        self.offloaded = True
        return moved

    @torch.no_grad()
    def restore(self) -> None:
        if not self.offloaded:
            return
        for dtype, slots in self._slots.items():
            buffer = self._buffers[dtype]
            for slot in slots:
                restored = torch.empty(slot.shape, dtype=dtype, device=slot.device)
                restored.reshape(-1).copy_(buffer[slot.offset:slot.offset + slot.numel], non_blocking=True)
                slot.tensor.data = restored
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self._buffers.clear()
        self._slots.clear()
        self.offloaded = False
