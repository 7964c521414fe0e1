"""Keep a second set of weights for the same network parked in host memory and swap it in.

The frozen reference policy (DPO, PPO actor) and the reward model next to a critic cost no
accelerator memory and no optimizer state this way: one network, two weight sets. Swapping
copies in place, so DDP grad buffers, optimizer main params and parameter identity are untouched.
"""
from __future__ import annotations

import contextlib
from typing import Iterator

import torch

from aligner.models.gpt import unwrap


def _tensors(model) -> dict[str, torch.Tensor]:
    """Parameters and floating buffers of this rank's shard, by name."""
    base = unwrap(model)
    named = dict(base.named_parameters())
    named.update({k: v for k, v in base.named_buffers() if v.is_floating_point()})
    return named


class ParkedWeights:
    """A host-memory copy of a model's weights that can be swapped into the live model."""

    def __init__(self, model, skip_prefixes: tuple[str, ...] = ()):
        pin = torch.cuda.is_available()
        self.skip_prefixes = skip_prefixes
        self.host = {
            name: tensor.detach().to("cpu", copy=True).pin_memory() if pin else tensor.detach().to("cpu", copy=True)
            for name, tensor in _tensors(model).items()
            if not name.startswith(skip_prefixes)
        }
        self._scratch: dict[str, torch.Tensor] = {}

    @classmethod
    def from_state(cls, model, state: dict[str, torch.Tensor], skip_prefixes: tuple[str, ...] = ()):
        parked = cls.__new__(cls)
        parked.skip_prefixes = skip_prefixes
        live = _tensors(model)
        parked.host = {}
        for name, tensor in state.items():
            if name not in live:
                raise KeyError(f"parked weight {name!r} is not a parameter of the live model")
            if tensor.shape != live[name].shape:
                raise ValueError(f"parked weight {name!r} has shape {tuple(tensor.shape)}, "
                                 f"live model has {tuple(live[name].shape)}")
            parked.host[name] = tensor.detach().to("cpu", copy=True)
        parked._scratch = {}
        return parked

    @torch.no_grad()
    def _copy(self, sources: dict[str, torch.Tensor], targets: dict[str, torch.Tensor]) -> None:
        for name, target in targets.items():
            target.copy_(sources[name], non_blocking=True)
        if torch.cuda.is_available():
            torch.cuda.synchronize()

    @contextlib.contextmanager
    def swapped_in(self, model) -> Iterator[None]:
        """Inside the block the model computes with the parked weights; restored on exit.

        The parked weights are frozen (reference policy, reward model), so they are only ever
        read: the live weights go to a scratch buffer and come back from it (3 copies, not 6).
        Nothing inside the block may update the model's weights.
        """
        live = {name: tensor for name, tensor in _tensors(model).items() if name in self.host}
        for name, parked in self.host.items():
            if name not in self._scratch:
                self._scratch[name] = torch.empty_like(parked)
        self._copy(live, self._scratch)
        self._copy(self.host, live)
        try:
            yield
        finally:
            self._copy(self._scratch, live)

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.host.values())
