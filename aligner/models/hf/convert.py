"""Hugging Face checkpoints in and out of aligner's megatron GPTModel, at any TP/PP layout.

    model_config_from_hf(path)                      config.json -> ModelConfig
    load_hf_weights(path, model, config, ...)       each rank copies in its own shard
    save_hf(model, config, out_dir, ...)            collective; global rank 0 writes the directory

Import never materialises more than one full tensor at a time per rank (safetensors are read
lazily), and export gathers over tensor-parallel groups with all_gather and over pipeline
stages with point-to-point sends of plain tensors whose names and shapes every rank derives
from the model config, so nothing is pickled.
"""
from __future__ import annotations

import logging
import re
import shutil
from pathlib import Path

import torch
import torch.distributed as dist

from aligner.models.config import ModelConfig
from aligner.models.gpt import unwrap
from aligner.models.hf import configs, layout, tp_shards
from aligner.models.hf.errors import HFFormatError
from aligner.models.hf.files import HFWeights

log = logging.getLogger("aligner.hf")

__all__ = ["HFFormatError", "model_config_from_hf", "load_hf_weights", "save_hf", "TOKENIZER_FILES"]

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                   "vocab.json", "merges.txt", "tokenizer.model", "chat_template.jinja", "chat_template.json")
_LAYER = re.compile(r"^decoder\.layers\.(\d+)\.")
_EXPERT = re.compile(r"\.mlp\.experts\.local_experts\.(\d+)\.")
# TransformerEngine's layer spec fuses each pre-norm into the following linear layer; the local
# spec (what layout.py names) keeps them as separate modules. Same tensors, other names.
_TE_FUSED_NORMS = {
    ".self_attention.linear_qkv.layer_norm_weight": ".input_layernorm.weight",
    ".self_attention.linear_qkv.layer_norm_bias": ".input_layernorm.bias",
    ".mlp.linear_fc1.layer_norm_weight": ".pre_mlp_layernorm.weight",
    ".mlp.linear_fc1.layer_norm_bias": ".pre_mlp_layernorm.bias",
}


def model_config_from_hf(path: str | Path) -> ModelConfig:
    """The ModelConfig of a Hugging Face directory (config.json), or HFFormatError saying why not."""
    return configs.describe(path).model_config


# ----------------------------------------------------------------------------------------- import


def _trunk_prefix(names: set[str], config: ModelConfig) -> str:
    """'model.' / 'transformer.' as saved from *ForCausalLM; '' for files saved from the bare trunk
    (the original GPT-2 checkpoints were)."""
    prefix = layout.default_prefix(config)
    if layout.embedding_name(config, prefix) not in names and layout.embedding_name(config, "") in names:
        return ""
    return prefix


def _import_plan(source: configs.HFSource, config: ModelConfig, prefix: str, scalar_head: bool):
    """(maps for every megatron parameter that is loaded, HF names that may be present but unused)."""
    maps = layout.trunk_maps(config, prefix)
    unused = set()
    where = f"{source.path} ({source.architecture})"
    if scalar_head:
        if source.head == "score":
            maps.append(layout.score_map(config))
        else:
            unused.add("lm_head.weight")  # a policy checkpoint becoming a critic: fresh value head
    elif config.tie_word_embeddings:
        maps.append(layout.tied_head_map(config, prefix))
        unused |= {"lm_head.weight", "score.weight"}
    elif source.head == "lm":
        maps.append(layout.lm_head_map(config))
    else:
        raise HFFormatError(f"{where} is a reward/classifier model with untied embeddings: it has no language-model "
                            "head (lm_head.weight). Load it with a scalar head (reward model / critic), or use a "
                            "*ForCausalLM / GPT2LMHeadModel checkpoint for a policy")
    return maps, unused


def _check_tensors(weights: HFWeights, maps: list[layout.TensorMap], unused: set[str], config: ModelConfig) -> None:
    """Every needed tensor exists with the shape config.json implies; nothing unknown is left over."""
    present = weights.names()
    expected = {name: shape for m in maps for name, shape in zip(m.hf, m.hf_shapes)}
    where = weights.directory
    missing = [name for name in expected if name not in present]
    if missing:
        raise HFFormatError(f"{where}: missing {len(missing)} tensor(s) that config.json implies, e.g. "
                            f"{missing[:5]}; the weight files hold {len(present)} tensors, e.g. {sorted(present)[:5]}")
    leftover = sorted(name for name in present - expected.keys() - unused
                      if not name.endswith(layout.IGNORED_SUFFIXES))
    if leftover:
        raise HFFormatError(f"{where}: {len(leftover)} tensor(s) this {config.arch} model has no place for, e.g. "
                            f"{leftover[:5]} (config.json says num_hidden_layers={config.num_layers}; biases, "
                            "extra heads or another architecture are not supported)")
    for name, shape in expected.items():
        found = weights.shape(name)
        if tuple(found) != tuple(shape):
            raise HFFormatError(
                f"{where}: tensor {name} has shape {list(found)} but config.json implies {list(shape)} "
                f"(vocab_size={config.vocab_size}, hidden_size={config.hidden_size}, "
                f"intermediate_size={config.ffn_hidden_size}, heads={config.num_attention_heads}, "
                f"kv_heads={config.kv_heads}); config.json and the weights disagree")


def _layer_offset(model) -> int:
    from megatron.core.transformer.transformer_layer import get_transformer_layer_offset

    return get_transformer_layer_offset(model.config)


def _global_name(local_name: str, offset: int, expert_offset: int = 0) -> str:
    """Local name -> local-spec name with layers (pipeline stages) and experts (expert-parallel
    ranks) numbered across the whole model."""
    for fused, plain in _TE_FUSED_NORMS.items():
        if local_name.endswith(fused):
            local_name = local_name[: -len(fused)] + plain
    if expert_offset:
        local_name = _EXPERT.sub(lambda m: f".mlp.experts.local_experts.{int(m.group(1)) + expert_offset}.",
                                 local_name)
    return _LAYER.sub(lambda m: f"decoder.layers.{int(m.group(1)) + offset}.", local_name)


def _is_expert(local_name: str) -> bool:
    return ".mlp.experts." in local_name


def _tp_rank_world(expert: bool = False) -> tuple[int, int]:
    """This rank's place in its tensor-parallel group; experts have their own (expert-TP) group."""
    from megatron.core import parallel_state

    if expert:
        return (parallel_state.get_expert_tensor_parallel_rank(),
                parallel_state.get_expert_tensor_parallel_world_size())
    return parallel_state.get_tensor_model_parallel_rank(), parallel_state.get_tensor_model_parallel_world_size()


def _expert_offset(gpt) -> int:
    """Global number of this rank's first local expert (0 without MoE or expert parallelism)."""
    from megatron.core import parallel_state

    experts = gpt.config.num_moe_experts
    if not experts:
        return 0
    world = parallel_state.get_expert_model_parallel_world_size()
    return parallel_state.get_expert_model_parallel_rank() * (experts // world)


def load_hf_weights(path: str | Path, model, model_config: ModelConfig, scalar_head: bool = False) -> None:
    """Copy this rank's shard of every parameter of `model` from a Hugging Face directory.

    scalar_head=True: from a *ForSequenceClassification source the value head is loaded from
    `score.weight` [1, hidden]; from a causal-LM source it keeps its fresh initialisation.
    """
    source = configs.describe(path)
    weights = HFWeights(path)
    prefix = _trunk_prefix(weights.names(), model_config)
    maps, unused = _import_plan(source, model_config, prefix, scalar_head)
    _check_tensors(weights, maps, unused, model_config)
    by_name = {m.megatron: m for m in maps}

    gpt = unwrap(model)
    offset, expert_offset = _layer_offset(gpt), _expert_offset(gpt)
    loaded = 0
    with torch.no_grad():
        for local_name, param in gpt.named_parameters():
            name = _global_name(local_name, offset, expert_offset)
            tp_rank, tp_world = _tp_rank_world(_is_expert(local_name))
            if name == "output_layer.weight" and scalar_head and source.head != "score":
                continue  # fresh value head
            tmap = by_name.get(name)
            if tmap is None:
                raise HFFormatError(f"{path}: no Hugging Face tensor maps onto parameter {local_name} "
                                    f"(global name {name}); is model_config the one read from this directory?")
            full = tmap.to_megatron(*(weights.get(n) for n in tmap.hf))
            piece = tp_shards.shard(full, tp_shards.partition_of(param), tp_rank, tp_world)
            if piece.shape != param.shape:
                raise HFFormatError(f"{path}: {tmap.hf} give {list(piece.shape)} for {local_name} on TP rank "
                                    f"{tp_rank}/{tp_world}, which holds {list(param.shape)}")
            param.copy_(piece)
            loaded += 1
    log.info("loaded %d parameters from %s (layers offset %d, experts offset %d, TP rank %d/%d)", loaded, path,
             offset, expert_offset, *_tp_rank_world())


# ----------------------------------------------------------------------------------------- export


def _export_maps(config: ModelConfig, scalar_head: bool) -> list[layout.TensorMap]:
    maps = layout.trunk_maps(config, layout.default_prefix(config))
    if scalar_head:
        maps.append(layout.score_map(config))
    elif not config.tie_word_embeddings:
        maps.append(layout.lm_head_map(config))
    return maps


def _stage_maps(maps: list[layout.TensorMap], gpt, stage: int, stages: int) -> list[layout.TensorMap]:
    """The maps whose megatron parameter lives on pipeline stage `stage` (megatron's layer offsets)."""
    from megatron.core.transformer.transformer_layer import get_transformer_layer_offset

    first = get_transformer_layer_offset(gpt.config, pp_rank=stage)
    end = (get_transformer_layer_offset(gpt.config, pp_rank=stage + 1) if stage + 1 < stages
           else gpt.config.num_layers)
    keep = {"first": stage == 0, "last": stage == stages - 1}
    return [m for m in maps if (first <= m.layer < end if m.stage_role == "layer" else keep[m.stage_role])]


def _gather_tensor_parallel(gpt) -> dict[str, torch.Tensor]:
    """Full tensors of this stage, keyed by global megatron name (collective over the TP group,
    and for MoE experts over the expert-TP and expert-parallel groups)."""
    from megatron.core import parallel_state

    offset = _layer_offset(gpt)
    experts = gpt.config.num_moe_experts
    ep_world = parallel_state.get_expert_model_parallel_world_size() if experts else 1
    full = {}
    for local_name, param in gpt.named_parameters():
        expert = _is_expert(local_name)
        group = (parallel_state.get_expert_tensor_parallel_group() if expert
                 else parallel_state.get_tensor_model_parallel_group())
        world = _tp_rank_world(expert)[1]
        part = tp_shards.partition_of(param)
        data = param.detach()
        if part is not None and world > 1:
            pieces = [torch.empty_like(data) for _ in range(world)]
            dist.all_gather(pieces, data.contiguous(), group=group)
            data = tp_shards.unshard(pieces, part)
        if expert and ep_world > 1:  # every expert-parallel rank holds experts // ep_world others
            pieces = [torch.empty_like(data) for _ in range(ep_world)]
            dist.all_gather(pieces, data.contiguous(), group=parallel_state.get_expert_model_parallel_group())
            for ep_rank, piece in enumerate(pieces):
                full[_global_name(local_name, offset, ep_rank * (experts // ep_world))] = piece
            continue
        full[_global_name(local_name, offset)] = data
    return full


def _hf_tensors(maps: list[layout.TensorMap], full: dict[str, torch.Tensor], dtype: torch.dtype):
    """(hf name, tensor) in map order, converted to the export dtype."""
    for tmap in maps:
        if tmap.megatron not in full:
            raise RuntimeError(f"save_hf: parameter {tmap.megatron} is not on this pipeline stage")
        for name, tensor in zip(tmap.hf, tmap.to_hf(full[tmap.megatron])):
            yield name, tensor.to(dtype).contiguous()


def _special_tokens(tokenizer_dir) -> dict:
    if tokenizer_dir is None:
        return {"bos_token_id": None, "eos_token_id": None, "pad_token_id": None}
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir), local_files_only=True)
    return {"bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id, "pad_token_id": tok.pad_token_id}


def _write_directory(out_dir, tensors: dict, model_config: ModelConfig, dtype: torch.dtype, scalar_head: bool,
                     tokenizer_dir, extra_config: dict | None) -> None:
    from safetensors.torch import save_file
    from transformers import GenerationConfig

    from aligner.data.atomic_io import replace_dir_atomic

    if tokenizer_dir is not None:
        tokenizer_files = [Path(tokenizer_dir) / n for n in TOKENIZER_FILES if (Path(tokenizer_dir) / n).is_file()]
        if not tokenizer_files:
            raise FileNotFoundError(f"save_hf(tokenizer_dir={tokenizer_dir}): no tokenizer files there "
                                    f"(looked for {', '.join(TOKENIZER_FILES)})")
    tokens = _special_tokens(tokenizer_dir)
    hf_config = configs.export_config(model_config, dtype, scalar_head, tokens, extra_config)
    with replace_dir_atomic(out_dir) as tmp:
        save_file(tensors, str(Path(tmp) / "model.safetensors"), metadata={"format": "pt"})
        hf_config.save_pretrained(tmp)
        GenerationConfig(**{k: v for k, v in tokens.items() if v is not None}).save_pretrained(tmp)
        if tokenizer_dir is not None:
            for file in tokenizer_files:
                shutil.copy2(file, Path(tmp) / file.name)


def save_hf(model, model_config: ModelConfig, out_dir: str | Path, tokenizer_dir: str | Path | None = None,
            scalar_head: bool = False, extra_config: dict | None = None) -> Path:
    """Write `model` as a Hugging Face directory loadable by plain `from_pretrained(out_dir)`.

    Collective: every rank of every TP/PP/DP group must call it. Global rank 0 writes
    model.safetensors, config.json (+ `extra_config` keys), generation_config.json and the
    tokenizer files of `tokenizer_dir`, into a temporary directory renamed into place.
    scalar_head=True exports *ForSequenceClassification with num_labels=1 (`score.weight`).
    """
    from megatron.core import parallel_state

    gpt = unwrap(model)
    dtype = gpt.config.params_dtype
    device = next(gpt.parameters()).device  # NCCL moves only device tensors; gloo CPU ones
    maps = _export_maps(model_config, scalar_head)
    full = _gather_tensor_parallel(gpt)

    distributed = dist.is_initialized()
    rank = dist.get_rank() if distributed else 0
    stages = parallel_state.get_pipeline_model_parallel_world_size()
    stage = parallel_state.get_pipeline_model_parallel_rank()
    pipeline_ranks = dist.get_process_group_ranks(parallel_state.get_pipeline_model_parallel_group()) \
        if distributed else [0]
    in_rank0_pipeline = pipeline_ranks[0] == 0

    error: BaseException | None = None
    if rank == 0:
        tensors = {name: t.cpu() for name, t in _hf_tensors(_stage_maps(maps, gpt, 0, stages), full, dtype)}
        for other in range(1, stages):
            for tmap in _stage_maps(maps, gpt, other, stages):
                for name, shape in zip(tmap.hf, tmap.hf_shapes):
                    buffer = torch.empty(shape, dtype=dtype, device=device)
                    dist.recv(buffer, src=pipeline_ranks[other])
                    tensors[name] = buffer.cpu()
        try:
            _write_directory(out_dir, tensors, model_config, dtype, scalar_head, tokenizer_dir, extra_config)
            log.info("exported %d tensors to %s", len(tensors), out_dir)
        except BaseException as exc:  # tell the other ranks before re-raising, so none waits forever
            error = exc
    elif in_rank0_pipeline and stage > 0:
        for _, tensor in _hf_tensors(_stage_maps(maps, gpt, stage, stages), full, dtype):
            dist.send(tensor, dst=0)
    if distributed:
        status = torch.tensor([0 if error is None else 1], dtype=torch.int32, device=device)
        dist.broadcast(status, src=0)
        if status.item() and error is None:
            raise RuntimeError(f"save_hf({out_dir}) failed on global rank 0; see that rank's error")
    if error is not None:
        raise error
    return Path(out_dir)
