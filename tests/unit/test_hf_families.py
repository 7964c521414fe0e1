"""The families people align today, in and out: Llama 3.x (llama3 RoPE scaling), Qwen2/2.5 (QKV
biases, tied or not), Qwen3 (q/k RMSNorm, head_dim != hidden/heads), Mistral with a sliding
window, and Mixtral (mixture of experts), each as *ForCausalLM and *ForSequenceClassification.

Logit parity with transformers for the causal LMs is test_hf_convert.py's
`test_logits_match_transformers` (these cases are in its PARITY_CASES); TP=2, PP=2 and expert
parallelism are tests/integration/test_hf_tp2.py. Here: the config mapping, the classifier
heads, export round trips, and one sensitivity check per family showing that the feature it
adds matters far beyond the tolerance (so parity is not passing by accident).
"""
from __future__ import annotations

import json

import pytest
import torch

from tests.unit.test_hf_convert import (FAMILY_CASES, TOL, VOCAB, make_hf_model, make_tokenizer_dir, our_logits,
                                        ours, random_tokens, save_hf_case)

# case -> the transformers class name its export must carry (the family is kept)
EXPORTED_AS = {"llama3": "Llama", "qwen2": "Qwen2", "qwen2_tied": "Qwen2", "qwen3": "Qwen3",
               "mistral_window": "Mistral", "mixtral": "Mixtral"}


@pytest.fixture(scope="module", autouse=True)
def world_of_one():
    from aligner.distributed import setup

    setup.initialize(1, 1, seed=5)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """Each family saved once, as a causal LM and as a classifier (shared by the tests below)."""
    root = tmp_path_factory.mktemp("families")
    return {(case, head): save_hf_case(root, case, head=head) for case in FAMILY_CASES for head in ("lm", "score")}


def reference_logits(case: str, tokens: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return make_hf_model(case)(tokens).logits


def test_config_mapping(saved):
    from aligner.models.hf import convert

    def config(case):
        return convert.model_config_from_hf(saved[case, "lm"])

    llama3 = config("llama3")
    assert (llama3.rope_scaling, llama3.rope_scaling_factor, llama3.rope_low_freq_factor,
            llama3.rope_high_freq_factor, llama3.rope_original_max_position_embeddings) == ("llama3", 8.0, 1.0, 4.0, 32)
    qwen2, qwen2_tied = config("qwen2"), config("qwen2_tied")
    assert qwen2.add_qkv_bias and not qwen2.qk_layernorm and not qwen2.tie_word_embeddings
    assert qwen2_tied.tie_word_embeddings and qwen2_tied.add_qkv_bias
    qwen3 = config("qwen3")
    assert qwen3.qk_layernorm and not qwen3.add_qkv_bias and (qwen3.kv_channels, qwen3.head_dim) == (32, 32)
    assert qwen3.hidden_size // qwen3.num_attention_heads == 16  # head_dim really differs from hidden/heads
    assert config("mistral_window").sliding_window == 8
    mixtral = config("mixtral")
    assert (mixtral.num_experts, mixtral.moe_router_topk, mixtral.sliding_window) == (4, 2, None)
    for case in FAMILY_CASES:
        assert config(case).arch == "llama"


def test_llama31_legacy_rope_scaling_key(saved, tmp_path):
    """Llama 3.1's own config.json (written before transformers 5): rope_scaling + top-level rope_theta."""
    import shutil

    from aligner.models.hf import convert

    path = shutil.copytree(saved["llama3", "lm"], tmp_path / "legacy")
    raw = json.loads((path / "config.json").read_text())
    raw.pop("rope_parameters")
    raw.update(rope_theta=500000.0, rope_scaling={"factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                                  "original_max_position_embeddings": 8192, "rope_type": "llama3"})
    (path / "config.json").write_text(json.dumps(raw))
    config = convert.model_config_from_hf(path)
    assert (config.rope_theta, config.rope_scaling, config.rope_scaling_factor,
            config.rope_original_max_position_embeddings) == (500000.0, "llama3", 32.0, 8192)


@pytest.mark.parametrize("case", FAMILY_CASES)
def test_export_round_trip(case, saved, tmp_path):
    """Export is bit-identical to the source, re-imports to the same config, and transformers loads
    it as the same family with the same logits."""
    import transformers
    from safetensors.torch import load_file

    from aligner.models.hf import convert

    src = saved[case, "lm"]
    model, config = ours(src)
    out = convert.save_hf(model, config, tmp_path / "export")
    original, exported = load_file(str(src / "model.safetensors")), load_file(str(out / "model.safetensors"))
    assert exported.keys() == original.keys()
    for name in original:
        assert torch.equal(exported[name], original[name]), name
    assert convert.model_config_from_hf(out) == config
    assert json.loads((out / "config.json").read_text())["architectures"] == [f"{EXPORTED_AS[case]}ForCausalLM"]
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    tokens = random_tokens()
    with torch.no_grad():
        diff = (reloaded(tokens).logits - reference_logits(case, tokens)).abs().max().item()
    print(f"{case}: transformers on the export, max |logit diff| = {diff:.2e}")
    assert diff < 1e-5


@pytest.mark.parametrize("case", FAMILY_CASES)
def test_sequence_classification(case, saved, tmp_path):
    """*ForSequenceClassification: our per-token value at the last non-pad token = transformers'
    score, and the export (a reward model with a tokenizer) loads back as the same class."""
    import transformers
    from safetensors.torch import load_file

    from aligner.models.hf import convert

    src = saved[case, "score"]
    reference = make_hf_model(case, head="score")
    tokens = random_tokens(batch=3)
    tokens[1, 11:] = 0  # right padding (pad id 0)
    tokens[2, 5:] = 0
    last = torch.tensor([15, 10, 4])
    with torch.no_grad():
        want = reference(tokens).logits  # [B, 1]
    model, config = ours(src, scalar_head=True)
    values = our_logits(model, tokens)  # [B, S, 1]
    assert values.shape == (3, 16, 1) and want.std() > 0.1
    diff = (values[torch.arange(3), last] - want).abs().max().item()
    print(f"{case} classifier: max |score diff| = {diff:.2e}")
    assert diff < TOL

    out = convert.save_hf(model, config, tmp_path / "rm", tokenizer_dir=make_tokenizer_dir(tmp_path / "tok"),
                          scalar_head=True)
    original, exported = load_file(str(src / "model.safetensors")), load_file(str(out / "model.safetensors"))
    assert exported.keys() == original.keys()
    assert all(torch.equal(exported[name], original[name]) for name in original)
    reloaded = transformers.AutoModelForSequenceClassification.from_pretrained(out).eval()
    assert type(reloaded) is type(reference)
    with torch.no_grad():
        assert (reloaded(tokens).logits - want).abs().max() < 1e-5


def _drop_qk_norm(model):
    for layer in model.decoder.layers:  # megatron skips a q/k layernorm that is None
        layer.self_attention.q_layernorm = None
        layer.self_attention.k_layernorm = None


def _zero_qkv_bias(model):
    with torch.no_grad():
        for layer in model.decoder.layers:
            layer.self_attention.linear_qkv.bias.zero_()


# case -> [(what is wrong, ModelConfig overrides, in-place edit of the loaded model)]
WRONG = {
    "llama3": [("no RoPE scaling", dict(rope_scaling=None), None),
               # megatron-core's RotaryEmbedding hard-codes these; the checkpoint says 32
               ("megatron's default original_max_position_embeddings=8192",
                dict(rope_original_max_position_embeddings=8192), None)],
    "qwen2": [("no q/k/v bias", {}, _zero_qkv_bias)],
    "qwen2_tied": [("no q/k/v bias", {}, _zero_qkv_bias)],
    "qwen3": [("no q/k norm", {}, _drop_qk_norm)],
    "mistral_window": [("no sliding window", dict(sliding_window=None), None),
                       ("window one token too wide", dict(sliding_window=9), None)],
    "mixtral": [("top-3 routing instead of top-2", dict(moe_router_topk=3), None)],
}


@pytest.mark.parametrize("case", FAMILY_CASES)
def test_parity_is_sensitive_to_the_family_feature(case, saved):
    """The feature each family adds moves the logits by far more than the tolerance."""
    tokens = random_tokens()
    want = reference_logits(case, tokens)
    for what, overrides, edit in WRONG[case]:
        model, _ = ours(saved[case, "lm"], **overrides)
        if edit is not None:
            edit(model)
        diff = (our_logits(model, tokens) - want).abs().max().item()
        print(f"{case}, {what}: max |logit diff| = {diff:.2e}")
        assert diff > 1000 * TOL, (case, what, diff)


@pytest.mark.parametrize("case", ["qwen3", "mixtral"])
def test_logits_match_with_megatron_local_attention(case, saved):
    """megatron's own unfused core attention (attention_backend=local): head_dim != hidden/heads
    and the MoE layer give the same logits as transformers."""
    tokens = random_tokens()
    model, _ = ours(saved[case, "lm"], attention_backend="local")
    diff = (our_logits(model, tokens) - reference_logits(case, tokens)).abs().max().item()
    print(f"{case} (local attention): max |logit diff| = {diff:.2e}")
    assert diff < TOL


@pytest.mark.parametrize("case", ["mistral_window", "mixtral", "llama3"])
def test_kv_cache_greedy_matches_transformers_generate(case, saved):
    """Greedy decoding past the window (8) through our KV-cache sampler (one batch, prompts of
    different lengths): row by row the same tokens as transformers' generate."""
    from aligner.generation.params import SamplingParams
    from aligner.generation.sampler import KVCacheSampler

    model, _ = ours(saved[case, "lm"])
    reference = make_hf_model(case)
    prompts = random_tokens(batch=3, seq=6, seed=4)
    lengths = torch.tensor([6, 3, 5])
    params = SamplingParams(greedy=True, max_length=14, min_length=14, seed=0)
    sampler = KVCacheSampler(model, eos_id=2, pad_id=0, max_batch_size=4, max_sequence_length=24)
    cached = sampler.generate(prompts, lengths, params)
    for row, length in enumerate(lengths.tolist()):
        ours_row = cached.tokens[row, :length + 14]
        with torch.no_grad():
            want = reference.generate(prompts[row:row + 1, :length], max_new_tokens=14, min_new_tokens=14,
                                      do_sample=False, pad_token_id=0)[0]
        assert torch.equal(ours_row, want), (case, row, ours_row.tolist(), want.tolist())


# ------------------------------------------------------------------------------- still refused


@pytest.mark.parametrize("case, changes, key", [
    ("qwen2", dict(use_sliding_window=True, sliding_window=8, max_window_layers=1,
                   layer_types=["full_attention", "sliding_attention"]), '"layer_types"'),
    ("qwen3", dict(use_sliding_window=True, sliding_window=8, max_window_layers=1, layer_types=None),
     '"max_window_layers"'),
    ("qwen3", dict(attention_bias=True), '"attention_bias": True'),
    ("mixtral", dict(router_jitter_noise=0.1), '"router_jitter_noise": 0.1'),
    ("llama3", dict(rope_parameters={"rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0}), "'yarn'"),
    ("llama3", dict(rope_parameters={"rope_type": "llama3", "rope_theta": 1e4, "factor": 8.0}),
     "lacks ['low_freq_factor', 'high_freq_factor']"),
    ("llama3", dict(partial_rotary_factor=0.5), '"partial_rotary_factor": 0.5'),
])
def test_unsupported_options_name_the_key(case, changes, key, saved, tmp_path):
    import shutil

    from aligner.models.hf import convert
    from aligner.models.hf.errors import HFFormatError

    path = shutil.copytree(saved[case, "lm"], tmp_path / case)
    raw = json.loads((path / "config.json").read_text())
    raw.update(changes)
    (path / "config.json").write_text(json.dumps(raw))
    with pytest.raises(HFFormatError) as info:
        convert.model_config_from_hf(path)
    assert key in str(info.value) and "config.json" in str(info.value), str(info.value)


def test_sliding_window_needs_sdpa_attention(saved):
    """megatron's local attention builds its window mask on "cuda" (fails in the CPU sampler): refused."""
    from aligner.models.config import ModelConfigError

    with pytest.raises(ModelConfigError, match=r"attention_backend: local does not support sliding_window=8"):
        ours(saved["mistral_window", "lm"], attention_backend="local")


def test_qwen_window_on_every_layer_is_exact(saved, tmp_path):
    """Qwen2 with use_sliding_window and max_window_layers=0 slides on every layer: imported as a
    window (exported back as the same Qwen2 settings), logits equal to transformers'."""
    from aligner.models.hf import convert

    path = save_hf_case(tmp_path, "qwen2", use_sliding_window=True, sliding_window=8, max_window_layers=0)
    config = convert.model_config_from_hf(path)
    assert config.sliding_window == 8 and config.add_qkv_bias
    tokens = random_tokens()
    with torch.no_grad():
        want = make_hf_model("qwen2", use_sliding_window=True, sliding_window=8, max_window_layers=0)(tokens).logits
    assert (our_logits(ours(path)[0], tokens) - want).abs().max() < TOL
    assert (our_logits(ours(path, sliding_window=None)[0], tokens) - want).abs().max() > 1000 * TOL
    assert VOCAB == want.shape[-1]
