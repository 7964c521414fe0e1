"""Hugging Face config.json <-> ModelConfig.

Only options our megatron model reproduces exactly are accepted; anything else (biases on a
Llama, YaRN or linear RoPE scaling, a sliding window on some layers only, another activation)
is refused with a message naming the key, so a checkpoint is never imported into a model that
computes something else.

Families and what each adds to plain Llama (all map onto arch="llama"):
  llama    llama3 RoPE scaling; head_dim may differ from hidden/heads
  mistral  a sliding attention window on every layer
  qwen2    biases on q/k/v (not on o_proj)
  qwen3    RMSNorm over each q and k head (q_norm/k_norm); head_dim defaults to 128
  mixtral  every MLP is a top-k routed mixture of SwiGLU experts; optional sliding window
Export picks the transformers class from those features (see `export_family`).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from aligner.models.config import ModelConfig
from aligner.models.hf.errors import HFFormatError

# architecture name -> (our family, which head the checkpoint carries)
#   "lm":    a vocabulary projection (lm_head.weight, or tied to the embeddings)
#   "score": a [num_labels, hidden] classifier head without bias (score.weight)
ARCHITECTURES: dict[str, tuple[str, str]] = {
    "LlamaForCausalLM": ("llama", "lm"),
    "LlamaForSequenceClassification": ("llama", "score"),
    "MistralForCausalLM": ("llama", "lm"),
    "MistralForSequenceClassification": ("llama", "score"),
    "Qwen2ForCausalLM": ("llama", "lm"),
    "Qwen2ForSequenceClassification": ("llama", "score"),
    "Qwen3ForCausalLM": ("llama", "lm"),
    "Qwen3ForSequenceClassification": ("llama", "score"),
    "MixtralForCausalLM": ("llama", "lm"),
    "MixtralForSequenceClassification": ("llama", "score"),
    "GPT2LMHeadModel": ("gpt2", "lm"),
    "GPT2ForSequenceClassification": ("gpt2", "score"),
}
# architecture-name prefix -> transformers family (= its model_type)
_PREFIXES = {"Llama": "llama", "Mistral": "mistral", "Qwen2": "qwen2", "Qwen3": "qwen3", "Mixtral": "mixtral",
             "GPT2": "gpt2"}
_GPT2_ACTIVATIONS = ("gelu_new", "gelu_pytorch_tanh")  # both are the tanh approximation


@dataclass(frozen=True)
class HFSource:
    """What a Hugging Face directory holds, as far as the importer needs to know."""

    path: Path
    architecture: str
    family: str  # our arch: "llama" | "gpt2"
    head: str  # "lm" | "score"
    model_config: ModelConfig
    raw: dict

    @property
    def hf_family(self) -> str:
        """The transformers model family: llama | mistral | qwen2 | qwen3 | mixtral | gpt2."""
        return hf_family_of(self.architecture)


def hf_family_of(architecture: str) -> str:
    for prefix, family in _PREFIXES.items():
        if architecture.startswith(prefix):
            return family
    raise KeyError(architecture)


def read_config_json(path: str | Path) -> dict:
    config_file = Path(path) / "config.json"
    if not config_file.is_file():
        raise HFFormatError(f"{path}: no config.json; a Hugging Face model directory needs config.json "
                            "next to its *.safetensors (or pytorch_model.bin) weights")
    try:
        return json.loads(config_file.read_text())
    except json.JSONDecodeError as exc:
        raise HFFormatError(f"{config_file}: not valid JSON ({exc})") from exc


def describe(path: str | Path) -> HFSource:
    """Read `path/config.json` and map it onto a ModelConfig, refusing unsupported options."""
    raw = read_config_json(path)
    where = f"{Path(path) / 'config.json'}"
    architecture = _architecture(raw, where)
    family, head = ARCHITECTURES[architecture]
    hf_family = hf_family_of(architecture)
    config = _llama_config(raw, where, hf_family) if family == "llama" else _gpt2_config(raw, where)
    try:
        config.validate(key_prefix=where)
    except ValueError as exc:
        raise HFFormatError(str(exc)) from exc
    return HFSource(Path(path), architecture, family, head, config, raw)


def _architecture(raw: dict, where: str) -> str:
    supported = ", ".join(ARCHITECTURES)
    names = raw.get("architectures") or []
    model_type = raw.get("model_type")
    if len(names) > 1:
        raise HFFormatError(f"{where}: \"architectures\" lists several models {names}; expected one of: {supported}")
    if not names:
        # Older exports omit "architectures": a known model_type means the plain causal LM.
        fallback = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM",
                    "qwen3": "Qwen3ForCausalLM", "mixtral": "MixtralForCausalLM", "gpt2": "GPT2LMHeadModel"}
        if model_type in fallback:
            return fallback[model_type]
        raise HFFormatError(f"{where}: no \"architectures\" and model_type={model_type!r}; supported: {supported}")
    name = names[0]
    if name not in ARCHITECTURES:
        raise HFFormatError(f"{where}: architecture {name!r} (model_type={model_type!r}) is not supported; "
                            f"supported: {supported}")
    if model_type is not None and model_type != hf_family_of(name):
        raise HFFormatError(f"{where}: model_type={model_type!r} does not match architecture {name!r}")
    return name


def _require(raw: dict, where: str, key: str, allowed: tuple, default: Any, why: str) -> None:
    value = raw.get(key, default)
    if value not in allowed:
        raise HFFormatError(f"{where}: \"{key}\": {value!r} is not supported ({why}); supported: "
                            + " or ".join(repr(a) for a in allowed))


_LLAMA3_KEYS = ("factor", "low_freq_factor", "high_freq_factor")


def _rope(raw: dict, where: str) -> dict:
    """RoPE base and scaling from transformers-5 `rope_parameters` or the older `rope_theta`/`rope_scaling`.

    Returns ModelConfig fields: rope_theta, and for rope_type 'llama3' the four scaling numbers.
    """
    params = raw.get("rope_parameters")
    scaling = raw.get("rope_scaling")
    chosen, chosen_key = None, None
    for key, value in (("rope_parameters", params), ("rope_scaling", scaling)):
        if value is None:
            continue
        if not isinstance(value, dict):
            raise HFFormatError(f"{where}: \"{key}\" must be an object, found {value!r}")
        if any(isinstance(v, dict) for v in value.values()):
            raise HFFormatError(f"{where}: \"{key}\" gives RoPE per layer type ({sorted(value)}); only one RoPE "
                                "for all layers is supported")
        kind = value.get("rope_type", value.get("type", "default"))
        if kind not in ("default", "llama3"):
            raise HFFormatError(f"{where}: \"{key}\" has rope_type={kind!r} (RoPE scaling); supported: plain RoPE "
                                "(rope_type 'default', no rope_scaling) or 'llama3'")
        partial = value.get("partial_rotary_factor", raw.get("partial_rotary_factor", 1.0))
        if partial != 1.0:
            raise HFFormatError(f"{where}: \"partial_rotary_factor\": {partial!r} is not supported (RoPE on part of "
                                "each head); supported: 1.0")
        if kind == "llama3" and chosen is None:  # transformers prefers rope_parameters when both are set
            chosen, chosen_key = value, key
    fields = {"rope_theta": float((params or {}).get("rope_theta", raw.get("rope_theta", 10000.0)))}
    if chosen is None:
        return fields
    missing = [k for k in _LLAMA3_KEYS if chosen.get(k) is None]
    if missing:
        raise HFFormatError(f"{where}: \"{chosen_key}\" with rope_type 'llama3' lacks {missing}")
    # transformers: a top-level original_max_position_embeddings wins over the one in the RoPE dict,
    # and max_position_embeddings stands in when neither is given
    original = raw.get("original_max_position_embeddings",
                       chosen.get("original_max_position_embeddings", raw.get("max_position_embeddings", 2048)))
    fields.update(rope_scaling="llama3", rope_scaling_factor=float(chosen["factor"]),
                  rope_low_freq_factor=float(chosen["low_freq_factor"]),
                  rope_high_freq_factor=float(chosen["high_freq_factor"]),
                  rope_original_max_position_embeddings=int(original))
    return fields


def _sliding_window(raw: dict, where: str, hf_family: str, layers: int, max_positions: int) -> int | None:
    """The attention window every layer uses, or None for full causal attention.

    Mistral/Mixtral: `sliding_window` applies to every layer. Qwen2/Qwen3: only when
    `use_sliding_window`, and only on the layers `layer_types` (or `max_window_layers`) marks.
    A window on some layers only is accepted when it cannot bind (window >= max_position_embeddings).
    """
    window = raw.get("sliding_window")
    if hf_family in ("llama",):
        return None  # Llama has no sliding window; the key, if present, is unused by transformers
    if hf_family in ("mistral", "mixtral"):
        return None if window is None else int(window)
    if not raw.get("use_sliding_window", False) or window is None:
        return None
    types = raw.get("layer_types") or ["sliding_attention" if i >= int(raw.get("max_window_layers", 28))
                                       else "full_attention" for i in range(layers)]
    sliding = [t == "sliding_attention" for t in types]
    if not any(sliding):
        return None
    if all(sliding):
        return int(window)
    if int(window) >= max_positions:
        return None
    key = "layer_types" if raw.get("layer_types") else "max_window_layers"
    raise HFFormatError(f"{where}: \"{key}\": a sliding window ({window}) on {sum(sliding)} of {layers} layers "
                        f"and full attention on the others is not supported (window < max_position_embeddings "
                        f"{max_positions}); supported: the window on every layer or on none")


def _llama_config(raw: dict, where: str, hf_family: str) -> ModelConfig:
    _require(raw, where, "hidden_act", ("silu",), "silu", "the MLP is SwiGLU")
    if hf_family in ("llama", "qwen3"):  # their attention_bias also adds a bias to o_proj
        _require(raw, where, "attention_bias", (False,), False, f"{hf_family} attention without biases")
    if hf_family == "llama":
        _require(raw, where, "mlp_bias", (False,), False, "Llama MLP has no biases here")
    heads = int(raw["num_attention_heads"])
    hidden = int(raw["hidden_size"])
    layers = int(raw["num_hidden_layers"])
    head_dim = raw.get("head_dim", 128 if hf_family == "qwen3" else None)
    if head_dim is not None and int(head_dim) * heads == hidden:
        head_dim = None  # the default; keeps the config identical to one without the key
    max_positions = int(raw.get("max_position_embeddings", 2048))
    kv_heads = int(raw.get("num_key_value_heads") or heads)
    moe = {}
    if hf_family == "mixtral":
        _require(raw, where, "router_jitter_noise", (0, 0.0), 0.0, "training-time router noise is not reproduced")
        moe = dict(num_experts=int(raw.get("num_local_experts", 8)),
                   moe_router_topk=int(raw.get("num_experts_per_tok", 2)))
        if moe["moe_router_topk"] < 2:  # see ModelConfig.validate
            raise HFFormatError(f"{where}: \"num_experts_per_tok\": {moe['moe_router_topk']} is not supported "
                                "(megatron-core routes top-1 by probability, Mixtral gives the expert weight 1); "
                                "supported: 2 or more")
    return ModelConfig(
        arch="llama",
        vocab_size=int(raw["vocab_size"]),
        hidden_size=hidden,
        ffn_hidden_size=int(raw["intermediate_size"]),
        num_layers=layers,
        num_attention_heads=heads,
        num_query_groups=None if kv_heads == heads else kv_heads,
        max_position_embeddings=max_positions,
        norm_eps=float(raw.get("rms_norm_eps", 1e-6)),
        tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
        kv_channels=None if head_dim is None else int(head_dim),
        add_qkv_bias=hf_family == "qwen2",
        qk_layernorm=hf_family == "qwen3",
        sliding_window=_sliding_window(raw, where, hf_family, layers, max_positions),
        **_rope(raw, where),
        **moe,
    )


def _gpt2_config(raw: dict, where: str) -> ModelConfig:
    _require(raw, where, "activation_function", _GPT2_ACTIVATIONS, "gelu_new", "the MLP uses tanh-GELU")
    _require(raw, where, "scale_attn_weights", (True,), True, "attention is scaled by 1/sqrt(head_dim)")
    _require(raw, where, "scale_attn_by_inverse_layer_idx", (False,), False, "no per-layer attention scaling")
    _require(raw, where, "add_cross_attention", (False,), False, "decoder-only")
    hidden = int(raw["n_embd"])
    return ModelConfig(
        arch="gpt2",
        vocab_size=int(raw["vocab_size"]),
        hidden_size=hidden,
        ffn_hidden_size=int(raw.get("n_inner") or 4 * hidden),
        num_layers=int(raw["n_layer"]),
        num_attention_heads=int(raw["n_head"]),
        max_position_embeddings=int(raw["n_positions"]),
        norm_eps=float(raw.get("layer_norm_epsilon", 1e-5)),
        tie_word_embeddings=bool(raw.get("tie_word_embeddings", True)),
    )


# ----------------------------------------------------------------------------------------- export


def export_family(config: ModelConfig) -> str:
    """The transformers family that computes exactly what `config` does.

    mixtral: experts; qwen3: q/k norm; qwen2: q/k/v biases; mistral: a sliding window;
    llama otherwise (llama3 RoPE scaling and any head_dim fit all of them).
    """
    if not config.is_llama:
        return "gpt2"
    features = [name for name, on in (("mixtral", config.num_experts is not None), ("qwen3", config.qk_layernorm),
                                      ("qwen2", config.add_qkv_bias)) if on]
    if len(features) > 1:
        raise ValueError(f"save_hf: no transformers model has all of {features} (experts / q-k norm / q-k-v "
                         "biases); this model cannot be exported")
    if features:
        return features[0]
    return "mistral" if config.sliding_window is not None else "llama"


def _rope_parameters(config: ModelConfig) -> dict:
    rope = {"rope_type": "default", "rope_theta": config.rope_theta}
    if config.rope_scaling == "llama3":
        rope.update(rope_type="llama3", factor=config.rope_scaling_factor,
                    low_freq_factor=config.rope_low_freq_factor, high_freq_factor=config.rope_high_freq_factor,
                    original_max_position_embeddings=config.rope_original_max_position_embeddings)
    return rope


def _llama_family_config(config: ModelConfig, family: str, tokens: dict):
    import transformers

    common = dict(
        vocab_size=config.vocab_size,
        hidden_size=config.hidden_size,
        intermediate_size=config.ffn_hidden_size,
        num_hidden_layers=config.num_layers,
        num_attention_heads=config.num_attention_heads,
        num_key_value_heads=config.kv_heads,
        head_dim=config.head_dim,
        hidden_act="silu",
        max_position_embeddings=config.max_position_embeddings,
        rms_norm_eps=config.norm_eps,
        rope_parameters=_rope_parameters(config),
        tie_word_embeddings=config.tie_word_embeddings,
        attention_dropout=config.attention_dropout,
        **tokens,
    )
    window = config.sliding_window
    if family == "llama":
        return transformers.LlamaConfig(attention_bias=False, mlp_bias=False, **common)
    if family == "mistral":
        return transformers.MistralConfig(sliding_window=window, **common)
    if family == "mixtral":
        return transformers.MixtralConfig(sliding_window=window, num_local_experts=config.num_experts,
                                          num_experts_per_tok=config.moe_router_topk, router_jitter_noise=0.0,
                                          **common)
    # Qwen: a window on every layer is use_sliding_window with max_window_layers=0
    qwen_window = dict(use_sliding_window=window is not None, sliding_window=window, max_window_layers=0,
                       layer_types=["sliding_attention" if window is not None else "full_attention"] * config.num_layers)
    if family == "qwen2":
        return transformers.Qwen2Config(**qwen_window, **common)
    return transformers.Qwen3Config(attention_bias=False, **qwen_window, **common)


def export_config(config: ModelConfig, dtype: torch.dtype, scalar_head: bool, special_tokens: dict,
                  extra: dict | None = None):
    """A transformers config (Llama/Mistral/Qwen2/Qwen3/Mixtral/GPT2Config) describing the same model.

    special_tokens: {"bos_token_id", "eos_token_id", "pad_token_id"} (values may be None).
    """
    from transformers import GPT2Config

    # Unknown ids are written as null rather than left at transformers' defaults (Llama's 1/2,
    # GPT-2's 50256), which would describe some other tokenizer.
    tokens = {key: special_tokens.get(key) for key in ("bos_token_id", "eos_token_id", "pad_token_id")}
    family = export_family(config)
    if config.is_llama:
        hf = _llama_family_config(config, family, tokens)
        stem = {"llama": "Llama", "mistral": "Mistral", "qwen2": "Qwen2", "qwen3": "Qwen3", "mixtral": "Mixtral"}[family]
        name = f"{stem}ForSequenceClassification" if scalar_head else f"{stem}ForCausalLM"
    else:
        hf = GPT2Config(
            vocab_size=config.vocab_size,
            n_positions=config.max_position_embeddings,
            n_embd=config.hidden_size,
            n_layer=config.num_layers,
            n_head=config.num_attention_heads,
            n_inner=config.ffn_hidden_size,
            activation_function="gelu_new",
            layer_norm_epsilon=config.norm_eps,
            resid_pdrop=config.hidden_dropout,
            embd_pdrop=config.hidden_dropout,
            attn_pdrop=config.attention_dropout,
            tie_word_embeddings=config.tie_word_embeddings,
            **tokens,
        )
        name = "GPT2ForSequenceClassification" if scalar_head else "GPT2LMHeadModel"
    hf.architectures = [name]
    hf.dtype = dtype
    if scalar_head:
        hf.num_labels = 1
    reserved = hf.to_dict()
    for key, value in (extra or {}).items():
        if key in reserved:
            raise ValueError(f"save_hf(extra_config=...): key {key!r} is a standard config.json field "
                             f"({reserved[key]!r}); pick another name")
        setattr(hf, key, value)
    return hf
