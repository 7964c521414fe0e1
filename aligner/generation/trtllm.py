"""TensorRT-LLM generation backend (`trainer.ppo.trt_llm.enable=True`; GRPO: trainer.grpo.trt_llm).

TensorRT-LLM needs CUDA and cannot be installed on the CPU machines this project is developed
and tested on, so the real engine has never run here. The backend is written against
TensorRT-LLM's public LLM API (`tensorrt_llm.LLM`, `tensorrt_llm.SamplingParams`). What is
tested: importing this module never needs tensorrt_llm; asking for it without the package fails
at start-up naming the config key; and the rollout engine drives it through its real call
sequence against a stand-in `tensorrt_llm` module (tests/stand_ins/) that records the calls:
the engine is built from the exported current weights, rebuilt from the updated weights after
each policy update, shut down before training when asked, and its tokens become the rollouts.

Keys (NeMo-Aligner's names): enable; unload_engine_train (free the engine before each policy
update; the rollout engine calls unload()); engine_dir (where the exported checkpoint and engine
live; default a temporary directory); model_type (checked against the exported checkpoint's
config.json model_type); reshard (NeMo's TP-resharding for inference) is not implemented: the
engine runs at the training tensor-parallel size, and reshard=true is refused.

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
        if self.cfg.get("reshard"):
            raise ValueError(f"{ENABLE_KEY.rsplit('.', 1)[0]}.reshard=true is not implemented: the TensorRT-LLM "
                             "engine runs at the training tensor-parallel size (set reshard=false)")
        self.model_type = self.cfg.get("model_type")
        self.model = model
        self.eos_id, self.pad_id = int(eos_id), int(pad_id)
        self.max_batch_size, self.max_sequence_length = int(max_batch_size), int(max_sequence_length)
        self.tokenizer = tokenizer
        self.export_weights = export_weights
        self._llm = None
        self.builds = 0
        engine_dir = self.cfg.get("engine_dir")
        self._workdir = None if engine_dir else tempfile.TemporaryDirectory(prefix="aligner_trtllm_")
        self.engine_dir = Path(engine_dir) if engine_dir else Path(self._workdir.name)
        self.engine_dir.mkdir(parents=True, exist_ok=True)

    def _build_engine(self) -> None:
        import json

        from megatron.core import parallel_state

        checkpoint = self.engine_dir / "hf"
        self.export_weights(self.model, checkpoint)
        exported_type = json.loads((checkpoint / "config.json").read_text()).get("model_type")
        if self.model_type and exported_type != self.model_type:
            raise ValueError(f"{ENABLE_KEY.rsplit('.', 1)[0]}.model_type={self.model_type!r} but the policy exports "
                             f"as model_type {exported_type!r}: set it to {exported_type!r}")
        self.builds += 1
        self._llm = self._trtllm.LLM(
            model=str(checkpoint),
            tensor_parallel_size=parallel_state.get_tensor_model_parallel_world_size(),
            max_batch_size=self.max_batch_size,
            max_seq_len=self.max_sequence_length,
        )

    def generate(self, prompt_tokens: torch.Tensor, prompt_lengths: torch.Tensor,
                 params: SamplingParams, row_keys=None) -> GenerationOutput:
        """row_keys are not used: the engine draws its own random stream from params.seed, so its
        rollouts depend on the batching (the support matrix says so)."""
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
