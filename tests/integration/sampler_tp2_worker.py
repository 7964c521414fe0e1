"""Worker for test_sampler_tp2.py (run under torchrun with N processes): `worker.py CKPT_ROOT`.

1. TP=1: build a tiny Llama, save a native checkpoint, generate greedy and sampled batches.
2. TP=N in the same processes: load that checkpoint (resharded), generate the same batches,
   check every TP rank holds identical tokens and that they equal the TP=1 result.
3. TP=N again with the CPU compatibility mode kept on in the decode loop (the sampler suspends
   it): the mode redirects nothing there (collectives included) and the outputs are bit-identical.
"""
import contextlib
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from aligner.compat import megatron_cpu
from aligner.distributed import setup as dist_setup
from aligner.generation.params import SamplingParams
from aligner.generation.sampler import KVCacheSampler
from aligner.models.config import ModelConfig
from aligner.models.gpt import build_gpt
from aligner.training import checkpoint

CONFIG = ModelConfig(arch="llama", vocab_size=96, hidden_size=48, ffn_hidden_size=96, num_layers=2,
                     num_attention_heads=4, num_query_groups=2, max_position_embeddings=64)
EOS, PAD = 7, 0
PARAMS = {
    "greedy": SamplingParams(greedy=True, min_length=0, max_length=12),
    "sampled": SamplingParams(temperature=0.7, top_k=20, top_p=0.9, min_length=1, max_length=12, seed=321),
}


def eos_bias_hook(module, inputs, output):
    """Make EOS likelier so that rows stop at different times (same on every layout: the hook
    sees the gathered, full-vocabulary logits)."""
    logits, bias = output
    logits = logits.clone()
    logits[..., EOS] += 2.0
    return logits, bias


def prompts():
    lengths = torch.tensor([3, 9, 5, 1, 7, 2])
    tokens = torch.randint(1, CONFIG.vocab_size, (6, 9), generator=torch.Generator().manual_seed(11))
    return tokens, lengths


def generate_all(model, hook=True) -> dict:
    if hook:
        model.output_layer.register_forward_hook(eos_bias_hook)
    sampler = KVCacheSampler(model, eos_id=EOS, pad_id=PAD, max_batch_size=8, max_sequence_length=32)
    results = {}
    for kind, params in PARAMS.items():
        out = sampler.generate(*prompts(), params)
        results[kind] = out
    return results


def main() -> None:
    root = Path(sys.argv[1])
    world = int(os.environ["WORLD_SIZE"])
    # 1. TP=1 (every rank is a data-parallel replica with the same seed, hence the same weights)
    dist_setup.initialize(1, 1, seed=13)
    model = build_gpt(CONFIG, torch.float32)
    with torch.no_grad():
        model.output_layer.weight.mul_(15.0)  # peaked distributions, like a trained model
    saved = checkpoint.save(root, 0, model, None, {"model_config": CONFIG.to_dict()})
    reference = generate_all(model)
    del model
    # 2. TP=world: same process group, new model-parallel groups, weights resharded from TP=1
    layout = dist_setup.initialize(world, 1, seed=99)
    model = build_gpt(CONFIG, torch.float32, tensor_parallel=world)
    checkpoint.load_weights_only(saved, model)
    results = generate_all(model)
    for kind, out in results.items():
        ref = reference[kind]
        gathered = [torch.empty_like(out.tokens) for _ in range(world)]
        dist.all_gather(gathered, out.tokens)
        assert all(torch.equal(g, out.tokens) for g in gathered), f"{kind}: TP ranks disagree"
        for field in ("tokens", "response_lengths", "is_end"):
            assert torch.equal(getattr(out, field), getattr(ref, field)), (kind, field)
        diff = (out.generator_logprobs - ref.generator_logprobs).abs().max().item()
        assert diff < 1e-5, (kind, diff)
        ended = "".join(str(int(e)) for e in ref.is_end)
        print(f"rank {layout.rank} tp={world} {kind} match ended={ended} max_abs_logprob_diff={diff:.2e}", flush=True)
    # 3. the CPU mode kept on in the loop: it must have nothing to redirect
    redirected = []
    original = megatron_cpu._CudaDeviceToCpu.__torch_function__

    def recording(self, func, types, args=(), kwargs=None):
        kw = kwargs or {}
        if func in (torch.Tensor.cuda, torch.Tensor.pin_memory) or kw.get("pin_memory") \
                or ("device" in kw and megatron_cpu._to_cpu_device(kw["device"]) is not kw["device"]) \
                or (func is torch.Tensor.to and len(args) > 1 and not isinstance(args[1], (torch.dtype, torch.Tensor))
                    and megatron_cpu._to_cpu_device(args[1]) is not args[1]):
            redirected.append(getattr(func, "__name__", repr(func)))
        return original(self, func, types, args, kwargs)

    suspended = megatron_cpu.suspended
    megatron_cpu._CudaDeviceToCpu.__torch_function__ = recording
    megatron_cpu.suspended = contextlib.nullcontext
    try:
        moded = generate_all(model, hook=False)
    finally:
        megatron_cpu._CudaDeviceToCpu.__torch_function__ = original
        megatron_cpu.suspended = suspended
    assert megatron_cpu.is_installed() and not redirected, redirected
    for kind, out in moded.items():
        for field in ("tokens", "response_lengths", "is_end", "generator_logprobs"):
            assert torch.equal(getattr(out, field), getattr(results[kind], field)), ("mode", kind, field)
    print(f"rank {layout.rank} tp={world} mode-on match", flush=True)
    # unseeded sampling: each rank's generator gets a different OS seed, yet the TP group must agree
    sampler = KVCacheSampler(model, eos_id=EOS, pad_id=PAD, max_batch_size=8, max_sequence_length=32)
    tokens = sampler.generate(*prompts(), SamplingParams(temperature=1.0, max_length=12, seed=None)).tokens
    gathered = [torch.empty_like(tokens) for _ in range(world)]
    dist.all_gather(gathered, tokens)
    assert all(torch.equal(g, tokens) for g in gathered), "unseeded: TP ranks disagree"
    print(f"rank {layout.rank} unseeded agree", flush=True)
    dist_setup.shutdown()


if __name__ == "__main__":
    main()
