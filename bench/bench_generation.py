"""Sampling throughput: aligner's KVCacheSampler and its no-cache path vs transformers `generate`.

    python bench/bench_generation.py [--dtype fp32|bf16|both] [--reps 5]

Workload (BENCH_CONFIG): 32 prompts x 32 tokens, 64 new tokens per prompt, forced to full length
on both sides by forbidding EOS until 64 tokens (aligner: min_length = max_length = 64;
transformers: min_new_tokens = max_new_tokens = 64), temperature 1, top-k 0, top-p 1, sampling.
Contenders, same weights, same process, interleaved:
  * aligner KV cache: `KVCacheSampler.generate` (megatron StaticInferenceContext);
  * aligner no cache: `KVCacheSampler.generate_no_cache`, the plain model path that
    recomputes the whole sequence for every new token;
  * transformers: `LlamaForCausalLM.generate(do_sample=True)` with its default dynamic KV cache;
  * with --diagnostics (not a target): the previous KV-cache sampler (CPU TorchFunctionMode on in
    the decode loop, plain per-step sampling maths), after checking on this model that it and the
    library draw bit-identical tokens and log-probs. The fixes the diagnostics used to time (the
    loop without the CPU mode, leaner sampling maths) are now in the library.
Target: KV-cache sampler >= 1.5x transformers (median new tokens/s).
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402
import torch  # noqa: E402

PROMPTS, PROMPT_LEN, NEW_TOKENS = 32, 32, 64
TARGET_RATIO = 1.5


def previous_sampler():
    """Diagnostic: the sampler as it was before its per-step work was trimmed (frozen copy in
    tests/unit/test_generation_unchanged.py: CPU mode on in the loop, plain sampling maths)."""
    from tests.unit.test_generation_unchanged import LegacySampler

    return LegacySampler


def run_dtype(dtype_name: str, reps: int, warmup: int, diagnostics: bool, quiet=(0.0, 0.0)) -> dict:
    from aligner.generation.params import SamplingParams
    from aligner.generation.sampler import KVCacheSampler

    dtype = common.DTYPES[dtype_name]
    tokenizer = common.hf_tokenizer()
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    prompts = common.token_windows(PROMPTS, PROMPT_LEN, seed=200)
    lengths = torch.full((PROMPTS,), PROMPT_LEN, dtype=torch.long)

    model, config = common.load_aligner_model(dtype, "sdpa")
    model.eval()
    sampler = KVCacheSampler(model, eos_id=eos, pad_id=pad, max_batch_size=PROMPTS,
                             max_sequence_length=PROMPT_LEN + NEW_TOKENS, vocab_size=config.vocab_size)
    seeds = iter(range(10**9))

    def params():
        return SamplingParams(temperature=1.0, top_k=0, top_p=1.0, greedy=False, min_length=NEW_TOKENS,
                              max_length=NEW_TOKENS, seed=next(seeds))

    def ours(cached: bool):
        def run():
            generate = sampler.generate if cached else sampler.generate_no_cache
            out = generate(prompts, lengths, params())
            assert bool((out.response_lengths == NEW_TOKENS).all()), "aligner stopped early"
        return run

    with common.peer_context():
        hf = common.load_hf_model(dtype)
        hf.eval()
    attention_mask = torch.ones_like(prompts)

    def theirs():
        out = hf.generate(input_ids=prompts, attention_mask=attention_mask, do_sample=True, temperature=1.0,
                          top_k=0, top_p=1.0, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS,
                          eos_token_id=eos, pad_token_id=pad)
        assert out.shape == (PROMPTS, PROMPT_LEN + NEW_TOKENS), f"transformers returned {tuple(out.shape)}"

    if diagnostics:  # the previous implementation must draw the very same tokens and log-probs
        previous = previous_sampler()(model, eos_id=eos, pad_id=pad, max_batch_size=PROMPTS,
                                      max_sequence_length=PROMPT_LEN + NEW_TOKENS, vocab_size=config.vocab_size)
        same_seed = SamplingParams(min_length=NEW_TOKENS, max_length=NEW_TOKENS, seed=12345)
        reference, library = previous.generate(prompts, lengths, same_seed), sampler.generate(prompts, lengths, same_seed)
        assert torch.equal(reference.tokens, library.tokens), "the library drew other tokens than before"
        assert torch.equal(reference.generator_logprobs, library.generator_logprobs), "log-probs changed"

        def previous_run():
            out = previous.generate(prompts, lengths, params())
            assert bool((out.response_lengths == NEW_TOKENS).all()), "previous sampler stopped early"

    work = PROMPTS * NEW_TOKENS
    contenders = [
        common.Contender("aligner KV cache", lambda: common.timed(ours(True)), work),
        common.Contender("aligner no cache", lambda: common.timed(ours(False)), work),
        common.Contender("transformers generate", lambda: common.timed(theirs), work, peer=True),
    ]
    if diagnostics:
        contenders.append(common.Contender("diagnostic: previous KV-cache sampler",
                                           lambda: common.timed(previous_run), work))
    print(f"[{dtype_name}] {reps} reps of {PROMPTS} prompts x {NEW_TOKENS} new tokens (new tokens/s):")
    loads = []
    throughput, peaks = common.interleave(contenders, reps, warmup, dtype, quiet=quiet, loads=loads)

    stats = {name: common.summarize(values) for name, values in throughput.items()}
    peer = "transformers generate"
    ratios = common.ratios(stats, [name for name in stats if name != peer], [peer])
    targets = [common.target(f"aligner KV cache / {peer} (median new tokens/s)",
                             ratios["median"][f"aligner KV cache / {peer}"], TARGET_RATIO)]
    for name, s in stats.items():
        print(f"  {name:44s} median {s['median']:8,.0f} tok/s  min {s['min']:8,.0f}  spread {s['spread']:5.1%}")
    common.print_ratios(ratios)
    for t in targets:
        print(f"  target {t['name']} >= {t['threshold']}: {t['value']:.3f} -> {'met' if t['met'] else 'MISSED'}")
    payload = {
        "dtype": dtype_name,
        "workload": {"prompts": PROMPTS, "prompt_len": PROMPT_LEN, "new_tokens": NEW_TOKENS, "temperature": 1.0,
                     "top_k": 0, "top_p": 1.0, "forced_full_length": "min_length = max_length (EOS suppressed)",
                     "reps": reps, "warmup_blocks": warmup},
        "matmul_flops": common.summarize(peaks),
        "load_average_1m_per_rep": loads,
        "new_tokens_per_s": stats,
        "ratios": ratios,
        "targets": targets,
    }
    path = common.write_result(f"generation_{dtype_name}", payload)
    print(f"  wrote {path}")
    return payload


def main(argv=None):
    parser = common.base_arguments(__doc__.splitlines()[0], reps=5)
    parser.add_argument("--diagnostics", action="store_true",
                        help="also time the previous KV-cache sampler (CPU mode on in the loop, plain "
                             "sampling maths), checked to draw the same tokens (not a target)")
    args = parser.parse_args(argv)
    common.quiet_libraries()
    common.set_threads()
    common.start_megatron()
    for dtype_name in common.dtypes_of(args.dtype):
        run_dtype(dtype_name, args.reps, args.warmup, args.diagnostics, (args.quiet_load, args.max_wait))


if __name__ == "__main__":
    main()
