"""Core attention through torch's fused scaled_dot_product_attention.

megatron's local DotProductAttention materialises the [b, heads, s, s] score matrix, repeats
K/V for grouped-query attention and runs an unfused softmax. Without TransformerEngine (CPU,
or GPUs without TE) SDPA is markedly faster and uses less memory, with the same maths,
including megatron's sliding window (`TransformerConfig.window_size`, Mistral's `sliding_window`).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from megatron.core import tensor_parallel
from megatron.core.models.common.embeddings.rope_utils import apply_rotary_pos_emb
from megatron.core.models.common.embeddings.yarn_rotary_pos_embedding import (
    _yarn_get_concentration_factor_from_config,
)
from megatron.core.transformer.attention import SelfAttention
from megatron.core.transformer.dot_product_attention import DotProductAttention


class SDPAttention(DotProductAttention):
    """Drop-in core attention: q [sq,b,np,hn], k/v [sk,b,ng,hn] -> context [sq,b,np*hn]."""

    def forward(self, query, key, value, attention_mask, attn_mask_type=None, attention_bias=None,
                packed_seq_params=None):
        if packed_seq_params is not None or attention_bias is not None:
            raise NotImplementedError("SDPAttention supports neither packed sequences nor attention bias")
        sq, batch, heads, head_dim = query.shape
        sk = key.shape[0]
        q = query.permute(1, 2, 0, 3)  # [b, np, sq, hn]
        k = key.permute(1, 2, 0, 3)
        v = value.permute(1, 2, 0, 3)
        mask, causal = None, False
        if attention_mask is not None:
            mask = ~attention_mask  # megatron: True = masked out; SDPA: True = may attend
            if mask.dim() == 4 and mask.shape[-2] != sq:
                mask = mask[..., -sq:, :]
        elif sq == sk:
            causal = True
        else:  # decoding with a KV cache: the sq queries are the last sq positions
            offset = sk - sq
            keys = torch.arange(sk, device=q.device)
            queries = torch.arange(sq, device=q.device) + offset
            mask = keys.unsqueeze(0) <= queries.unsqueeze(1)
        if self.config.window_size is not None:
            mask, causal = self._window(mask, sq, sk, q.device), False
        dropout = self.attention_dropout.p if self.training else 0.0
        gqa = heads != k.shape[1]
        if dropout > 0:
            with tensor_parallel.get_cuda_rng_tracker().fork():
                context = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout,
                                                         is_causal=causal, scale=self.softmax_scale, enable_gqa=gqa)
        else:
            context = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal,
                                                     scale=self.softmax_scale, enable_gqa=gqa)
        return context.permute(2, 0, 1, 3).reshape(sq, batch, heads * head_dim)

    def _window(self, mask, sq: int, sk: int, device):
        """`mask` (True = may attend) narrowed to megatron's `window_size` (left, right) band.

        The sq queries are the last sq of the sk key slots (a KV cache holds the earlier ones);
        query slot i sees key slots i-left..i+right, as megatron's `get_sliding_window_causal_mask`.
        """
        left, right = self.config.window_size
        queries = torch.arange(sk - sq, sk, device=device).unsqueeze(1)
        keys = torch.arange(sk, device=device).unsqueeze(0)
        band = (keys >= queries - left) & (keys <= queries + right)
        return band if mask is None else mask & band


class CachedRotarySelfAttention(SelfAttention):
    """Self-attention whose KV cache holds keys already rotated by RoPE.

    megatron's static-batching cache stores keys *before* the rotary embedding, so every decode
    step re-rotates the whole cached key sequence in every layer: work that grows with the
    length and cost ~35% of a decode step here. Rotating each key once, at its own position,
    before it enters the cache gives the same attention scores (RoPE is absolute per position).
    """

    def _adjust_key_value_for_inference(self, inference_context, query, key, value, rotary_pos_emb,
                                        rotary_pos_cos=None, rotary_pos_sin=None, rotary_pos_cos_sin=None,
                                        sequence_len_offset=None, *, inference_params=None):
        plain = (inference_context is None or not inference_context.is_static_batching()
                 or rotary_pos_emb is None or rotary_pos_cos is not None)
        if plain:
            return super()._adjust_key_value_for_inference(
                inference_context, query, key, value, rotary_pos_emb, rotary_pos_cos, rotary_pos_sin,
                rotary_pos_cos_sin, sequence_len_offset, inference_params=inference_params)
        q_pos_emb, k_pos_emb = rotary_pos_emb
        start = inference_context.sequence_len_offset
        end = start + key.size(0)
        key = apply_rotary_pos_emb(key, k_pos_emb[start:end], config=self.config,
                                   mscale=_yarn_get_concentration_factor_from_config(self.config),
                                   cp_group=self.pg_collection.cp)
        query, key, value, _, mask_type, block_table = super()._adjust_key_value_for_inference(
            inference_context, query, key, value, None, None, None, None, sequence_len_offset,
            inference_params=inference_params)
        return query, key, value, (q_pos_emb[start:end], None), mask_type, block_table
