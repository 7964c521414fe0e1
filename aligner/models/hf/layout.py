"""Which Hugging Face tensors make up each megatron parameter, and how they are rearranged.

Everything here works on *full* (unsharded) tensors; tensor-parallel slicing is tp_shards.py.

Megatron layouts (checked against megatron-core 0.16 `SelfAttention.get_query_key_value_tensors`
and `MLP.forward`):
  linear_qkv   rows grouped by KV group g: [q heads of group g | k_g | v_g], each head_dim rows,
               so that tensor parallelism can hand whole groups to a rank.
  linear_fc1   (SwiGLU) rows [gate; up]; `MLP` applies the activation to the first half.
Hugging Face layouts:
  Llama        separate q/k/v/o and gate/up/down nn.Linear weights ([out, in]); query head h
               reads KV head h // (heads / kv_heads), the same grouping as megatron's.
               Mistral is the same; Qwen2 adds q/k/v biases (grouped like the weights), Qwen3
               q_norm/k_norm [head_dim] (megatron's q_layernorm/k_layernorm), Mixtral replaces
               the MLP by block_sparse_moe (router + experts, megatron's MoELayer).
  GPT-2        Conv1D weights stored transposed ([in, out]); c_attn packs [q | k | v] columns.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from aligner.models.config import ModelConfig

Shape = tuple[int, ...]


def qkv_to_grouped(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, groups: int) -> torch.Tensor:
    """q [heads*d, ...], k and v [groups*d, ...] -> megatron's grouped [groups*(heads/groups+2)*d, ...]."""
    rest = q.shape[1:]
    parts = [t.reshape(groups, -1, *rest) for t in (q, k, v)]
    return torch.cat(parts, dim=1).reshape(-1, *rest)


def grouped_to_qkv(qkv: torch.Tensor, heads: int, groups: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Inverse of `qkv_to_grouped`: [groups*(heads/groups+2)*d, ...] -> q, k, v."""
    rest = qkv.shape[1:]
    per_group = heads // groups + 2
    head_dim = qkv.shape[0] // (groups * per_group)
    grouped = qkv.reshape(groups, per_group * head_dim, *rest)
    q, k, v = grouped.split([(per_group - 2) * head_dim, head_dim, head_dim], dim=1)
    return tuple(t.reshape(-1, *rest) for t in (q, k, v))


@dataclass(frozen=True)
class TensorMap:
    """One megatron parameter (full, layers numbered globally) and the HF tensors it comes from."""

    megatron: str
    hf: tuple[str, ...]
    hf_shapes: tuple[Shape, ...]
    to_megatron: Callable[..., torch.Tensor]  # (*hf tensors) -> megatron tensor
    to_hf: Callable[[torch.Tensor], Sequence[torch.Tensor]]  # megatron tensor -> hf tensors
    layer: int | None = None  # global layer index; None for embeddings / final norm / head

    @property
    def stage_role(self) -> str:
        """'layer', 'first' (embeddings) or 'last' (final norm, head): which pipeline stage holds it."""
        if self.layer is not None:
            return "layer"
        return "first" if self.megatron.startswith("embedding.") else "last"


def _same(name: str, hf: str, shape: Shape, layer: int | None = None) -> TensorMap:
    return TensorMap(name, (hf,), (shape,), lambda t: t, lambda t: (t,), layer)


def _transposed(name: str, hf: str, shape: Shape, layer: int) -> TensorMap:
    """GPT-2 Conv1D: HF stores [in, out], megatron's Linear holds [out, in]."""
    return TensorMap(name, (hf,), (shape,), lambda t: t.t(), lambda t: (t.t(),), layer)


def _llama_layer(c: ModelConfig, i: int, prefix: str) -> list[TensorMap]:
    m, h = f"decoder.layers.{i}.", f"{prefix}layers.{i}."
    hidden, d, heads, groups = c.hidden_size, c.head_dim, c.num_attention_heads, c.kv_heads
    qkv_shapes = ((heads * d, hidden), (groups * d, hidden), (groups * d, hidden))
    maps = [
        _same(m + "input_layernorm.weight", h + "input_layernorm.weight", (hidden,), i),
        _qkv(m + "self_attention.linear_qkv.weight", h, "weight", qkv_shapes, heads, groups, i),
    ]
    if c.add_qkv_bias:  # Qwen2
        maps.append(_qkv(m + "self_attention.linear_qkv.bias", h, "bias", tuple(s[:1] for s in qkv_shapes),
                         heads, groups, i))
    if c.qk_layernorm:  # Qwen3: one [head_dim] RMSNorm weight shared by all q heads, one by all k heads
        maps += [_same(m + "self_attention.q_layernorm.weight", h + "self_attn.q_norm.weight", (d,), i),
                 _same(m + "self_attention.k_layernorm.weight", h + "self_attn.k_norm.weight", (d,), i)]
    maps += [
        _same(m + "self_attention.linear_proj.weight", h + "self_attn.o_proj.weight", (hidden, heads * d), i),
        _same(m + "pre_mlp_layernorm.weight", h + "post_attention_layernorm.weight", (hidden,), i),
    ]
    if c.num_experts is None:
        maps += [_swiglu(m + "mlp.linear_fc1.weight", h + "mlp.gate_proj.weight", h + "mlp.up_proj.weight",
                         c.ffn_hidden_size, hidden, i),
                 _same(m + "mlp.linear_fc2.weight", h + "mlp.down_proj.weight", (hidden, c.ffn_hidden_size), i)]
    else:
        maps += _mixtral_moe(c, i, m, h)
    return maps


def _qkv(name: str, h: str, kind: str, shapes, heads: int, groups: int, layer: int) -> TensorMap:
    """q_proj/k_proj/v_proj weights ([out, in]) or biases ([out]) <-> megatron's grouped linear_qkv."""
    return TensorMap(
        name,
        tuple(f"{h}self_attn.{p}_proj.{kind}" for p in "qkv"),
        shapes,
        lambda q, k, v: qkv_to_grouped(q, k, v, groups),
        lambda t: grouped_to_qkv(t, heads, groups),
        layer,
    )


def _swiglu(name: str, gate: str, up: str, ffn: int, hidden: int, layer: int) -> TensorMap:
    """Separate gate/up [ffn, hidden] <-> megatron's fc1 rows [gate; up]."""
    return TensorMap(name, (gate, up), ((ffn, hidden), (ffn, hidden)),
                     lambda g, u: torch.cat([g, u], dim=0), lambda t: t.chunk(2, dim=0), layer)


def _mixtral_moe(c: ModelConfig, i: int, m: str, h: str) -> list[TensorMap]:
    """Mixtral's block_sparse_moe: gate [experts, hidden]; expert e: w1 (gate), w3 (up), w2 (down).

    megatron's MoELayer (local spec, SequentialMLP): router.weight [experts, hidden] and per
    expert an ordinary SwiGLU MLP. Expert numbers here are global; on a rank of an
    expert-parallel group the importer maps them onto that rank's local experts.
    """
    hidden, ffn = c.hidden_size, c.ffn_hidden_size
    h = h + "block_sparse_moe."
    maps = [_same(m + "mlp.router.weight", h + "gate.weight", (c.num_experts, hidden), i)]
    for e in range(c.num_experts):
        x, he = f"{m}mlp.experts.local_experts.{e}.", f"{h}experts.{e}."
        maps += [_swiglu(x + "linear_fc1.weight", he + "w1.weight", he + "w3.weight", ffn, hidden, i),
                 _same(x + "linear_fc2.weight", he + "w2.weight", (hidden, ffn), i)]
    return maps


def _gpt2_layer(c: ModelConfig, i: int, prefix: str) -> list[TensorMap]:
    m, h = f"decoder.layers.{i}.", f"{prefix}h.{i}."
    hidden, heads, ffn = c.hidden_size, c.num_attention_heads, c.ffn_hidden_size

    def qkv_in(packed):  # Conv1D [in, 3*hidden] (or bias [3*hidden]) -> grouped rows
        rows = packed.t() if packed.dim() == 2 else packed
        return qkv_to_grouped(*rows.split(hidden, dim=0), groups=heads)

    def qkv_out(grouped):
        rows = torch.cat(grouped_to_qkv(grouped, heads, heads), dim=0)
        return (rows.t() if rows.dim() == 2 else rows,)

    return [
        _same(m + "input_layernorm.weight", h + "ln_1.weight", (hidden,), i),
        _same(m + "input_layernorm.bias", h + "ln_1.bias", (hidden,), i),
        TensorMap(m + "self_attention.linear_qkv.weight", (h + "attn.c_attn.weight",), ((hidden, 3 * hidden),),
                  qkv_in, qkv_out, i),
        TensorMap(m + "self_attention.linear_qkv.bias", (h + "attn.c_attn.bias",), ((3 * hidden,),),
                  qkv_in, qkv_out, i),
        _transposed(m + "self_attention.linear_proj.weight", h + "attn.c_proj.weight", (hidden, hidden), i),
        _same(m + "self_attention.linear_proj.bias", h + "attn.c_proj.bias", (hidden,), i),
        _same(m + "pre_mlp_layernorm.weight", h + "ln_2.weight", (hidden,), i),
        _same(m + "pre_mlp_layernorm.bias", h + "ln_2.bias", (hidden,), i),
        _transposed(m + "mlp.linear_fc1.weight", h + "mlp.c_fc.weight", (hidden, ffn), i),
        _same(m + "mlp.linear_fc1.bias", h + "mlp.c_fc.bias", (ffn,), i),
        _transposed(m + "mlp.linear_fc2.weight", h + "mlp.c_proj.weight", (ffn, hidden), i),
        _same(m + "mlp.linear_fc2.bias", h + "mlp.c_proj.bias", (hidden,), i),
    ]


def default_prefix(config: ModelConfig) -> str:
    """Prefix of the trunk's tensors in HF *ForCausalLM / *ForSequenceClassification files."""
    return "model." if config.is_llama else "transformer."


def embedding_name(config: ModelConfig, prefix: str) -> str:
    return prefix + ("embed_tokens.weight" if config.is_llama else "wte.weight")


def trunk_maps(config: ModelConfig, prefix: str) -> list[TensorMap]:
    """Maps for everything except the output head: embeddings, all layers, final norm."""
    c = config
    maps = [_same("embedding.word_embeddings.weight", embedding_name(c, prefix), (c.vocab_size, c.hidden_size))]
    if c.is_llama:
        for i in range(c.num_layers):
            maps += _llama_layer(c, i, prefix)
        maps.append(_same("decoder.final_layernorm.weight", prefix + "norm.weight", (c.hidden_size,)))
    else:
        maps.append(_same("embedding.position_embeddings.weight", prefix + "wpe.weight",
                          (c.max_position_embeddings, c.hidden_size)))
        for i in range(c.num_layers):
            maps += _gpt2_layer(c, i, prefix)
        maps.append(_same("decoder.final_layernorm.weight", prefix + "ln_f.weight", (c.hidden_size,)))
        maps.append(_same("decoder.final_layernorm.bias", prefix + "ln_f.bias", (c.hidden_size,)))
    return maps


def lm_head_map(config: ModelConfig) -> TensorMap:
    return _same("output_layer.weight", "lm_head.weight", (config.vocab_size, config.hidden_size))


def tied_head_map(config: ModelConfig, prefix: str) -> TensorMap:
    """A tied model's last pipeline stage keeps its own copy of the embeddings as output_layer."""
    return _same("output_layer.weight", embedding_name(config, prefix), (config.vocab_size, config.hidden_size))


def score_map(config: ModelConfig) -> TensorMap:
    """*ForSequenceClassification with num_labels=1: `score` is a bias-free [1, hidden] Linear."""
    return _same("output_layer.weight", "score.weight", (1, config.hidden_size))


# Buffers some older exports carry that are not weights (recomputed by every implementation).
IGNORED_SUFFIXES = (".rotary_emb.inv_freq", ".attn.bias", ".attn.masked_bias")
