"""Worker for test_smollm2.py: `smollm2_sampler_worker.py OUT.pt` (1 process, or N under torchrun
for TP=N). SmolLM2-135M-Instruct greedy through KVCacheSampler for a batch of chat prompts of
different lengths; rank 0 saves {tokens, lengths, prompt_lengths} and every rank checks that it
holds the same tokens."""
import sys

import torch
import torch.distributed as dist

QUESTIONS = ("Tell me a short story about a lighthouse keeper.", "What is 12 times 7?",
             "Name three rivers in Europe and say one thing about each of them.")
NEW_TOKENS = 64


def main(out: str) -> None:
    import importlib.util
    from pathlib import Path

    from transformers import AutoTokenizer

    from aligner.generation.params import SamplingParams
    from aligner.generation.sampler import KVCacheSampler

    example_path = Path(__file__).resolve().parents[2] / "examples" / "nlp" / "gpt" / "smollm2_generate.py"
    spec = importlib.util.spec_from_file_location("smollm2_generate", example_path)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)

    world = int(__import__("os").environ.get("WORLD_SIZE", "1"))
    model, config, hf_dir = example.load_smollm2(tensor_parallel=world)
    tokenizer = AutoTokenizer.from_pretrained(hf_dir)
    prompts = [example.chat_prompt_ids(tokenizer, q) for q in QUESTIONS]
    lengths = torch.tensor([len(p) for p in prompts])
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    tokens = torch.full((len(prompts), int(lengths.max())), pad, dtype=torch.long)
    for row, ids in enumerate(prompts):
        tokens[row, :len(ids)] = torch.tensor(ids)
    sampler = KVCacheSampler(model, eos_id=tokenizer.eos_token_id, pad_id=pad, max_batch_size=len(prompts),
                             max_sequence_length=int(lengths.max()) + NEW_TOKENS)
    params = SamplingParams(greedy=True, min_length=NEW_TOKENS, max_length=NEW_TOKENS, seed=0)
    with torch.no_grad():
        result = sampler.generate(tokens, lengths, params)
    generated = result.tokens.contiguous()
    if dist.is_initialized() and dist.get_world_size() > 1:
        gathered = [torch.empty_like(generated) for _ in range(dist.get_world_size())]
        dist.all_gather(gathered, generated)
        assert all(torch.equal(g, generated) for g in gathered), "TP ranks disagree"
    if not dist.is_initialized() or dist.get_rank() == 0:
        torch.save({"tokens": generated, "response_lengths": result.response_lengths, "prompt_lengths": lengths}, out)
        print(f"rank 0 tp={world}: generated {tuple(generated.shape)}", flush=True)


if __name__ == "__main__":
    main(sys.argv[1])
