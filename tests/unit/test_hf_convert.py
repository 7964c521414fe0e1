"""Hugging Face import/export: logits of our megatron model equal transformers' own model code.

The reference is transformers' LlamaForCausalLM / GPT2LMHeadModel / *ForSequenceClassification
(an independent implementation). Weights are re-drawn at O(1) scale (norm weights away from 1,
biases non-zero) so that a swapped or mis-ordered tensor moves the logits by far more than the
tolerance; `test_parity_is_sensitive` shows that for a plausible wrong mapping.

The helpers below are also used by tests/integration/test_hf_tp2.py.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

VOCAB = 96
# name -> (transformers config class name, kwargs). Every kwarg that matters is explicit.
CASES = {
    "llama_mha": ("llama", dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                rms_norm_eps=1e-5)),
    "llama_gqa": ("llama", dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=8,
                                num_key_value_heads=2, rms_norm_eps=1e-5)),
    "llama_tied": ("llama", dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                 rms_norm_eps=1e-5, tie_word_embeddings=True)),
    "llama_theta500k": ("llama", dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, rope_theta=500000.0,
                                      rms_norm_eps=1e-6)),
    "mistral": ("mistral", dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                num_key_value_heads=2, sliding_window=None, rms_norm_eps=1e-5)),
    "gpt2": ("gpt2", dict(n_embd=32, n_layer=2, n_head=4, n_positions=64, layer_norm_epsilon=1e-5)),
    # The families of tests/unit/test_hf_families.py. Each has what its sensitivity check needs to
    # bind within 16 tokens: llama3 scaling with original_max_position_embeddings=32 (and not
    # megatron's hard-coded 8192) moves the mid/low frequencies; a window of 8 < 16 tokens.
    "llama3": ("llama", dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                             num_key_value_heads=2, rms_norm_eps=1e-5,
                             rope_parameters=dict(rope_type="llama3", rope_theta=10000.0, factor=8.0,
                                                  low_freq_factor=1.0, high_freq_factor=4.0,
                                                  original_max_position_embeddings=32))),
    "qwen2": ("qwen2", dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                            num_key_value_heads=2, rms_norm_eps=1e-6)),
    "qwen2_tied": ("qwen2", dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                                 num_key_value_heads=2, rms_norm_eps=1e-6, tie_word_embeddings=True)),
    "qwen3": ("qwen3", dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                            num_key_value_heads=2, head_dim=32, rms_norm_eps=1e-6)),
    "mistral_window": ("mistral", dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                       num_attention_heads=4, num_key_value_heads=2, sliding_window=8,
                                       rms_norm_eps=1e-5)),
    "mixtral": ("mixtral", dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                                num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2,
                                rms_norm_eps=1e-5)),
}
FAMILY_CASES = ["llama3", "qwen2", "qwen2_tied", "qwen3", "mistral_window", "mixtral"]
PARITY_CASES = ["llama_mha", "llama_gqa", "llama_tied", "llama_theta500k", "mistral", "gpt2"] + FAMILY_CASES
TOL = 1e-4


def hf_config(case: str, **overrides):
    import transformers

    family, kwargs = CASES[case]
    cls = {"llama": transformers.LlamaConfig, "mistral": transformers.MistralConfig,
           "qwen2": transformers.Qwen2Config, "qwen3": transformers.Qwen3Config,
           "mixtral": transformers.MixtralConfig, "gpt2": transformers.GPT2Config}[family]
    extra = {} if family == "gpt2" else {"max_position_embeddings": 64}
    return cls(vocab_size=VOCAB, bos_token_id=1, eos_token_id=2, **extra, **{**kwargs, **overrides})


def randomize_(model: torch.nn.Module, seed: int) -> None:
    """O(1)-scale weights: matrices ~N(0, 1/fan), 1-D norm weights ~1+N(0, .3), biases ~N(0, .3).
    Stacked expert weights [experts, out, in] (transformers 5's MoE modules) ~N(0, 1/in)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            if p.dim() == 1:
                p.copy_(noise * 0.3 + (1.0 if name.endswith("weight") else 0.0))
            elif "wte" in name or "embed" in name or "wpe" in name:
                p.copy_(noise)
            elif p.dim() == 3:
                p.copy_(noise / math.sqrt(p.shape[-1]))
            else:
                p.copy_(noise / math.sqrt(min(p.shape)))


def make_hf_model(case: str, head: str = "lm", seed: int = 0, **overrides):
    """A randomised transformers model in eval mode. head: 'lm' or 'score' (num_labels=1)."""
    import transformers

    config = hf_config(case, **overrides)
    if head == "score":
        config.num_labels = 1
        config.pad_token_id = 0
        model = transformers.AutoModelForSequenceClassification.from_config(config)
    else:
        model = transformers.AutoModelForCausalLM.from_config(config)
    randomize_(model, seed)
    return model.eval()


def save_hf_case(root: Path, case: str, head: str = "lm", seed: int = 0, **overrides) -> Path:
    out = Path(root) / f"{case}_{head}"
    make_hf_model(case, head, seed, **overrides).save_pretrained(out)
    return out


def random_tokens(batch: int = 2, seq: int = 16, seed: int = 1) -> torch.Tensor:
    """Tokens in [1, VOCAB): 0 is the pad id of the classifier cases."""
    return torch.randint(1, VOCAB, (batch, seq), generator=torch.Generator().manual_seed(seed))


def make_tokenizer_dir(path: Path) -> Path:
    """A word-level fast tokenizer over VOCAB tokens: <pad>=0, <bos>=1, <eos>=2."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<bos>": 1, "<eos>": 2, **{f"w{i}": i for i in range(3, VOCAB)}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", bos_token="<bos>", eos_token="<eos>")
    tok.save_pretrained(path)
    return Path(path)


# ------------------------------------------------------------------------------------------ tests


@pytest.fixture(scope="module", autouse=True)
def world_of_one():
    from aligner.distributed import setup

    setup.initialize(1, 1, seed=5)


def ours(path: Path, scalar_head: bool = False, **config_overrides):
    from aligner.models.gpt import build_gpt
    from aligner.models.hf import convert

    config = convert.model_config_from_hf(path)
    for key, value in config_overrides.items():
        setattr(config, key, value)
    model = build_gpt(config, torch.float32, scalar_head=scalar_head)
    convert.load_hf_weights(path, model, config, scalar_head=scalar_head)
    return model.eval(), config


def our_logits(model, tokens):
    from aligner.models.gpt import position_ids_for

    with torch.no_grad():
        return model(tokens, position_ids_for(tokens), None)


@pytest.mark.parametrize("case", PARITY_CASES)
def test_logits_match_transformers(case, tmp_path):
    path = save_hf_case(tmp_path, case)
    reference = make_hf_model(case)  # same seed: same weights, no file round trip involved
    tokens = random_tokens()
    model, _ = ours(path)
    got = our_logits(model, tokens)
    with torch.no_grad():
        want = reference(tokens).logits
    assert got.shape == want.shape == (2, 16, VOCAB)
    assert want.std() > 0.5  # O(1) logits: a mapping error cannot hide below the tolerance
    diff = (got - want).abs().max().item()
    print(f"{case}: max |logit diff| = {diff:.2e}")
    assert diff < TOL


@pytest.mark.parametrize("case", ["llama_gqa", "gpt2"])
def test_logits_match_with_megatron_local_attention(case, tmp_path):
    """The same import under megatron's own unfused core attention (attention_backend=local)."""
    path = save_hf_case(tmp_path, case)
    tokens = random_tokens()
    model, _ = ours(path, attention_backend="local")
    with torch.no_grad():
        want = make_hf_model(case)(tokens).logits
    diff = (our_logits(model, tokens) - want).abs().max().item()
    print(f"{case} (local attention): max |logit diff| = {diff:.2e}")
    assert diff < TOL


def test_config_mapping(tmp_path):
    from aligner.models.hf import convert

    config = convert.model_config_from_hf(save_hf_case(tmp_path, "llama_theta500k"))
    assert (config.arch, config.rope_theta, config.norm_eps) == ("llama", 500000.0, 1e-6)
    assert (config.num_attention_heads, config.num_query_groups, config.ffn_hidden_size) == (4, 2, 128)
    assert (config.max_position_embeddings, config.tie_word_embeddings, config.vocab_size) == (64, False, VOCAB)
    gpt2 = convert.model_config_from_hf(save_hf_case(tmp_path, "gpt2"))
    assert (gpt2.arch, gpt2.ffn_hidden_size, gpt2.max_position_embeddings, gpt2.tie_word_embeddings) == \
        ("gpt2", 4 * 32, 64, True)


def test_legacy_rope_theta_key(tmp_path):
    """Checkpoints written before transformers 5 keep rope_theta at the top level."""
    from aligner.models.hf import convert

    path = save_hf_case(tmp_path, "llama_mha")
    raw = json.loads((path / "config.json").read_text())
    raw.pop("rope_parameters", None)
    raw.update(rope_theta=12345.0, rope_scaling=None)
    (path / "config.json").write_text(json.dumps(raw))
    assert convert.model_config_from_hf(path).rope_theta == 12345.0


def test_parity_is_sensitive(tmp_path):
    """The tolerance is meaningful: the wrong RoPE base moves logits far beyond it."""
    path = save_hf_case(tmp_path, "llama_theta500k")
    tokens = random_tokens()
    with torch.no_grad():
        want = make_hf_model("llama_theta500k")(tokens).logits
    wrong, _ = ours(path, rope_theta=10000.0)
    assert (our_logits(wrong, tokens) - want).abs().max() > 100 * TOL


def test_sharded_safetensors_and_pytorch_bin(tmp_path):
    from safetensors.torch import load_file

    model = make_hf_model("llama_gqa")
    sharded = tmp_path / "sharded"
    model.save_pretrained(sharded, max_shard_size="40KB")
    assert (sharded / "model.safetensors.index.json").is_file()
    assert len(list(sharded.glob("*.safetensors"))) > 1
    tokens = random_tokens()
    with torch.no_grad():
        want = model(tokens).logits
    got = our_logits(ours(sharded)[0], tokens)
    assert (got - want).abs().max() < TOL

    single = save_hf_case(tmp_path, "llama_gqa")
    state = load_file(str(single / "model.safetensors"))
    (single / "model.safetensors").unlink()
    torch.save(state, single / "pytorch_model.bin")
    got = our_logits(ours(single)[0], tokens)
    assert (got - want).abs().max() < TOL

    (single / "pytorch_model.bin").unlink()  # the older sharded .bin layout
    names = sorted(state)
    halves = {"pytorch_model-00001-of-00002.bin": names[::2], "pytorch_model-00002-of-00002.bin": names[1::2]}
    for file, keys in halves.items():
        torch.save({k: state[k] for k in keys}, single / file)
    index = {"weight_map": {k: file for file, keys in halves.items() for k in keys}}
    (single / "pytorch_model.bin.index.json").write_text(json.dumps(index))
    got = our_logits(ours(single)[0], tokens)
    assert (got - want).abs().max() < TOL


def test_gpt2_saved_without_prefix(tmp_path):
    """The original GPT-2 checkpoints were saved from the bare trunk: `h.0.attn...`, `wte.weight`."""
    from safetensors.torch import load_file, save_file

    path = save_hf_case(tmp_path, "gpt2")
    state = load_file(str(path / "model.safetensors"))
    bare = {k.removeprefix("transformer."): v for k, v in state.items() if k.startswith("transformer.")}
    assert len(bare) == len(state)  # tied: no lm_head.weight in the file
    bare["h.0.attn.bias"] = torch.ones(1, 1, 64, 64)  # causal-mask buffer that old exports carry
    save_file(bare, str(path / "model.safetensors"), metadata={"format": "pt"})
    tokens = random_tokens()
    with torch.no_grad():
        want = make_hf_model("gpt2")(tokens).logits
    assert (our_logits(ours(path)[0], tokens) - want).abs().max() < TOL


@pytest.mark.parametrize("case", ["llama_gqa", "llama_tied", "gpt2"])
def test_round_trip_through_save_hf(case, tmp_path):
    import transformers
    from safetensors.torch import load_file

    from aligner.models.hf import convert

    src = save_hf_case(tmp_path, case)
    model, config = ours(src)
    out = convert.save_hf(model, config, tmp_path / "export")
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "generation_config.json", "model.safetensors"]
    original, exported = load_file(str(src / "model.safetensors")), load_file(str(out / "model.safetensors"))
    assert exported.keys() == original.keys()
    for name in original:
        assert torch.equal(exported[name], original[name]), name
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    tokens = random_tokens()
    with torch.no_grad():
        assert (reloaded(tokens).logits - make_hf_model(case)(tokens).logits).abs().max() < 1e-5
    written = json.loads((out / "config.json").read_text())
    assert written["architectures"] == [type(make_hf_model(case)).__name__.replace("Mistral", "Llama")]
    assert written.get("dtype", written.get("torch_dtype")) == "float32"


@pytest.mark.parametrize("case", ["llama_gqa", "gpt2"])
def test_scalar_head_round_trip(case, tmp_path):
    """Our per-token value at the last non-pad token = the HF classifier's logit, both ways."""
    import transformers

    from aligner.models.hf import convert

    src = save_hf_case(tmp_path, case, head="score")
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
    got = values[torch.arange(3), last]
    assert (got - want).abs().max() < TOL

    tok_dir = make_tokenizer_dir(tmp_path / "tok")
    out = convert.save_hf(model, config, tmp_path / "rm", tokenizer_dir=tok_dir, scalar_head=True,
                          extra_config={"reward_mean": 0.25, "reward_std": 2.5})
    written = json.loads((out / "config.json").read_text())
    assert transformers.AutoConfig.from_pretrained(out).num_labels == 1 and written["pad_token_id"] == 0
    assert (written["reward_mean"], written["reward_std"]) == (0.25, 2.5)
    assert (out / "tokenizer.json").is_file()
    reloaded = transformers.AutoModelForSequenceClassification.from_pretrained(out).eval()
    assert type(reloaded) is type(reference)
    with torch.no_grad():
        assert (reloaded(tokens).logits - want).abs().max() < 1e-5
    assert transformers.AutoTokenizer.from_pretrained(out).pad_token_id == 0


def test_causal_source_gives_fresh_scalar_head(tmp_path):
    """A policy checkpoint becoming a critic: trunk loaded, value head left at its zeros."""
    from aligner.models.gpt import position_ids_for

    src = save_hf_case(tmp_path, "llama_gqa")
    critic, _ = ours(src, scalar_head=True)
    policy, _ = ours(src)
    assert torch.count_nonzero(critic.output_layer.weight) == 0
    for (name, a), (_, b) in zip(critic.decoder.named_parameters(), policy.decoder.named_parameters()):
        assert torch.equal(a, b), name
    tokens = random_tokens()
    assert torch.count_nonzero(critic(tokens, position_ids_for(tokens), None)) == 0


def test_export_replaces_directory_atomically(tmp_path):
    from aligner.models.hf import convert

    model, config = ours(save_hf_case(tmp_path, "llama_mha"))
    out = tmp_path / "exports" / "model"
    out.mkdir(parents=True)
    (out / "stale.txt").write_text("old")
    with pytest.raises(FileNotFoundError, match="no tokenizer files"):
        convert.save_hf(model, config, out, tokenizer_dir=tmp_path)  # tmp_path holds no tokenizer
    assert (out / "stale.txt").read_text() == "old"  # a failed export leaves the old one alone
    convert.save_hf(model, config, out)
    assert not (out / "stale.txt").exists() and (out / "model.safetensors").is_file()
    assert sorted(p.name for p in out.parent.iterdir()) == ["model"]  # no temporary leftovers
    assert json.loads((out / "config.json").read_text())["eos_token_id"] is None  # unknown, not a default
    with pytest.raises(ValueError, match="'hidden_size' is a standard config.json field"):
        convert.save_hf(model, config, out, extra_config={"hidden_size": 7})
    assert (out / "model.safetensors").is_file()
