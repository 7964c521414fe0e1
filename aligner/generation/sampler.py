"""Batched autoregressive sampling over a megatron-core GPTModel with a static KV cache.

Why our own loop: megatron's static engine is deprecated and its dynamic engine needs
flash-attn (not on CPU). `StaticInferenceContext` alone is stable: every attention layer keeps
its keys/values in a buffer `[max_seq, max_batch, kv_heads, head_dim]` and appends at
`context.sequence_len_offset`, a single offset for the whole batch.

That single offset shapes the scheme. All rows advance in lock-step, one position per step, and
position t of a row holds that row's t-th token (prompt or response), so the buffer is already
"prompt + response, right-padded":
  1. prefill: the first min(prompt_lengths) positions of every row in one forward (causal mask);
  2. step: feed one token per row. A row whose prompt is longer than the step position is fed
     its own prompt token (the sample drawn for it is discarded); other rows get the token just
     sampled; finished rows get pad_id, which only their own (ignored) cache entries see.
After the prefill megatron drops the causal mask (one query attends to the whole cache), which
is why steps must be exactly one token.

`generate_no_cache` runs the same loop but recomputes the full sequence each step: a slow,
obviously-correct reference the tests compare the cache against, and a fallback.
Tensor parallelism: every TP rank runs the loop; the tokens sampled on the TP source rank are
broadcast to the group, so all ranks keep identical sequences even if logits differ in the last bit.

Per-step cost (small on a GPU, dominant on CPU, where a step is hundreds of small operators):
the CPU compatibility TorchFunctionMode is suspended for the loop, the step's float32 logits are
touched as few times as the maths allows (see sampling.py), and position ids are sliced from one
precomputed tensor. None of it changes a result: tests/unit/test_generation_unchanged.py checks
tokens, stopping and log-probs bit-for-bit against the previous implementation.
"""
from __future__ import annotations

from typing import Callable

import torch

from aligner.distributed.collectives import broadcast_tensor_parallel
from aligner.generation.output import GenerationOutput
from aligner.generation.params import LENGTH_KEY, SAMPLING_KEY, SamplingParams
from aligner.generation.sampling import sample_next, suppress_eos_, token_logprobs
from aligner.generation.streams import counter_uniform

# (tokens [B, T] buffer, length) -> logits [B, V] predicting position `length` from tokens[:, :length]
NextLogits = Callable[[torch.Tensor, int], torch.Tensor]


class KVCacheSampler:
    """Sample responses for a batch of prompts from a (possibly tensor-parallel) GPTModel.

    model: the policy, a GPTModel or a DDP/Float16Module wrapping one (its weights are used as
        they are at each call, so a trainer that keeps training it needs no refit).
    eos_id, pad_id: token ids. pad_id fills after a row ends.
    max_batch_size, max_sequence_length: size of the KV cache (allocated lazily on the first
        call and reused). max_sequence_length bounds prompt + max_length.
    tokenizer: needed only for end_strings; must have `decode(ids) -> str`.
    vocab_size: if the model's output is padded beyond the tokenizer's vocabulary, logits past
        this size are dropped so padding ids are never sampled.
    """

    def __init__(self, model, eos_id: int, pad_id: int, max_batch_size: int, max_sequence_length: int,
                 tokenizer=None, vocab_size: int | None = None):
        from megatron.core import parallel_state

        if parallel_state.model_parallel_is_initialized() and \
                parallel_state.get_pipeline_model_parallel_world_size() > 1:
            raise NotImplementedError(
                "KVCacheSampler does not support pipeline parallelism: set "
                "model.pipeline_model_parallel_size=1 for the policy used for generation "
                "(or use the TensorRT-LLM backend, trainer.ppo.trt_llm.enable=True)")
        if getattr(_unwrap(model).config, "sequence_parallel", False):
            raise NotImplementedError(
                "KVCacheSampler does not support sequence parallelism: set model.sequence_parallel=False")
        if max_batch_size < 1 or max_sequence_length < 2:
            raise ValueError(f"max_batch_size={max_batch_size} must be >= 1 and "
                             f"max_sequence_length={max_sequence_length} >= 2")
        self.model = model
        self.eos_id = int(eos_id)
        self.pad_id = int(pad_id)
        self.max_batch_size = int(max_batch_size)
        self.max_sequence_length = int(max_sequence_length)
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size
        self._context = None

    # -- public API -------------------------------------------------------------------------

    def generate(self, prompt_tokens: torch.Tensor, prompt_lengths: torch.Tensor,
                 params: SamplingParams, row_keys=None) -> GenerationOutput:
        """prompt_tokens [B, P] right-padded, prompt_lengths [B] -> GenerationOutput (KV cache).

        row_keys: [B] stream keys (aligner.generation.streams.stream_key). Each row's t-th token
            then draws counter_uniform(key, t): its random draws do not depend on the other rows
            of the batch, its position in it, or the parallel layout (its samples then agree up
            to floating-point near-ties of the logits). None: one generator seeded with
            params.seed steps the whole batch.
        """
        return self._run(prompt_tokens, prompt_lengths, params, cached=True, row_keys=row_keys)

    def generate_no_cache(self, prompt_tokens: torch.Tensor, prompt_lengths: torch.Tensor,
                          params: SamplingParams, row_keys=None) -> GenerationOutput:
        """Same contract and same samples as `generate`, recomputing the whole sequence each step."""
        return self._run(prompt_tokens, prompt_lengths, params, cached=False, row_keys=row_keys)

    def release_cache(self) -> None:
        """Free the KV cache buffers (they are re-allocated on the next `generate`)."""
        self._context = None

    # -- the loop ---------------------------------------------------------------------------

    def _run(self, prompt_tokens, prompt_lengths, params: SamplingParams, cached: bool,
             row_keys=None) -> GenerationOutput:
        from aligner.compat import megatron_cpu

        if megatron_cpu.is_installed():
            megatron_cpu.enable_in_current_thread()  # the CPU layer is thread-local; servers call from threads
        inner = _unwrap(self.model)
        device = next(inner.parameters()).device
        prompt_tokens, prompt_lengths = self._check_inputs(prompt_tokens, prompt_lengths, params, device)
        if row_keys is not None:
            row_keys = torch.as_tensor(row_keys, dtype=torch.int64).to(device)
            if row_keys.shape != prompt_lengths.shape:
                raise ValueError(f"row_keys must be one key per prompt ({tuple(prompt_lengths.shape)}), "
                                 f"got shape {tuple(row_keys.shape)}")
        if cached:
            next_logits = self._cached_logits(inner, prompt_tokens.shape[0], max_sequence=int(prompt_lengths.max())
                                              + params.max_length, device=device)
        else:
            next_logits = _recomputed_logits(inner)
        was_training = self.model.training
        self.model.eval()  # megatron only uses the inference context in eval mode
        try:
            # The CPU compatibility mode (a no-op with CUDA) intercepts every torch call in Python,
            # several hundred per decode step; the inference forward and this loop need none of its
            # redirections (tests/unit/test_generation_unchanged.py and the TP=2 test check it redirects nothing here).
            with torch.no_grad(), megatron_cpu.suspended():
                return self._decode(prompt_tokens, prompt_lengths, params, next_logits, row_keys)
        finally:
            self.model.train(was_training)

    def _decode(self, prompts: torch.Tensor, prompt_lengths: torch.Tensor, params: SamplingParams,
                next_logits: NextLogits, row_keys: torch.Tensor | None = None) -> GenerationOutput:
        batch, device = prompts.shape[0], prompts.device
        max_prompt = int(prompt_lengths.max())
        min_prompt = int(prompt_lengths.min())
        total = max_prompt + params.max_length
        # The buffer is the output: prompt tokens where they are, pad everywhere else.
        tokens = torch.full((batch, total), self.pad_id, dtype=torch.long, device=device)
        in_prompt = torch.arange(max_prompt, device=device).unsqueeze(0) < prompt_lengths.unsqueeze(1)
        tokens[:, :max_prompt] = torch.where(in_prompt, prompts[:, :max_prompt], tokens[:, :max_prompt])
        logprobs = torch.zeros(batch, total - 1, dtype=torch.float32, device=device)
        response_lengths = torch.zeros(batch, dtype=torch.long, device=device)
        done = torch.zeros(batch, dtype=torch.bool, device=device)
        is_end = torch.zeros(batch, dtype=torch.bool, device=device)
        generator = _make_generator(params.seed, device) if row_keys is None else None
        # With row keys: every draw a row can need, [B, max_length], computed once (the hash is
        # ~100 small element-wise operators; per step it is one gather).
        draws = None if row_keys is None else counter_uniform(
            row_keys.repeat_interleave(params.max_length),
            torch.arange(params.max_length, device=device).repeat(batch)).view(batch, params.max_length)
        # Host-side bounds, so that steps skip work no row needs (results are the same either way):
        # a generating row has produced length - prompt_length tokens, hence below min_length only
        # while length < its prompt length + min_length, and a row reads its prompt while length <
        # its prompt length.
        suppress_until = max_prompt + params.min_length if params.min_length > 0 else 0

        length = min_prompt
        while length < total:
            logits = next_logits(tokens, length)
            if self.vocab_size is not None:
                logits = logits[..., : self.vocab_size]
            # float32 maths; for float32 models this is the model's own output tensor, which this
            # step owns and may overwrite (its EOS column, below).
            work = logits.float()
            if length >= max_prompt:
                generating = ~done
            else:
                generating = (length >= prompt_lengths) & ~done
            any_generating = bool(generating.any())
            # log-probs are of the raw logits: logsumexp before EOS suppression touches them
            logsumexp = torch.logsumexp(work, dim=-1) if any_generating else None
            eos_column = None
            if length < suppress_until:
                eos_column = suppress_eos_(work, self.eos_id, response_lengths < params.min_length)
            # Drawn for every row on every step (see sample_next); rows that are still reading
            # their prompt or are finished ignore theirs. With row keys a generating row's counter
            # is the number of tokens it has generated so far.
            uniform = None if draws is None else \
                draws.gather(1, response_lengths.clamp(max=params.max_length - 1).unsqueeze(1)).squeeze(1)
            sampled = broadcast_tensor_parallel(sample_next(work, params, generator, uniform))
            if any_generating:
                tokens[:, length] = torch.where(generating, sampled, tokens[:, length])
                step_logprobs = token_logprobs(work, sampled, logsumexp, self.eos_id, eos_column)
                logprobs[:, length - 1] = torch.where(generating, step_logprobs, logprobs[:, length - 1])
                response_lengths += generating
                ended = generating & (sampled == self.eos_id)
                if params.end_strings:
                    ended |= self._ends_with_string(tokens, prompt_lengths, response_lengths,
                                                    generating & ~ended, params.end_strings)
                is_end |= ended
                done |= ended | (generating & (response_lengths >= params.max_length))
                if bool(done.all()):
                    break
            length += 1

        out_len = int((prompt_lengths + response_lengths).max())
        return GenerationOutput(tokens=tokens[:, :out_len].contiguous(), prompt_lengths=prompt_lengths,
                                response_lengths=response_lengths, is_end=is_end,
                                generator_logprobs=logprobs[:, : out_len - 1].contiguous())

    # -- helpers ----------------------------------------------------------------------------

    def _cached_logits(self, inner, batch: int, max_sequence: int, device) -> NextLogits:
        from megatron.core.inference.contexts import StaticInferenceContext

        if self._context is None:
            self._context = StaticInferenceContext(self.max_batch_size, self.max_sequence_length)
        context = self._context
        context.reset()
        # every position id the call can need, sliced per step instead of built per step
        all_positions = torch.arange(max_sequence, device=device).unsqueeze(0).expand(batch, max_sequence)

        def next_logits(tokens: torch.Tensor, length: int) -> torch.Tensor:
            start = context.sequence_len_offset
            if start > 0 and length - start != 1:
                raise RuntimeError(f"KV-cache steps must be one token (cache at {start}, asked for {length})")
            # The static context materialises only the last position's logits: [B, 1, V].
            logits = inner(tokens[:, start:length], all_positions[:, start:length], None,
                           inference_context=context, runtime_gather_output=True)
            context.sequence_len_offset = length
            return logits[:, -1]

        return next_logits

    def _check_inputs(self, prompt_tokens, prompt_lengths, params: SamplingParams, device):
        if not isinstance(params, SamplingParams):
            raise TypeError(f"params must be a SamplingParams, got {type(params).__name__}")
        prompt_tokens = torch.as_tensor(prompt_tokens).to(device=device, dtype=torch.long)
        prompt_lengths = torch.as_tensor(prompt_lengths).to(device=device, dtype=torch.long)
        if prompt_tokens.dim() != 2 or prompt_lengths.shape != prompt_tokens.shape[:1]:
            raise ValueError(f"prompt_tokens must be [batch, seq] and prompt_lengths [batch]; got "
                             f"{tuple(prompt_tokens.shape)} and {tuple(prompt_lengths.shape)}")
        batch = prompt_tokens.shape[0]
        if batch == 0:
            raise ValueError("empty batch of prompts")
        if batch > self.max_batch_size:
            raise ValueError(f"{batch} prompts exceed the sampler's max_batch_size={self.max_batch_size}; "
                             f"lower the generation micro-batch (model.ppo.rollout_micro_batch_size)")
        if int(prompt_lengths.min()) < 1 or int(prompt_lengths.max()) > prompt_tokens.shape[1]:
            raise ValueError(f"prompt_lengths must be in [1, {prompt_tokens.shape[1]}], got "
                             f"{prompt_lengths.tolist()}")
        needed = int(prompt_lengths.max()) + params.max_length
        if needed > self.max_sequence_length:
            raise ValueError(
                f"longest prompt ({int(prompt_lengths.max())}) + {LENGTH_KEY}.max_length ({params.max_length}) "
                f"= {needed} exceeds the sampler's max_sequence_length={self.max_sequence_length} "
                f"(model.encoder_seq_length); shorten prompts or max_length")
        if params.end_strings and self.tokenizer is None:
            raise ValueError(f"{SAMPLING_KEY}.end_strings needs a tokenizer to decode responses: "
                             f"pass tokenizer= to KVCacheSampler")
        return prompt_tokens, prompt_lengths

    def _ends_with_string(self, tokens, prompt_lengths, response_lengths, rows, end_strings) -> torch.Tensor:
        """[B] bool: rows (among `rows`) whose decoded response now ends with an end string.

        Only a tail of the response is decoded: enough tokens for the longest end string even
        if every token were a single byte of a 4-byte character, plus slack for tokenizers that
        drop a leading space of the first decoded piece.
        """
        window = 4 * max(len(s) for s in end_strings) + 8
        hit = torch.zeros_like(rows)
        for row in rows.nonzero().flatten().tolist():
            stop = int(prompt_lengths[row] + response_lengths[row])
            start = max(int(prompt_lengths[row]), stop - window)
            text = self.tokenizer.decode(tokens[row, start:stop].tolist())
            hit[row] = any(text.endswith(s) for s in end_strings)
        return hit


def _recomputed_logits(inner) -> NextLogits:
    from aligner.models.gpt import causal_attention_mask, position_ids_for

    def next_logits(tokens: torch.Tensor, length: int) -> torch.Tensor:
        prefix = tokens[:, :length]
        logits = inner(prefix, position_ids_for(prefix), causal_attention_mask(length, tokens.device),
                       runtime_gather_output=True)
        return logits[:, -1]

    return next_logits


def _make_generator(seed: int | None, device: torch.device) -> torch.Generator:
    generator = torch.Generator(device=device)
    if seed is None:
        generator.seed()  # nondeterministic; TP ranks still agree through the broadcast
    else:
        generator.manual_seed(seed)
    return generator


def _unwrap(model):
    from aligner.models.gpt import unwrap

    return unwrap(model)
