"""Export a native aligner checkpoint (any trainer's step_N directory) as a Hugging Face model
directory that plain transformers loads: *ForCausalLM, or *ForSequenceClassification for a
reward model / critic checkpoint.

    python examples/nlp/gpt/export_hf.py CHECKPOINT_DIR OUT_DIR [--tokenizer-dir DIR]
    torchrun --nproc_per_node 2 examples/nlp/gpt/export_hf.py CKPT OUT --tensor-parallel 2

The architecture comes from the checkpoint's trainer_state.json; the tokenizer files are copied
from --tokenizer-dir (default: the tokenizer the run was trained with).
"""
from __future__ import annotations

import argparse
from pathlib import Path


def export(checkpoint_dir: str | Path, out_dir: str | Path, tokenizer_dir: str | Path | None = None,
           tensor_parallel: int = 1) -> Path:
    """Collective on every rank of the launch. Returns the written directory."""
    import torch

    from aligner.distributed import setup
    from aligner.models.config import ModelConfig
    from aligner.models.gpt import build_gpt
    from aligner.models.hf import convert
    from aligner.training import checkpoint

    state = checkpoint.read_trainer_state(checkpoint_dir)  # CheckpointError naming the directory if not whole
    if not state.get("model_config"):
        raise SystemExit(f"{checkpoint_dir}/trainer_state.json has no 'model_config': not an aligner checkpoint")
    setup.initialize(tensor_parallel, 1)
    config = ModelConfig(**state["model_config"])
    scalar_head = bool(state.get("scalar_head"))
    model = build_gpt(config, torch.float32, tensor_parallel=tensor_parallel, scalar_head=scalar_head)
    checkpoint.load_weights_only(checkpoint_dir, model)
    tokenizer = tokenizer_dir or state.get("tokenizer")
    return convert.save_hf(model, config, out_dir, tokenizer_dir=tokenizer, scalar_head=scalar_head)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", help="a complete step_N directory")
    parser.add_argument("out_dir")
    parser.add_argument("--tokenizer-dir", default=None)
    parser.add_argument("--tensor-parallel", type=int, default=1)
    args = parser.parse_args()
    out = export(args.checkpoint, args.out_dir, args.tokenizer_dir, args.tensor_parallel)
    print(f"exported {args.checkpoint} -> {out}", flush=True)


if __name__ == "__main__":
    main()
