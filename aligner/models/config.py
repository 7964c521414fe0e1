"""One model description for every trainer, mapped onto megatron-core's TransformerConfig.

Two families are supported: Llama-style (RMSNorm, SwiGLU, RoPE, grouped-query attention,
no biases) and GPT-2-style (LayerNorm, tanh-GELU, learned positions, biases, tied embeddings).
The Llama-style family has the switches that Llama 3.x, Mistral, Qwen2/2.5, Qwen3 and Mixtral
differ by: llama3 RoPE scaling, a sliding attention window, QKV biases, per-head q/k RMSNorm,
a head size other than hidden/heads, and mixture-of-experts MLPs.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Mapping

import torch
import torch.nn.functional as F

ARCHITECTURES = ("llama", "gpt2")
_DTYPES = {"fp32": torch.float32, "float32": torch.float32, "32": torch.float32,
           "bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "bf16-mixed": torch.bfloat16}


class ModelConfigError(ValueError):
    pass


@dataclass
class ModelConfig:
    arch: str = "llama"
    vocab_size: int = 4096
    hidden_size: int = 256
    ffn_hidden_size: int = 688
    num_layers: int = 4
    num_attention_heads: int = 4
    num_query_groups: int | None = None  # None: multi-head attention (as many KV heads as heads)
    max_position_embeddings: int = 512
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    tie_word_embeddings: bool = False
    hidden_dropout: float = 0.0
    attention_dropout: float = 0.0
    init_method_std: float = 0.02
    attention_backend: str = "sdpa"  # sdpa (torch fused kernel) | local (megatron unfused); TE replaces both on GPU
    # --- Llama-style variants (all off by default: plain Llama-2) ---
    kv_channels: int | None = None  # head size; None: hidden_size / num_attention_heads (Qwen3 differs)
    add_qkv_bias: bool = False  # biases on q/k/v only (Qwen2); never on the output projection
    qk_layernorm: bool = False  # RMSNorm over each q and k head before RoPE (Qwen3)
    rope_scaling: str | None = None  # None | "llama3" (Llama 3.1+ frequency-dependent scaling)
    rope_scaling_factor: float = 8.0
    rope_low_freq_factor: float = 1.0
    rope_high_freq_factor: float = 4.0
    rope_original_max_position_embeddings: int = 8192
    sliding_window: int | None = None  # each query sees the last `sliding_window` keys, itself included
    # --- mixture of experts (Mixtral): every layer's MLP is `num_experts` SwiGLU experts ---
    num_experts: int | None = None
    moe_router_topk: int = 2  # experts per token; their softmax weights are renormalised to sum to 1

    @property
    def is_llama(self) -> bool:
        return self.arch == "llama"

    @property
    def kv_heads(self) -> int:
        return self.num_query_groups or self.num_attention_heads

    @property
    def head_dim(self) -> int:
        return self.kv_channels or self.hidden_size // self.num_attention_heads

    def validate(self, tensor_parallel: int = 1, key_prefix: str = "model") -> None:
        def bad(key: str, msg: str):
            raise ModelConfigError(f"{key_prefix}.{key}: {msg}")

        if self.arch not in ARCHITECTURES:
            bad("arch", f"unsupported architecture {self.arch!r}; supported: {', '.join(ARCHITECTURES)}")
        for key in ("vocab_size", "hidden_size", "ffn_hidden_size", "num_layers", "num_attention_heads",
                    "max_position_embeddings"):
            value = getattr(self, key)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                bad(key, f"must be a positive integer, got {value!r}")
        if self.attention_backend not in ("sdpa", "local"):
            bad("attention_backend", f"unsupported {self.attention_backend!r}; use sdpa or local")
        if self.kv_channels is None and self.hidden_size % self.num_attention_heads:
            bad("hidden_size", f"{self.hidden_size} is not divisible by num_attention_heads={self.num_attention_heads}"
                " (or set kv_channels, the head size)")
        self._validate_variants(bad)
        if self.num_attention_heads % self.kv_heads:
            bad("num_query_groups", f"num_attention_heads={self.num_attention_heads} is not a multiple of {self.kv_heads}")
        if self.num_attention_heads % tensor_parallel or self.kv_heads % tensor_parallel:
            bad("num_attention_heads", f"heads ({self.num_attention_heads}) and KV heads ({self.kv_heads}) must "
                f"be divisible by model.tensor_model_parallel_size={tensor_parallel}")
        if self.ffn_hidden_size % tensor_parallel:
            bad("ffn_hidden_size", f"{self.ffn_hidden_size} is not divisible by tensor_model_parallel_size={tensor_parallel}")

    def _validate_variants(self, bad) -> None:
        if self.kv_channels is not None and (not isinstance(self.kv_channels, int) or self.kv_channels < 1):
            bad("kv_channels", f"must be a positive integer or null, got {self.kv_channels!r}")
        if not self.is_llama:
            for key in ("kv_channels", "rope_scaling", "sliding_window", "num_experts"):
                if getattr(self, key) is not None:
                    bad(key, f"is for Llama-style models (arch=llama), not arch={self.arch!r}")
            for key in ("add_qkv_bias", "qk_layernorm"):
                if getattr(self, key):
                    bad(key, f"is for Llama-style models (arch=llama), not arch={self.arch!r}")
        if self.rope_scaling not in (None, "llama3"):
            bad("rope_scaling", f"unsupported {self.rope_scaling!r}; use null or llama3")
        if self.rope_scaling == "llama3" and not self.rope_low_freq_factor < self.rope_high_freq_factor:
            bad("rope_high_freq_factor", f"{self.rope_high_freq_factor} must exceed rope_low_freq_factor "
                f"{self.rope_low_freq_factor}")
        if self.sliding_window is not None and (not isinstance(self.sliding_window, int) or self.sliding_window < 1):
            bad("sliding_window", f"must be a positive integer or null, got {self.sliding_window!r}")
        if self.sliding_window is not None and self.attention_backend == "local":
            # megatron's unfused attention builds its window mask on device "cuda" at every call,
            # which fails on CPU inside the KV-cache sampler
            bad("attention_backend", f"local does not support sliding_window={self.sliding_window} here; use sdpa")
        if self.num_experts is not None:
            if not isinstance(self.num_experts, int) or self.num_experts < 2:
                bad("num_experts", f"must be an integer >= 2 or null, got {self.num_experts!r}")
            # top-1 needs megatron's pre-softmax routing, which weighs the expert by its probability
            # where Mixtral's renormalisation gives it weight 1: a different model
            if not 2 <= self.moe_router_topk <= self.num_experts:
                bad("moe_router_topk", f"{self.moe_router_topk} must be between 2 and num_experts={self.num_experts}")

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any], key_prefix: str = "model.arch_config") -> "ModelConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - names)
        if unknown:
            raise ModelConfigError(
                f"{key_prefix}: unknown key(s) {unknown}; known keys: {sorted(names)}"
            )
        config = cls(**dict(values))
        config.validate(key_prefix=key_prefix)
        return config

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def parse_precision(precision: Any) -> torch.dtype:
    key = str(precision).lower()
    if key not in _DTYPES:
        raise ModelConfigError(f"trainer.precision: unsupported value {precision!r}; use 32 or bf16")
    return _DTYPES[key]


def gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    """GPT-2's GELU (the tanh approximation, HF's 'gelu_new')."""
    return F.gelu(x, approximate="tanh")


def _moe_settings(config: ModelConfig, expert_parallel: int) -> dict:
    """megatron MoE options reproducing Mixtral's router: softmax over all experts, keep the top k,
    renormalise them to sum to 1 (= megatron's top-k of the logits, then softmax over those k)."""
    if config.num_experts is None:
        return {}
    return dict(
        num_moe_experts=config.num_experts,
        moe_router_topk=config.moe_router_topk,
        moe_ffn_hidden_size=config.ffn_hidden_size,
        moe_router_pre_softmax=False,
        moe_router_score_function="softmax",
        moe_router_dtype="fp32",
        # No auxiliary balancing loss and no token dropping: the MoE layer is a pure function of
        # its input, as in transformers (whose aux loss is off unless output_router_logits).
        moe_router_load_balancing_type="none",
        moe_aux_loss_coeff=0.0,
        moe_token_dispatcher_type="alltoall",
        moe_grouped_gemm=False,
        expert_model_parallel_size=expert_parallel,
    )


def to_transformer_config(config: ModelConfig, dtype: torch.dtype, tensor_parallel: int, pipeline_parallel: int,
                          expert_parallel: int = 1):
    """Build megatron's TransformerConfig; fusions that need apex/TE are off on CPU."""
    from megatron.core.transformer.transformer_config import TransformerConfig

    from aligner.compat.optional import transformer_engine_usable

    fused = transformer_engine_usable()
    llama = config.is_llama
    # megatron's window (left, right): query i sees keys i-left..i+right; HF's window counts the query itself
    window = None if config.sliding_window is None else (config.sliding_window - 1, 0)
    return TransformerConfig(
        num_layers=config.num_layers,
        hidden_size=config.hidden_size,
        ffn_hidden_size=config.ffn_hidden_size,
        num_attention_heads=config.num_attention_heads,
        num_query_groups=config.kv_heads,
        kv_channels=config.head_dim,
        normalization="RMSNorm" if llama else "LayerNorm",
        layernorm_epsilon=config.norm_eps,
        gated_linear_unit=llama,
        activation_func=F.silu if llama else gelu_tanh,
        add_bias_linear=not llama,
        add_qkv_bias=not llama or config.add_qkv_bias,
        qk_layernorm=config.qk_layernorm,
        window_size=window,
        hidden_dropout=config.hidden_dropout,
        attention_dropout=config.attention_dropout,
        init_method_std=config.init_method_std,
        use_cpu_initialization=True,
        params_dtype=dtype,
        pipeline_dtype=dtype,
        bf16=dtype == torch.bfloat16,
        tensor_model_parallel_size=tensor_parallel,
        pipeline_model_parallel_size=pipeline_parallel,
        attention_softmax_in_fp32=True,
        gradient_accumulation_fusion=False,
        bias_activation_fusion=fused and not llama,
        masked_softmax_fusion=fused,
        persist_layer_norm=fused,
        apply_rope_fusion=False,
        bias_dropout_fusion=fused,
        # Losses are sums divided by the global token (or pair) count: exact across DP layouts.
        calculate_per_token_loss=True,
        **_moe_settings(config, expert_parallel),
    )
