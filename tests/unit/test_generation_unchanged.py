"""The sampler's speed work changed no result: bit-for-bit against the previous implementation.

`legacy_*` and `LegacySampler` below are frozen copies of aligner/generation/sampling.py and
the decode loop of sampler.py as they were before the per-step work was trimmed (EOS suppression
in place, no division at temperature 1, no copies for disabled filters, host-side bounds, the CPU
compatibility mode suspended in the loop). Every comparison is `torch.equal`: the same tokens
for the same seed, the same stopping, and the very same generator log-probs (the PPO actor
compares those with the trainer's). Do not "fix" the legacy code: it is the reference.
"""
import contextlib
import dataclasses
import threading

import pytest
import torch
from torch.overrides import TorchFunctionMode, _get_current_function_mode_stack

from aligner.compat import megatron_cpu
from aligner.distributed.collectives import broadcast_tensor_parallel
from aligner.distributed.setup import initialize
from aligner.generation import sampling
from aligner.generation.output import GenerationOutput
from aligner.generation.params import SamplingParams
from aligner.generation.sampler import KVCacheSampler, _make_generator, _recomputed_logits, _unwrap
from aligner.models.config import ModelConfig
from aligner.models.gpt import build_gpt

# ------------------------------------------------------------------ frozen previous implementation


def legacy_filter_logits(logits, top_k=0, top_p=1.0):
    out = logits.clone()
    vocab = out.shape[-1]
    if 0 < top_k < vocab:
        kth_largest = torch.topk(out, top_k, dim=-1).values[..., -1:]
        out = out.masked_fill(out < kth_largest, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(out, dim=-1, descending=True)
        probs = torch.softmax(sorted_logits.float(), dim=-1)
        mass_before = torch.cumsum(probs, dim=-1) - probs
        drop_sorted = mass_before >= top_p
        drop_sorted[..., 0] = False
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        out = out.masked_fill(drop, float("-inf"))
    return out


def legacy_suppress_eos(logits, eos_id, step, min_length):
    if min_length <= 0:
        return logits
    too_short = torch.as_tensor(step, device=logits.device) < min_length
    if not too_short.any():
        return logits
    out = logits.clone()
    column = out[..., eos_id]
    out[..., eos_id] = torch.where(too_short, torch.full_like(column, float("-inf")), column)
    return out


def legacy_sample_from_probs(probs, uniform):
    cdf = torch.cumsum(probs.double(), dim=-1)
    target = (uniform.double() * cdf[..., -1]).unsqueeze(-1)
    index = torch.searchsorted(cdf, target, right=True).squeeze(-1)
    return index.clamp_(max=probs.shape[-1] - 1)


def legacy_sample_next(logits, params, generator):
    uniform = torch.rand(logits.shape[0], generator=generator, device=logits.device)
    if params.greedy:
        return logits.argmax(dim=-1)
    scaled = logits.float() / params.temperature
    filtered = legacy_filter_logits(scaled, params.top_k, params.top_p)
    return legacy_sample_from_probs(torch.softmax(filtered, dim=-1), uniform)


def legacy_token_logprobs(logits, tokens):
    logits = logits.float()
    return logits.gather(-1, tokens.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(logits, dim=-1)


class LegacySampler(KVCacheSampler):
    """KVCacheSampler with the previous loop, maths and KV-cache calls (and the CPU mode left on)."""

    def _run(self, prompt_tokens, prompt_lengths, params, cached, row_keys=None):
        assert row_keys is None, "the legacy loop predates per-row streams"
        if megatron_cpu.is_installed():
            megatron_cpu.enable_in_current_thread()
        inner = _unwrap(self.model)
        device = next(inner.parameters()).device
        prompt_tokens, prompt_lengths = self._check_inputs(prompt_tokens, prompt_lengths, params, device)
        next_logits = self._legacy_cached_logits(inner) if cached else _recomputed_logits(inner)
        was_training = self.model.training
        self.model.eval()
        try:
            with torch.no_grad():
                return self._legacy_decode(prompt_tokens, prompt_lengths, params, next_logits)
        finally:
            self.model.train(was_training)

    def _legacy_decode(self, prompts, prompt_lengths, params, next_logits):
        batch, device = prompts.shape[0], prompts.device
        max_prompt = int(prompt_lengths.max())
        total = max_prompt + params.max_length
        tokens = torch.full((batch, total), self.pad_id, dtype=torch.long, device=device)
        in_prompt = torch.arange(max_prompt, device=device).unsqueeze(0) < prompt_lengths.unsqueeze(1)
        tokens[:, :max_prompt] = torch.where(in_prompt, prompts[:, :max_prompt], tokens[:, :max_prompt])
        logprobs = torch.zeros(batch, total - 1, dtype=torch.float32, device=device)
        response_lengths = torch.zeros(batch, dtype=torch.long, device=device)
        done = torch.zeros(batch, dtype=torch.bool, device=device)
        is_end = torch.zeros(batch, dtype=torch.bool, device=device)
        generator = _make_generator(params.seed, device)

        length = int(prompt_lengths.min())
        while not bool(done.all()) and length < total:
            logits = next_logits(tokens, length)
            if self.vocab_size is not None:
                logits = logits[..., : self.vocab_size]
            allowed = legacy_suppress_eos(logits, self.eos_id, response_lengths, params.min_length)
            sampled = broadcast_tensor_parallel(legacy_sample_next(allowed, params, generator))
            generating = (length >= prompt_lengths) & ~done
            if bool(generating.any()):
                tokens[:, length] = torch.where(generating, sampled, tokens[:, length])
                logprobs[:, length - 1] = torch.where(generating, legacy_token_logprobs(logits, sampled),
                                                      logprobs[:, length - 1])
                response_lengths += generating.long()
                ended = generating & (sampled == self.eos_id)
                if params.end_strings:
                    ended |= self._legacy_ends_with_string(tokens, prompt_lengths, response_lengths,
                                                           generating & ~ended, params.end_strings)
                is_end |= ended
                done |= ended | (generating & (response_lengths >= params.max_length))
            length += 1

        out_len = int((prompt_lengths + response_lengths).max())
        return GenerationOutput(tokens=tokens[:, :out_len].contiguous(), prompt_lengths=prompt_lengths,
                                response_lengths=response_lengths, is_end=is_end,
                                generator_logprobs=logprobs[:, : out_len - 1].contiguous())

    def _legacy_cached_logits(self, inner):
        from megatron.core.inference.contexts import StaticInferenceContext

        context = StaticInferenceContext(self.max_batch_size, self.max_sequence_length)

        def next_logits(tokens, length):
            start = context.sequence_len_offset
            chunk = tokens[:, start:length]
            positions = torch.arange(start, length, device=tokens.device).unsqueeze(0).expand_as(chunk)
            logits = inner(chunk, positions, None, inference_context=context, runtime_gather_output=True)
            context.sequence_len_offset = length
            return logits[:, -1]

        return next_logits

    def _legacy_ends_with_string(self, tokens, prompt_lengths, response_lengths, rows, end_strings):
        window = 4 * max(len(s) for s in end_strings) + 8
        hit = torch.zeros_like(rows)
        for row in rows.nonzero().flatten().tolist():
            stop = int(prompt_lengths[row] + response_lengths[row])
            start = max(int(prompt_lengths[row]), stop - window)
            text = self.tokenizer.decode(tokens[row, start:stop].tolist())
            hit[row] = any(text.endswith(s) for s in end_strings)
        return hit


# ------------------------------------------------------------------------------- sampling maths

MATHS_PARAMS = [
    SamplingParams(),  # temperature 1, no filters: the fast path
    SamplingParams(temperature=0.7),
    SamplingParams(temperature=1.0, top_k=5),
    SamplingParams(temperature=1.0, top_p=0.8),
    SamplingParams(temperature=0.7, top_k=20, top_p=0.9),
    SamplingParams(temperature=1.7, top_k=1),
    SamplingParams(temperature=0.5, top_k=200),  # k >= vocab: disabled
    SamplingParams(greedy=True, temperature=0.3, top_k=3),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("params", MATHS_PARAMS, ids=lambda p: f"t{p.temperature}-k{p.top_k}-p{p.top_p}-g{p.greedy}")
def test_sample_next_draws_the_legacy_tokens(params, dtype):
    gen = torch.Generator().manual_seed(17)
    for trial in range(20):
        logits = (torch.randn(9, 100, generator=gen) * (1 + trial % 4)).to(dtype)
        logits[0, :] = 0.5  # an all-tie row
        logits[1, 3] = float("-inf")
        before = logits.clone()
        new_gen, old_gen = torch.Generator().manual_seed(trial), torch.Generator().manual_seed(trial)
        got = sampling.sample_next(logits, params, new_gen)
        assert torch.equal(got, legacy_sample_next(logits, params, old_gen)), trial
        assert torch.equal(new_gen.get_state(), old_gen.get_state())
        assert torch.equal(logits, before)  # the public function never writes its input


@pytest.mark.parametrize("top_k,top_p", [(0, 1.0), (4, 1.0), (0, 0.7), (6, 0.5), (1, 0.01), (99, 0.999)])
def test_filter_logits_equals_legacy_in_and_out_of_place(top_k, top_p):
    logits = torch.randn(12, 60, generator=torch.Generator().manual_seed(top_k + 7)) * 3
    logits[0] = 1.0
    expected = legacy_filter_logits(logits, top_k, top_p)
    before = logits.clone()
    out = sampling.filter_logits(logits, top_k, top_p)
    assert torch.equal(out, expected) and out is not logits
    assert torch.equal(logits, before)
    work = logits.clone()
    assert sampling.filter_logits(work, top_k, top_p, inplace=True) is work
    assert torch.equal(work, expected)


def test_sample_from_probs_equals_legacy():
    gen = torch.Generator().manual_seed(5)
    for vocab in (3, 97, 8192):
        probs = torch.softmax(torch.randn(16, vocab, generator=gen) * 4, dim=-1)
        probs[0, : vocab // 2] = 0.0
        uniform = torch.rand(16, generator=gen)
        uniform[1] = 1.0 - 2 ** -24
        assert torch.equal(sampling.sample_from_probs(probs, uniform), legacy_sample_from_probs(probs, uniform))
    # a tail that float32 accumulation would lose (1 + 1e-8 == 1 in float32): only a float64 CDF finds it
    probs = torch.full((2, 4097), 1e-8)
    probs[:, 0] = 1.0
    uniform = torch.tensor([1.0 - 1e-5, 0.5])
    got = sampling.sample_from_probs(probs, uniform)
    assert torch.equal(got, legacy_sample_from_probs(probs, uniform))
    assert 3000 < int(got[0]) < 3200 and int(got[1]) == 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_in_place_eos_suppression_keeps_raw_logprobs_and_legacy_draws(dtype):
    eos = 4
    gen = torch.Generator().manual_seed(8)
    logits = (torch.randn(6, 30, generator=gen) * 3).to(dtype)
    logits[:, eos] += 5.0  # EOS likely: suppression decides the draws
    steps = torch.tensor([0, 5, 1, 2, 9, 0])
    params = SamplingParams(temperature=0.9, top_p=0.95, min_length=2)
    old_gen, new_gen = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    expected_tokens = legacy_sample_next(legacy_suppress_eos(logits, eos, steps, 2), params, old_gen)
    assert torch.equal(sampling.suppress_eos(logits, eos, steps, 2), legacy_suppress_eos(logits, eos, steps, 2))
    work = logits.to(torch.float32, copy=True)  # the sampler's step owns its float32 logits
    logsumexp = torch.logsumexp(work, dim=-1)
    column = sampling.suppress_eos_(work, eos, steps < 2)
    tokens = sampling.sample_next(work, params, new_gen)
    assert torch.equal(tokens, expected_tokens)
    # log-probs of the raw logits, also for EOS itself on a suppressed row
    for picked in (tokens, torch.full_like(tokens, eos), torch.arange(6)):
        assert torch.equal(sampling.token_logprobs(work, picked, logsumexp, eos, column),
                           legacy_token_logprobs(logits, picked))
    assert torch.equal(sampling.token_logprobs(logits, tokens), legacy_token_logprobs(logits, tokens))


# ------------------------------------------------------------------------------- whole sampler

CONFIG = ModelConfig(arch="llama", vocab_size=96, hidden_size=48, ffn_hidden_size=96, num_layers=2,
                     num_attention_heads=4, num_query_groups=2, max_position_embeddings=64)
EOS, PAD = 7, 0
LENGTHS = [3, 9, 5, 1, 7, 2]


class CharTokenizer:
    def decode(self, ids, skip_special_tokens=False):
        return "".join(chr(0x100 + int(t)) for t in ids)


def eos_bias_hook(value):
    def hook(module, inputs, output):
        logits, bias = output
        logits = logits.clone()
        logits[..., EOS] += value
        return logits, bias
    return hook


def peaked(model, eos_bias=2.0):
    with torch.no_grad():
        model.output_layer.weight.mul_(15.0)
    model.output_layer.register_forward_hook(eos_bias_hook(eos_bias))
    return model


@pytest.fixture(scope="module")
def models():
    initialize(1, 1, seed=21)
    return {"fp32": peaked(build_gpt(CONFIG, torch.float32)),
            "bf16": peaked(build_gpt(CONFIG, torch.bfloat16)),
            "local": peaked(build_gpt(dataclasses.replace(CONFIG, attention_backend="local"), torch.float32)),
            "gpt2": peaked(build_gpt(ModelConfig(arch="gpt2", vocab_size=96, hidden_size=32, ffn_hidden_size=64,
                                                 num_layers=2, num_attention_heads=4, max_position_embeddings=64),
                                     torch.float32))}


@pytest.fixture(scope="module")
def prompts():
    gen = torch.Generator().manual_seed(11)
    tokens = torch.randint(1, CONFIG.vocab_size, (len(LENGTHS), max(LENGTHS)), generator=gen)
    tokens[torch.arange(tokens.shape[1]) >= torch.tensor(LENGTHS).unsqueeze(1)] = 55
    return tokens, torch.tensor(LENGTHS)


SAMPLER_PARAMS = {
    "default": SamplingParams(max_length=12, seed=1),
    "tempered-top-k-top-p": SamplingParams(temperature=0.7, top_k=20, top_p=0.9, min_length=3, max_length=12,
                                           seed=123),
    "top-k": SamplingParams(temperature=1.3, top_k=5, min_length=0, max_length=12, seed=2),
    "top-p": SamplingParams(top_p=0.8, min_length=0, max_length=12, seed=3),
    "greedy-min-length": SamplingParams(greedy=True, min_length=4, max_length=10),
    "forced-full-length": SamplingParams(min_length=10, max_length=10, seed=4),  # the benchmark's shape
    "no-eos-suppression": SamplingParams(temperature=1.0, min_length=0, max_length=12, seed=5),
}


def assert_same(new, old):
    for field in ("tokens", "prompt_lengths", "response_lengths", "is_end", "generator_logprobs"):
        assert torch.equal(getattr(new, field), getattr(old, field)), field


def both(model, **kw):
    kw = dict(eos_id=EOS, pad_id=PAD, max_batch_size=8, max_sequence_length=40, **kw)
    return KVCacheSampler(model, **kw), LegacySampler(model, **kw)


@pytest.mark.parametrize("cached", [True, False], ids=["kv-cache", "no-cache"])
@pytest.mark.parametrize("kind", list(SAMPLER_PARAMS))
def test_sampler_equals_legacy(models, prompts, kind, cached):
    new, old = both(models["fp32"])
    params = SAMPLER_PARAMS[kind]
    run = (lambda s: s.generate(*prompts, params)) if cached else (lambda s: s.generate_no_cache(*prompts, params))
    out = run(new)
    assert_same(out, run(old))
    if kind != "forced-full-length":
        assert out.is_end.any(), "EOS bias too weak: the comparison would not cover stopping"
    # equal prompt lengths take the other host-side branch (no row reads its prompt)
    same = (prompts[0][:, :4], torch.full((len(LENGTHS),), 4))
    assert_same(new.generate(*same, params), old.generate(*same, params))


@pytest.mark.parametrize("name", ["bf16", "local", "gpt2"])
def test_sampler_equals_legacy_other_models(models, prompts, name):
    new, old = both(models[name])
    for params in (SAMPLER_PARAMS["tempered-top-k-top-p"], SAMPLER_PARAMS["greedy-min-length"],
                   SAMPLER_PARAMS["forced-full-length"]):
        assert_same(new.generate(*prompts, params), old.generate(*prompts, params))


def test_sampler_equals_legacy_end_strings_and_vocab_size(models, prompts):
    tok = CharTokenizer()
    new, old = both(models["fp32"], tokenizer=tok)
    free = new.generate(*prompts, SamplingParams(max_length=14, min_length=0, seed=9))
    n = LENGTHS[1]
    end = tok.decode(free.tokens[1, n + 2:n + 4].tolist())
    params = SamplingParams(max_length=14, min_length=2, seed=9, end_strings=[end, "\u0000never"])
    out = new.generate(*prompts, params)
    assert_same(out, old.generate(*prompts, params))
    assert bool(out.is_end[1]) and int(out.response_lengths[1]) <= 4
    new, old = both(models["fp32"], vocab_size=40)
    for params in (SAMPLER_PARAMS["default"], SAMPLER_PARAMS["greedy-min-length"]):
        assert_same(new.generate(*prompts, params), old.generate(*prompts, params))


def test_unseeded_generation_still_works(models, prompts):
    out = both(models["fp32"])[0].generate(*prompts, SamplingParams(max_length=6, seed=None))
    assert out.tokens.shape[0] == len(LENGTHS) and (out.response_lengths >= 1).all()


# ---------------------------------------------------------------- the CPU mode in the decode loop

def _ours_on_stack() -> bool:
    return any(isinstance(m, megatron_cpu._CudaDeviceToCpu) for m in _get_current_function_mode_stack())


def test_cpu_mode_would_redirect_nothing_in_the_decode_loop(models, prompts, monkeypatch):
    """Keep the mode on during decoding and record every call it would change: there are none,
    so suspending it cannot change where anything runs (first call, KV-cache allocation included)."""
    if not megatron_cpu.is_installed():
        pytest.skip("the CPU compatibility layer is only installed without CUDA")
    redirected = []
    original = megatron_cpu._CudaDeviceToCpu.__torch_function__

    def recording(self, func, types, args=(), kwargs=None):
        kw = kwargs or {}
        if func in (torch.Tensor.cuda, torch.Tensor.pin_memory) or kw.get("pin_memory") \
                or (func is torch.Tensor.type and len(args) == 1 and not kw) \
                or ("device" in kw and megatron_cpu._to_cpu_device(kw["device"]) is not kw["device"]) \
                or (func is torch.Tensor.to and len(args) > 1 and not isinstance(args[1], (torch.dtype, torch.Tensor))
                    and megatron_cpu._to_cpu_device(args[1]) is not args[1]):
            redirected.append(getattr(func, "__name__", repr(func)))
        return original(self, func, types, args, kwargs)

    monkeypatch.setattr(megatron_cpu._CudaDeviceToCpu, "__torch_function__", recording)
    monkeypatch.setattr(megatron_cpu, "suspended", contextlib.nullcontext)
    params = SamplingParams(temperature=0.7, top_k=20, top_p=0.9, min_length=2, max_length=8, seed=1)
    for name, model in models.items():
        fresh = KVCacheSampler(model, eos_id=EOS, pad_id=PAD, max_batch_size=8, max_sequence_length=40)
        fresh.generate(*prompts, params)
        fresh.generate_no_cache(*prompts, params)
    assert redirected == []


def test_decode_runs_without_the_mode_and_restores_it(models, prompts):
    if not megatron_cpu.is_installed():
        pytest.skip("the CPU compatibility layer is only installed without CUDA")
    megatron_cpu.enable_in_current_thread()
    seen = []
    model = models["fp32"]
    handle = model.register_forward_pre_hook(lambda module, args: seen.append(_ours_on_stack()))
    try:
        KVCacheSampler(model, eos_id=EOS, pad_id=PAD, max_batch_size=8,
                       max_sequence_length=40).generate(*prompts, SamplingParams(max_length=3, seed=0))
    finally:
        handle.remove()
    assert seen and not any(seen)
    assert _ours_on_stack()


def test_suspended_is_a_no_op_without_the_mode_or_under_another_mode():
    class Other(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            return func(*args, **(kwargs or {}))

    result = {}

    def bare_thread():  # a thread that never enabled the mode: nothing to suspend (as with CUDA)
        before = list(_get_current_function_mode_stack())
        with megatron_cpu.suspended():
            result["inside"] = list(_get_current_function_mode_stack())
        result["same"] = before == result["inside"] == list(_get_current_function_mode_stack())

    thread = threading.Thread(target=bare_thread)
    thread.start()
    thread.join()
    assert result["same"] and result["inside"] == []
    if megatron_cpu.is_installed():
        megatron_cpu.enable_in_current_thread()
        with Other():  # a mode above ours: both stay
            with megatron_cpu.suspended():
                stack = _get_current_function_mode_stack()
                assert isinstance(stack[-1], Other) and _ours_on_stack()
        with megatron_cpu.suspended():
            assert not _ours_on_stack()
        assert _ours_on_stack()


def test_suspended_is_a_no_op_when_cuda_is_present(monkeypatch):
    """With CUDA the mode is never entered, so suspending it does nothing."""
    monkeypatch.setattr(megatron_cpu, "cpu_compat_needed", lambda: False)
    result = {}

    def thread_on_a_gpu_machine():
        megatron_cpu.enable_in_current_thread()  # returns at once: no CPU layer needed
        before = list(_get_current_function_mode_stack())
        with megatron_cpu.suspended():
            result["ok"] = list(_get_current_function_mode_stack()) == before == []

    thread = threading.Thread(target=thread_on_a_gpu_machine)
    thread.start()
    thread.join()
    assert result["ok"]
