"""Pluggable generation backends for PPO rollouts: ours (megatron KV cache) or TensorRT-LLM.

A trainer only talks to `GenerationBackend`: generate a batch, push new weights after an
update (`refit`), and free the backend's memory before training (`unload`).
"""
from __future__ import annotations

from typing import Any, Mapping, Protocol, runtime_checkable

import torch

from aligner.generation.output import GenerationOutput
from aligner.generation.params import SamplingParams
from aligner.generation.sampler import KVCacheSampler

TRT_LLM_KEY = "trainer.ppo.trt_llm"


@runtime_checkable
class GenerationBackend(Protocol):
    name: str

    def generate(self, prompt_tokens: torch.Tensor, prompt_lengths: torch.Tensor,
                 params: SamplingParams, row_keys=None) -> GenerationOutput:
        """prompt_tokens [B, P] right-padded, prompt_lengths [B] -> prompt + response batch.
        row_keys: [B] per-row random stream keys (see KVCacheSampler.generate), or None."""

    def refit(self, model) -> None:
        """Make the next `generate` use `model`'s current weights."""

    def unload(self) -> None:
        """Release memory held for generation (caches, engines) until the next `generate`."""


class MegatronSamplerBackend:
    """`KVCacheSampler` behind the backend interface.

    The sampler runs the trainer's own module, so it always sees the latest weights: `refit`
    only has to follow a model object that was replaced, and `unload` frees the KV cache.
    """

    name = "megatron"

    def __init__(self, model, eos_id: int, pad_id: int, max_batch_size: int, max_sequence_length: int,
                 tokenizer=None, vocab_size: int | None = None):
        self.sampler = KVCacheSampler(model, eos_id=eos_id, pad_id=pad_id, max_batch_size=max_batch_size,
                                      max_sequence_length=max_sequence_length, tokenizer=tokenizer,
                                      vocab_size=vocab_size)

    def generate(self, prompt_tokens, prompt_lengths, params: SamplingParams, row_keys=None) -> GenerationOutput:
        return self.sampler.generate(prompt_tokens, prompt_lengths, params, row_keys=row_keys)

    def refit(self, model) -> None:
        self.sampler.model = model

    def unload(self) -> None:
        self.sampler.release_cache()


def build_backend(trt_llm_cfg: Mapping[str, Any] | None, model, *, eos_id: int, pad_id: int,
                  max_batch_size: int, max_sequence_length: int, tokenizer=None,
                  vocab_size: int | None = None, export_weights=None) -> GenerationBackend:
    """Ours unless `trainer.ppo.trt_llm.enable` is true.

    export_weights: for TensorRT-LLM only, `fn(model, directory)` writing a Hugging Face
    checkpoint of the current weights (TensorRT-LLM builds its engine from one).
    """
    cfg = dict(trt_llm_cfg or {})
    enable = cfg.get("enable", False)
    if not isinstance(enable, bool):
        raise ValueError(f"{TRT_LLM_KEY}.enable must be true or false, got {enable!r}")
    if enable:
        from aligner.generation.trtllm import TRTLLMBackend

        return TRTLLMBackend(cfg, model, eos_id=eos_id, pad_id=pad_id, max_batch_size=max_batch_size,
                             max_sequence_length=max_sequence_length, tokenizer=tokenizer,
                             export_weights=export_weights)
    return MegatronSamplerBackend(model, eos_id=eos_id, pad_id=pad_id, max_batch_size=max_batch_size,
                                  max_sequence_length=max_sequence_length, tokenizer=tokenizer,
                                  vocab_size=vocab_size)
