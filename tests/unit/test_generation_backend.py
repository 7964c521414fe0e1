"""Backend selection, our backend's refit/unload, and the guarded TensorRT-LLM adapter."""
import importlib
import sys
from types import SimpleNamespace

import pytest
import torch

from aligner.compat import optional
from aligner.compat.optional import MissingOptionalDependency
from aligner.distributed.setup import initialize
from aligner.generation.backend import GenerationBackend, MegatronSamplerBackend, build_backend
from aligner.generation.params import SamplingParams
from aligner.models.config import ModelConfig
from aligner.models.gpt import build_gpt


CONFIG = ModelConfig(arch="llama", vocab_size=64, hidden_size=32, ffn_hidden_size=64, num_layers=2,
                     num_attention_heads=4, max_position_embeddings=32)


@pytest.fixture(scope="module")
def model():
    initialize(1, 1, seed=2)
    model = build_gpt(CONFIG, torch.float32)
    with torch.no_grad():
        model.output_layer.weight.mul_(15.0)  # peaked distributions: weight changes show in greedy tokens
    return model


SIZES = dict(eos_id=3, pad_id=0, max_batch_size=4, max_sequence_length=24)
PROMPTS = (torch.tensor([[5, 6, 7, 8], [9, 10, 0, 0]]), torch.tensor([4, 2]))


def test_default_backend_is_ours_and_delegates_to_the_sampler(model):
    for cfg in (None, {}, {"enable": False}):
        backend = build_backend(cfg, model, **SIZES)
        assert isinstance(backend, MegatronSamplerBackend) and isinstance(backend, GenerationBackend)
        assert backend.name == "megatron"
    params = SamplingParams(max_length=5, min_length=0, seed=8)
    out = backend.generate(*PROMPTS, params)
    direct = backend.sampler.generate_no_cache(*PROMPTS, params)
    assert torch.equal(out.tokens, direct.tokens)


def test_unload_frees_the_cache_and_refit_sees_new_weights(model):
    backend = build_backend({"enable": False}, model, **SIZES)
    params = SamplingParams(greedy=True, max_length=6, min_length=0)
    before = backend.generate(*PROMPTS, params)
    assert backend.sampler._context is not None and backend.sampler._context.key_value_memory_dict
    backend.unload()
    assert backend.sampler._context is None
    assert torch.equal(backend.generate(*PROMPTS, params).tokens, before.tokens)
    # the sampler shares the trainer's module: an in-place update is visible without a refit
    with torch.no_grad():
        saved = model.output_layer.weight.clone()
        model.output_layer.weight.mul_(-1.0)
    try:
        assert not torch.equal(backend.generate(*PROMPTS, params).tokens, before.tokens)
    finally:
        with torch.no_grad():
            model.output_layer.weight.copy_(saved)
    # refit to another module object switches to it; refitting back restores the old samples
    other = build_gpt(CONFIG, torch.float32)
    backend.refit(other)
    assert backend.sampler.model is other
    assert not torch.equal(backend.generate(*PROMPTS, params).tokens, before.tokens)
    backend.refit(model)
    assert torch.equal(backend.generate(*PROMPTS, params).tokens, before.tokens)


def test_trt_llm_enabled_without_tensorrt_llm_names_the_config_key(model, monkeypatch):
    real = optional.is_available
    monkeypatch.setattr(optional, "is_available", lambda name: False if name == "tensorrt_llm" else real(name))
    with pytest.raises(MissingOptionalDependency, match=r"trainer\.ppo\.trt_llm\.enable"):
        build_backend({"enable": True}, model, **SIZES)
    with pytest.raises(ValueError, match=r"trainer\.ppo\.trt_llm\.enable must be true or false"):
        build_backend({"enable": "yes"}, model, **SIZES)


def test_trtllm_module_imports_without_tensorrt_llm():
    blocked = "tensorrt_llm" not in sys.modules
    module = importlib.reload(importlib.import_module("aligner.generation.trtllm"))
    assert hasattr(module, "TRTLLMBackend")
    if blocked:
        assert "tensorrt_llm" not in sys.modules  # importing the adapter did not import the package


def test_trtllm_results_convert_to_generation_output():
    from aligner.generation.trtllm import _to_output

    def completion(tokens, logprobs, reason):
        return SimpleNamespace(outputs=[SimpleNamespace(token_ids=tokens, logprobs=logprobs, finish_reason=reason)])

    results = [completion([11, 3], [-0.5, -0.25], "stop"),
               completion([12, 13, 14], [{12: SimpleNamespace(logprob=-1.0)}, {13: SimpleNamespace(logprob=-2.0)},
                                         {14: SimpleNamespace(logprob=-3.0)}], "length")]
    out = _to_output([[5, 6, 7], [9]], results, pad_id=0)
    assert out.tokens.tolist() == [[5, 6, 7, 11, 3], [9, 12, 13, 14, 0]]
    assert out.prompt_lengths.tolist() == [3, 1] and out.response_lengths.tolist() == [2, 3]
    assert out.is_end.tolist() == [True, False]
    assert out.generator_logprobs.tolist() == [[0.0, 0.0, -0.5, -0.25], [-1.0, -2.0, -3.0, 0.0]]
    assert out.response_mask().tolist() == [[False, False, True, True], [True, True, True, False]]
