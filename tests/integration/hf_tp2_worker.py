"""Worker for test_hf_tp2.py (run under torchrun with 2 processes).

    hf_tp2_worker.py OUT_ROOT HF_DIR [HF_DIR ...]

For each HF directory (names ending in _lm: causal LM, _score: classifier):
  TP=2: load, compare gathered logits (or per-token values) with transformers on the same
        tokens, export with save_hf to OUT_ROOT/tp2/<name>; rank 0 checks the export holds
        exactly the original tensors.
  PP=2: load each stage (layers offset by stage), export to OUT_ROOT/pp2/<name>, same check.
  EP=2 (mixture-of-experts directories only, TP=1): each rank holds half of the experts; same
        logit comparison and export check (OUT_ROOT/ep2/<name>).
Prints one `max_abs_diff` line per rank and directory for TP=2, and for EP=2.
"""
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import load_file

from aligner.distributed import setup as dist_setup
from aligner.models.gpt import build_gpt, position_ids_for
from aligner.models.hf import convert

TOL = 1e-4


def tokens_for(vocab: int) -> torch.Tensor:
    return torch.randint(1, vocab, (2, 16), generator=torch.Generator().manual_seed(3))


def check_export_equals(original_dir: Path, export_dir: Path) -> None:
    original = load_file(str(original_dir / "model.safetensors"))
    exported = load_file(str(export_dir / "model.safetensors"))
    assert exported.keys() == original.keys(), sorted(set(exported) ^ set(original))
    for name, tensor in original.items():
        assert torch.equal(exported[name], tensor), f"{export_dir}: {name} differs"


def reference_output(path: Path, scalar: bool, tokens: torch.Tensor) -> torch.Tensor:
    """transformers' output: logits [B,S,V] for causal LMs, the per-token score [B,S,1] for classifiers."""
    import transformers

    if scalar:
        hf = transformers.AutoModelForSequenceClassification.from_pretrained(path).eval()
        with torch.no_grad():  # the classifier's score at every position = its logit for the prefix
            hidden = hf.base_model(tokens).last_hidden_state
            return hf.score(hidden)
    hf = transformers.AutoModelForCausalLM.from_pretrained(path).eval()
    with torch.no_grad():
        return hf(tokens).logits


def compare_and_export(path: Path, out_dir: Path, rank: int, label: str, tensor_parallel: int) -> None:
    """Load at the current layout, compare with transformers, export to out_dir and check it."""
    scalar = path.name.endswith("_score")
    config = convert.model_config_from_hf(path)
    model = build_gpt(config, torch.float32, tensor_parallel=tensor_parallel, scalar_head=scalar).eval()
    convert.load_hf_weights(path, model, config, scalar_head=scalar)
    if config.num_experts:
        from megatron.core import parallel_state

        held = len(model.decoder.layers[0].mlp.experts.local_experts)
        assert held == config.num_experts // parallel_state.get_expert_model_parallel_world_size(), held
    tokens = tokens_for(config.vocab_size)
    with torch.no_grad():
        ours = model(tokens, position_ids_for(tokens), None, runtime_gather_output=True)
    want = reference_output(path, scalar, tokens)
    assert ours.shape == want.shape, (ours.shape, want.shape)
    diff = (ours - want).abs().max().item()
    print(f"rank {rank} {label} {path.name} max_abs_diff={diff:.3e}", flush=True)
    assert diff < TOL, (path.name, diff)
    export = convert.save_hf(model, config, out_dir / path.name, scalar_head=scalar)
    if rank == 0:
        check_export_equals(path, export)


def tp2(path: Path, out_root: Path, rank: int) -> None:
    compare_and_export(path, out_root / "tp2", rank, "tp=2", tensor_parallel=2)


def ep2(path: Path, out_root: Path, rank: int) -> None:
    from megatron.core import parallel_state

    assert parallel_state.get_expert_model_parallel_world_size() == 2
    compare_and_export(path, out_root / "ep2", rank, "ep=2", tensor_parallel=1)


def pp2(path: Path, out_root: Path, rank: int) -> None:
    from megatron.core import parallel_state

    scalar = path.name.endswith("_score")
    config = convert.model_config_from_hf(path)
    model = build_gpt(config, torch.float32, pipeline_parallel=2, scalar_head=scalar)
    convert.load_hf_weights(path, model, config, scalar_head=scalar)
    stage = parallel_state.get_pipeline_model_parallel_rank()
    layers = len(model.decoder.layers)
    assert layers == config.num_layers // 2, layers
    print(f"rank {rank} pp=2 stage {stage} {path.name} holds {layers} layer(s)", flush=True)
    export = convert.save_hf(model, config, out_root / "pp2" / path.name, scalar_head=scalar)
    if rank == 0:
        check_export_equals(path, export)


def expert_parallel_layout() -> None:
    """TP=1, PP=1, EP=2 over the two processes (what model.expert_model_parallel_size=2 asks for)."""
    from megatron.core import parallel_state

    dist_setup.initialize(1, 1, seed=3)
    parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(expert_model_parallel_size=2)


def main() -> None:
    out_root, dirs = Path(sys.argv[1]), [Path(p) for p in sys.argv[2:]]
    layout = dist_setup.initialize(2, 1, seed=3)
    assert layout.tensor_parallel == 2 and layout.world_size == 2
    for path in dirs:
        tp2(path, out_root, layout.rank)
    layout = dist_setup.initialize(1, 2, seed=3)
    for path in dirs:
        pp2(path, out_root, layout.rank)
    moe = [path for path in dirs if convert.model_config_from_hf(path).num_experts]
    if moe:
        expert_parallel_layout()
        for path in moe:
            ep2(path, out_root, layout.rank)
    dist.barrier()
    dist_setup.shutdown()


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
