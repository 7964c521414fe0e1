"""Hugging Face config.json <-> ModelConfig.

Only options our megatron model reproduces exactly are accepted; anything else (biases on a
Llama, RoPE scaling, sliding-window attention, another activation) is refused with a message
naming the key, so a checkpoint is never imported into a model that computes something else.
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
    "GPT2LMHeadModel": ("gpt2", "lm"),
    "GPT2ForSequenceClassification": ("gpt2", "score"),
}
_MODEL_TYPES = {"llama": "llama", "mistral": "llama", "gpt2": "gpt2"}
_GPT2_ACTIVATIONS = ("gelu_new", "gelu_pytorch_tanh")  # both are the tanh approximation


@dataclass(frozen=True)
class HFSource:
    """What a Hugging Face directory holds, as far as the importer needs to know."""

    path: Path
    architecture: str
    family: str  # "llama" | "gpt2"
    head: str  # "lm" | "score"
    model_config: ModelConfig
    raw: dict


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
    config = _llama_config(raw, where) if family == "llama" else _gpt2_config(raw, where)
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
        fallback = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "gpt2": "GPT2LMHeadModel"}
        if model_type in fallback:
            return fallback[model_type]
        raise HFFormatError(f"{where}: no \"architectures\" and model_type={model_type!r}; supported: {supported}")
    name = names[0]
    if name not in ARCHITECTURES:
        raise HFFormatError(f"{where}: architecture {name!r} (model_type={model_type!r}) is not supported; "
                            f"supported: {supported}")
    if model_type is not None and _MODEL_TYPES.get(model_type) != ARCHITECTURES[name][0]:
        raise HFFormatError(f"{where}: model_type={model_type!r} does not match architecture {name!r}")
    return name


def _require(raw: dict, where: str, key: str, allowed: tuple, default: Any, why: str) -> None:
    value = raw.get(key, default)
    if value not in allowed:
        raise HFFormatError(f"{where}: \"{key}\": {value!r} is not supported ({why}); supported: "
                            + " or ".join(repr(a) for a in allowed))


def _rope_theta(raw: dict, where: str) -> float:
    """RoPE base from either transformers-5 `rope_parameters` or the older `rope_theta`/`rope_scaling`."""
    params = raw.get("rope_parameters")
    scaling = raw.get("rope_scaling")
    for key, value in (("rope_parameters", params), ("rope_scaling", scaling)):
        if value is None:
            continue
        if not isinstance(value, dict):
            raise HFFormatError(f"{where}: \"{key}\" must be an object, found {value!r}")
        kind = value.get("rope_type", value.get("type", "default"))
        if kind != "default":
            raise HFFormatError(f"{where}: \"{key}\" has rope_type={kind!r} (RoPE scaling); only plain RoPE "
                                "(rope_type 'default', no rope_scaling) is supported")
    theta = (params or {}).get("rope_theta", raw.get("rope_theta", 10000.0))
    return float(theta)


def _llama_config(raw: dict, where: str) -> ModelConfig:
    _require(raw, where, "hidden_act", ("silu",), "silu", "the MLP is SwiGLU")
    _require(raw, where, "attention_bias", (False,), False, "Llama attention has no biases here")
    _require(raw, where, "mlp_bias", (False,), False, "Llama MLP has no biases here")
    heads = int(raw["num_attention_heads"])
    hidden = int(raw["hidden_size"])
    head_dim = raw.get("head_dim")
    if head_dim is not None and head_dim * heads != hidden:
        raise HFFormatError(f"{where}: \"head_dim\": {head_dim} x num_attention_heads {heads} != hidden_size "
                            f"{hidden}; only head_dim = hidden_size / num_attention_heads is supported")
    window = raw.get("sliding_window")
    max_positions = int(raw.get("max_position_embeddings", 2048))
    if window is not None and window < max_positions:
        raise HFFormatError(f"{where}: \"sliding_window\": {window} < max_position_embeddings {max_positions}; "
                            "only full causal attention (sliding_window null) is supported")
    kv_heads = int(raw.get("num_key_value_heads") or heads)
    return ModelConfig(
        arch="llama",
        vocab_size=int(raw["vocab_size"]),
        hidden_size=hidden,
        ffn_hidden_size=int(raw["intermediate_size"]),
        num_layers=int(raw["num_hidden_layers"]),
        num_attention_heads=heads,
        num_query_groups=None if kv_heads == heads else kv_heads,
        max_position_embeddings=max_positions,
        rope_theta=_rope_theta(raw, where),
        norm_eps=float(raw.get("rms_norm_eps", 1e-6)),
        tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
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


def export_config(config: ModelConfig, dtype: torch.dtype, scalar_head: bool, special_tokens: dict,
                  extra: dict | None = None):
    """A transformers LlamaConfig / GPT2Config describing the same model (for `save_pretrained`).

    special_tokens: {"bos_token_id", "eos_token_id", "pad_token_id"} (values may be None).
    """
    from transformers import GPT2Config, LlamaConfig

    # Unknown ids are written as null rather than left at transformers' defaults (Llama's 1/2,
    # GPT-2's 50256), which would describe some other tokenizer.
    tokens = {key: special_tokens.get(key) for key in ("bos_token_id", "eos_token_id", "pad_token_id")}
    if config.is_llama:
        hf = LlamaConfig(
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
            rope_theta=config.rope_theta,
            tie_word_embeddings=config.tie_word_embeddings,
            attention_bias=False,
            mlp_bias=False,
            attention_dropout=config.attention_dropout,
            **tokens,
        )
        name = "LlamaForSequenceClassification" if scalar_head else "LlamaForCausalLM"
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
