"""Build megatron-core GPTModels (policy, and a scalar-head variant for critics/reward models).

The layer spec is TransformerEngine's when TE is importable on a CUDA machine, else
megatron's local spec (pure PyTorch), which is what runs on CPU.
"""
from __future__ import annotations

import torch
from torch import nn

from aligner.models.config import ModelConfig, to_transformer_config


def layer_spec(config: ModelConfig, use_transformer_engine: bool | None = None):
    from megatron.core.models.gpt import gpt_layer_specs

    from aligner.compat.optional import require, transformer_engine_usable

    if use_transformer_engine is None:
        use_transformer_engine = transformer_engine_usable()
    if use_transformer_engine:
        require("transformer_engine", "model.transformer_engine")
        return gpt_layer_specs.get_gpt_layer_with_transformer_engine_spec(
            num_experts=config.num_experts, qk_layernorm=config.qk_layernorm)
    spec = gpt_layer_specs.get_gpt_layer_local_spec(
        num_experts=config.num_experts, qk_layernorm=config.qk_layernorm,
        normalization="RMSNorm" if config.is_llama else "LayerNorm")
    from aligner.models.attention import CachedRotarySelfAttention, SDPAttention

    if config.is_llama:  # RoPE models: rotate keys once, before they enter the KV cache
        spec.submodules.self_attention.module = CachedRotarySelfAttention
    if config.attention_backend == "sdpa":
        spec.submodules.self_attention.submodules.core_attention = SDPAttention
    return spec


class ScalarHead(nn.Module):
    """hidden [S,B,H] -> one value per position [S,B,1]; replaces the vocabulary projection.

    It mimics the output layer's call signature so GPTModel's post-processing can use it. It is
    replicated (not split) across tensor-parallel ranks: its input is identical on all of them.
    """

    def __init__(self, hidden_size: int, dtype: torch.dtype):
        super().__init__()
        # No bias, like Hugging Face's *ForSequenceClassification `score`, so exports are exact.
        self.weight = nn.Parameter(torch.zeros(1, hidden_size, dtype=dtype))
        self.sequence_parallel = False

    def forward(self, hidden, weight=None, runtime_gather_output=None):
        # computed in fp32 even on a bf16 trunk: values feed GAE and BT losses (the optimizer's
        # fp32 master copy keeps the weight itself precise)
        return torch.nn.functional.linear(hidden.float(), self.weight.float()), None

    def sharded_state_dict(self, prefix: str = "", sharded_offsets=(), metadata=None):
        from megatron.core.transformer.utils import make_sharded_tensors_for_checkpoint

        return make_sharded_tensors_for_checkpoint(
            self.state_dict(prefix="", keep_vars=True), prefix, {}, sharded_offsets
        )


def build_gpt(
    config: ModelConfig,
    dtype: torch.dtype,
    tensor_parallel: int = 1,
    pipeline_parallel: int = 1,
    scalar_head: bool = False,
    use_transformer_engine: bool | None = None,
):
    """A GPTModel for this rank's pipeline stage. `scalar_head=True` gives a critic/RM trunk."""
    from megatron.core import parallel_state
    from megatron.core.models.gpt import GPTModel

    config.validate(tensor_parallel)
    # Expert parallelism is a layout of the process groups (model.expert_model_parallel_size, set
    # where the groups are made); the model follows whatever megatron was initialised with.
    expert_parallel = parallel_state.get_expert_model_parallel_world_size() if config.num_experts else 1
    if not config.num_experts and parallel_state.get_expert_model_parallel_world_size() > 1:
        raise ValueError(f"model.expert_model_parallel_size={parallel_state.get_expert_model_parallel_world_size()} "
                         "needs a mixture-of-experts model (model.num_experts, or a Mixtral checkpoint)")
    if config.num_experts and config.num_experts % expert_parallel:
        raise ValueError(f"num_experts={config.num_experts} is not divisible by "
                         f"model.expert_model_parallel_size={expert_parallel}")
    if config.num_experts:
        _megatron_moe_without_te()
    tconfig = to_transformer_config(config, dtype, tensor_parallel, pipeline_parallel, expert_parallel)
    post_process = parallel_state.is_pipeline_last_stage()
    model = GPTModel(
        config=tconfig,
        transformer_layer_spec=layer_spec(config, use_transformer_engine),
        vocab_size=config.vocab_size,
        max_sequence_length=config.max_position_embeddings,
        pre_process=parallel_state.is_pipeline_first_stage(),
        post_process=post_process,
        parallel_output=True,
        share_embeddings_and_output_weights=config.tie_word_embeddings and not scalar_head,
        position_embedding_type="rope" if config.is_llama else "learned_absolute",
        rotary_base=config.rope_theta,
        rope_scaling=config.rope_scaling == "llama3",
        rope_scaling_factor=config.rope_scaling_factor,
    )
    if config.rope_scaling == "llama3":
        _llama3_frequencies(model.rotary_pos_emb, config)
    if scalar_head and post_process:
        model.output_layer = ScalarHead(config.hidden_size, torch.float32)
    return model.to(dtype)


def _megatron_moe_without_te() -> None:
    """megatron-core 0.16.1's router GEMM tests `te_general_gemm is not None`, a name that
    moe_utils only defines when TransformerEngine imports: without TE (CPU, or GPUs without it)
    every MoE forward raises NameError. Defining it as None selects the plain torch matmul that
    the same function already has for that case."""
    from megatron.core.transformer.moe import moe_utils

    if not hasattr(moe_utils, "te_general_gemm"):
        moe_utils.te_general_gemm = None


def _llama3_frequencies(rotary, config: ModelConfig) -> None:
    """Llama 3.x RoPE frequencies with all four of the checkpoint's scaling numbers.

    megatron-core 0.16's RotaryEmbedding passes only `factor` to its `_apply_scaling` and keeps
    low_freq_factor=1, high_freq_factor=4, original_max_position_embeddings=8192 (Llama 3.1's
    values). Llama 3.2 and fine-tunes may use others, so the frequencies are derived again from
    the unscaled ones with megatron's own `_apply_scaling` (the same formula as transformers'
    `_compute_llama3_parameters`), given every number.
    """
    dim = config.head_dim
    unscaled = 1.0 / (config.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    rotary.inv_freq = rotary._apply_scaling(
        unscaled.to(rotary.inv_freq.device), factor=config.rope_scaling_factor,
        low_freq_factor=config.rope_low_freq_factor, high_freq_factor=config.rope_high_freq_factor,
        original_max_position_embeddings=config.rope_original_max_position_embeddings)


def position_ids_for(tokens: torch.Tensor) -> torch.Tensor:
    """[B,S] -> [B,S] positions 0..S-1 (sequences are right-padded, so no offsets)."""
    batch, seq = tokens.shape
    return torch.arange(seq, device=tokens.device).unsqueeze(0).expand(batch, seq)


def next_token_logits(model, tokens: torch.Tensor, first_column: int = 0) -> torch.Tensor:
    """[B, S - first_column, V] logits (gathered over tensor-parallel ranks) of the positions
    from ``first_column`` on; position t predicts token t+1.

    The vocabulary projection is a large share of a small model's work (a 4096-word vocabulary
    on a 128-wide model costs about as much as the layers), and losses over responses never
    read the prompt columns: those hidden states are dropped before the output layer. Pipeline
    stages without the output layer return their hidden states whole."""
    layer = getattr(unwrap(model), "output_layer", None)
    if not first_column or layer is None:
        return model(tokens, position_ids_for(tokens), None, runtime_gather_output=True)
    project = layer.forward
    layer.forward = lambda hidden, *args, **kwargs: project(hidden[first_column:], *args, **kwargs)  # [S,B,H]
    try:
        return model(tokens, position_ids_for(tokens), None, runtime_gather_output=True)
    finally:
        del layer.forward


def causal_attention_mask(seq: int, device) -> torch.Tensor:
    """[1,1,S,S] bool, True where attention is NOT allowed (megatron's convention)."""
    return torch.ones(seq, seq, dtype=torch.bool, device=device).triu(1).view(1, 1, seq, seq)


def unwrap(model):
    """Strip DDP / Float16 wrappers down to the GPTModel."""
    while hasattr(model, "module"):
        model = model.module
    return model
