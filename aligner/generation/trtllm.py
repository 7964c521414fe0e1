"""TensorRT-LLM generation backend (`trainer.ppo.trt_llm.enable=True`): an UNTESTED sketch.

TensorRT-LLM needs CUDA and cannot be installed on the CPU machines this project is developed
and tested on, so nothing here has ever run. It is kept small and written against TensorRT-LLM's
public LLM API (`tensorrt_llm.LLM`, `tensorrt_llm.SamplingParams`) so that someone with a GPU
can finish it. What is tested: importing this module never needs tensorrt_llm, and asking
for this backend without it fails at start-up with an error naming the config key.

How it is meant to work (NeMo-Aligner does the same with its in-memory refit):
  build:  write the trainer's current weights as a Hugging Face checkpoint (`export_weights`)
          and let TensorRT-LLM build an engine from it;
  refit:  after a policy update, export again and rebuild (the public API has no in-place
          weight swap; NeMo-Aligner's faster refit uses internal APIs);
  unload: drop the engine and its KV cache so training gets the GPU memory back.
"""
from __future__ import annotations

import gc
import tempfile
from pathlib import Path
from typing import Any, Callable, Mapping

import torch

from aligner.compat.optional import require
from aligner.generation.output import GenerationOutput
from aligner.generation.params import SamplingParams

ENABLE_KEY = "trainer.ppo.trt_llm.enable"


class TRTLLMBackend:
    name = "tensorrt_llm"

    def __init__(self, trt_llm_cfg: Mapping[str, Any], model, *, eos_id: int, pad_id: int, max_batch_size: int,
                 max_sequence_length: int, tokenizer=None,
                 export_weights: Callable[[Any, Path], None] | None = None):
        self._trtllm = require("tensorrt_llm", ENABLE_KEY)  # raises MissingOptionalDependency if absent
        if export_weights is None:
            raise ValueError(f"{ENABLE_KEY}=True needs a weight exporter (export_weights=fn(model, dir) "
                             f"writing a Hugging Face checkpoint) to build the TensorRT-LLM engine")
        self.cfg = dict(trt_llm_cfg)
        self.model = model
        self.eos_id, self.pad_id = int(eos_id), int(pad_id)
        self.max_batch_size, self.max_sequence_length = int(max_batch_size), int(max_sequence_length)
        self.tokenizer = tokenizer
        self.export_weights = export_weights
        self._llm = None
        self._workdir = tempfile.TemporaryDirectory(prefix="aligner_trtllm_")

    def _build_engine(self) -> None:
        from megatron.core import parallel_state

        checkpoint = Path(self._workdir.name) / "hf"
        self.export_weights(self.model, checkpoint)
        self._llm = self._trtllm.LLM(
            model=str(checkpoint),
            tensor_parallel_size=parallel_state.get_tensor_model_parallel_world_size(),
            max_batch_size=self.max_batch_size,
            max_seq_len=self.max_sequence_length,
        )

    def generate(self, prompt_tokens: torch.Tensor, prompt_lengths: torch.Tensor,
                 params: SamplingParams) -> GenerationOutput:
        if self._llm is None:
            self._build_engine()
        trt_params = self._trtllm.SamplingParams(
            max_tokens=params.max_length, min_tokens=params.min_length,
            temperature=None if params.greedy else params.temperature,
            top_k=1 if params.greedy else (params.top_k or None),
            top_p=None if params.greedy else params.top_p,
            end_id=self.eos_id, pad_id=self.pad_id, seed=params.seed,
            stop=list(params.end_strings) or None, include_stop_str_in_output=True,
            logprobs=0,  # log-prob of the sampled token only; RAW mode = the model's own distribution
        )
        prompts = [row[: int(n)].tolist() for row, n in zip(prompt_tokens, prompt_lengths)]
        results = self._llm.generate(prompts, trt_params)
        return _to_output(prompts, results, self.pad_id)

    def refit(self, model) -> None:
        """Rebuild from `model`'s current weights at the next `generate`."""
        self.model = model
        self.unload()

    def unload(self) -> None:
        if self._llm is not None:
            self._llm.shutdown()
            self._llm = None
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()


def _to_output(prompts: list[list[int]], results, pad_id: int) -> GenerationOutput:
    """TensorRT-LLM RequestOutputs -> our padded GenerationOutput."""
    rows, logprob_rows, is_end = [], [], []
    for prompt, result in zip(prompts, results):
        completion = result.outputs[0]
        response = list(completion.token_ids)
        rows.append(prompt + response)
        logprobs = [lp if isinstance(lp, float) else _sampled_logprob(lp, tok)
                    for lp, tok in zip(completion.logprobs or [0.0] * len(response), response)]
        logprob_rows.append([0.0] * (len(prompt) - 1) + logprobs)
        is_end.append(completion.finish_reason == "stop")
    width = max(len(r) for r in rows)
    tokens = torch.full((len(rows), width), pad_id, dtype=torch.long)
    generator_logprobs = torch.zeros(len(rows), width - 1, dtype=torch.float32)
    for i, (row, lps) in enumerate(zip(rows, logprob_rows)):
        tokens[i, : len(row)] = torch.tensor(row)
        generator_logprobs[i, : len(lps)] = torch.tensor(lps)
    prompt_lengths = torch.tensor([len(p) for p in prompts])
    return GenerationOutput(tokens=tokens, prompt_lengths=prompt_lengths,
                            response_lengths=torch.tensor([len(r) for r in rows]) - prompt_lengths,
                            is_end=torch.tensor(is_end), generator_logprobs=generator_logprobs)


def _sampled_logprob(entry: Mapping[int, Any], token: int) -> float:
    """TensorRT-LLM gives {token_id: Logprob(logprob=...)} per position; take the sampled one."""
    value = entry[token]
    return float(getattr(value, "logprob", value))
