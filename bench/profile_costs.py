"""Where the time goes: profiles of one workload of each benchmark, ours and the peer side by side.

    python bench/profile_costs.py sft  [--dtype bf16] [--backend sdpa] [--steps 3]
    python bench/profile_costs.py generation [--dtype bf16]
    python bench/profile_costs.py dpo [--dtype bf16] [--steps 3]

Prints, for each side: wall time, the top operators by self CPU time (torch.profiler), and the
top Python functions by own time (cProfile), which is where interpreter overhead (for example
a TorchFunctionMode that sees every torch call) shows up. Also times named sections of
aligner's step (forward+backward schedule, optimizer step) with plain timers.
Profiling perturbs timings; read the shares, not the absolute numbers.
"""
from __future__ import annotations

import cProfile
import io
import pstats
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402
import torch  # noqa: E402


def profile(label: str, fn, runs: int, top: int) -> None:
    fn()  # warm
    start = time.perf_counter()
    for _ in range(runs):
        fn()
    wall = (time.perf_counter() - start) / runs
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        for _ in range(runs):
            fn()
    events = prof.key_averages()
    total_self = sum(e.self_cpu_time_total for e in events) / runs / 1e6
    print(f"\n===== {label}: {wall * 1000:.0f} ms per run (unprofiled); "
          f"operators' self time {total_self * 1000:.0f} ms per run (profiled) =====")
    print(events.table(sort_by="self_cpu_time_total", row_limit=top, max_name_column_width=60))
    profiler = cProfile.Profile()
    profiler.enable()
    for _ in range(runs):
        fn()
    profiler.disable()
    text = io.StringIO()
    pstats.Stats(profiler, stream=text).sort_stats("tottime").print_stats(top)
    print("\n".join(line for line in text.getvalue().splitlines()[:top + 12] if line.strip()))


def sections_of_train_step(ddp, optimizer, scheduler, loss, micro_batches, runs: int) -> dict:
    """Plain timers around the parts of aligner.training.step.train_step (same calls, same order)."""
    from aligner.training import step as step_module

    totals = {"zero_grad": 0.0, "forward_backward": 0.0, "optimizer_step": 0.0, "metrics": 0.0}
    for _ in range(runs):
        t0 = time.perf_counter()
        ddp.train()
        ddp.zero_grad_buffer()
        optimizer.zero_grad()
        t1 = time.perf_counter()
        records = step_module._run_schedule(ddp, loss, micro_batches, forward_only=False)
        t2 = time.perf_counter()
        ok, _norm, _ = optimizer.step()
        if ok:
            scheduler.step(increment=1)
        t3 = time.perf_counter()
        step_module.reduce_metrics(records, loss.metric_names)
        t4 = time.perf_counter()
        for key, dt in zip(totals, (t1 - t0, t2 - t1, t3 - t2, t4 - t3)):
            totals[key] += dt
    return {k: v / runs * 1000 for k, v in totals.items()}


def profile_sft(dtype, backend: str, steps: int, top: int) -> None:
    import bench_sft_train as sft

    windows = sft.make_batches()
    ours, _params, _config, (ddp, optimizer, scheduler, loss, batches) = sft.aligner_stepper(dtype, backend, windows)
    with common.peer_context():
        peer, _model = sft.transformers_stepper(dtype, dtype == torch.bfloat16, windows)
    profile(f"aligner {backend} train step", ours, steps, top)
    with common.peer_context():
        profile("transformers train step", peer, steps, top)
    sections = sections_of_train_step(ddp, optimizer, scheduler, loss, [batches.next()], steps)
    print("\naligner train_step sections (ms per step): " + ", ".join(f"{k} {v:.0f}" for k, v in sections.items()))


def profile_generation(dtype, top: int) -> None:
    import bench_generation as gen

    from aligner.generation.params import SamplingParams
    from aligner.generation.sampler import KVCacheSampler

    tokenizer = common.hf_tokenizer()
    prompts = common.token_windows(gen.PROMPTS, gen.PROMPT_LEN, seed=200)
    lengths = torch.full((gen.PROMPTS,), gen.PROMPT_LEN, dtype=torch.long)
    model, config = common.load_aligner_model(dtype, "sdpa")
    sampler = KVCacheSampler(model, eos_id=tokenizer.eos_token_id, pad_id=tokenizer.pad_token_id,
                             max_batch_size=gen.PROMPTS, max_sequence_length=gen.PROMPT_LEN + gen.NEW_TOKENS,
                             vocab_size=config.vocab_size)
    params = SamplingParams(min_length=gen.NEW_TOKENS, max_length=gen.NEW_TOKENS, seed=0)
    with common.peer_context():
        hf = common.load_hf_model(dtype)
        hf.eval()
    mask = torch.ones_like(prompts)
    profile("aligner KVCacheSampler.generate", lambda: sampler.generate(prompts, lengths, params), 1, top)
    with common.peer_context():
        profile("transformers generate", lambda: hf.generate(
            input_ids=prompts, attention_mask=mask, do_sample=True, temperature=1.0, top_k=0, top_p=1.0,
            max_new_tokens=gen.NEW_TOKENS, min_new_tokens=gen.NEW_TOKENS,
            eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id), 1, top)


def dpo_sections(dtype, backend: str, steps: int) -> dict:
    """Plain timers around each part of aligner's DPO step (the flow of bench_dpo.aligner_stepper)."""
    import bench_dpo as dpo

    from aligner.data.collate import collate_comparisons
    from aligner.models.weight_swap import ParkedWeights
    from aligner.trainers.dpo import PreferenceLoss, ReferenceLogProbs
    from aligner.training import step as step_module
    from aligner.training.optim import OptimSettings, build_optimizer, wrap_data_parallel

    examples = dpo.make_pairs()
    pad = common.hf_tokenizer().pad_token_id
    model, _ = common.load_aligner_model(dtype, backend)
    reference = ParkedWeights(model)
    settings = OptimSettings.from_config({"name": "adam", "lr": dpo.LR, "sched": {"name": "Constant"}},
                                         max_steps=10**6, gradient_clip_val=dpo.CLIP)
    ddp = wrap_data_parallel(model, settings)
    optimizer, scheduler = build_optimizer(ddp, settings, dtype)
    loss = PreferenceLoss(beta=dpo.BETA, loss_type="dpo", average_log_probs=False, sft_loss_weight=0.0,
                          preference_loss_weight=1.0, gt_reward_scale=1.0)
    items = [{"chosen": torch.tensor(e["prompt_ids"] + e["chosen_ids"]),
              "rejected": torch.tensor(e["prompt_ids"] + e["rejected_ids"]),
              "chosen_prompt_len": dpo.PROMPT_LEN, "rejected_prompt_len": dpo.PROMPT_LEN,
              "chosen_reward": float("nan"), "rejected_reward": float("nan")} for e in examples]
    names = ("collate", "swap_in", "reference_forward", "swap_out", "zero_grad", "forward_backward",
             "optimizer_step", "metrics")
    totals = dict.fromkeys(names, 0.0)
    for i in range(steps + 1):  # the first is warm-up
        marks = [time.perf_counter()]
        micro = [collate_comparisons(items[(i % dpo.N_BATCHES) * dpo.PAIRS:][:dpo.PAIRS], pad)]
        marks.append(time.perf_counter())
        reference._exchange(ddp)
        marks.append(time.perf_counter())
        records = step_module.collect_forward(ddp, ReferenceLogProbs(), micro)
        marks.append(time.perf_counter())
        reference._exchange(ddp)
        marks.append(time.perf_counter())
        micro[0]["ref_token_logps"] = records[0]["token_logps"]
        ddp.train()
        ddp.zero_grad_buffer()
        optimizer.zero_grad()
        marks.append(time.perf_counter())
        out = step_module._run_schedule(ddp, loss, micro, forward_only=False)
        marks.append(time.perf_counter())
        ok, _norm, _ = optimizer.step()
        if ok:
            scheduler.step(increment=1)
        marks.append(time.perf_counter())
        step_module.reduce_metrics(out, loss.metric_names)
        marks.append(time.perf_counter())
        if i:
            for name, a, b in zip(names, marks, marks[1:]):
                totals[name] += b - a
    return {k: v / steps * 1000 for k, v in totals.items()}


def profile_dpo(dtype, backend: str, steps: int, top: int) -> None:
    import bench_dpo as dpo

    sections = dpo_sections(dtype, backend, steps)
    print(f"aligner DPO step sections (ms per step, total {sum(sections.values()):.0f}): "
          + ", ".join(f"{k} {v:.0f}" for k, v in sections.items()))
    examples = dpo.make_pairs()
    step = dpo.aligner_stepper(dtype, backend, examples, common.hf_tokenizer().pad_token_id)
    profile(f"aligner {backend} DPO step", step, steps, top)


def main(argv=None):
    parser = common.base_arguments(__doc__.splitlines()[0], reps=3)
    parser.add_argument("workload", choices=["sft", "generation", "dpo"])
    parser.add_argument("--backend", choices=["sdpa", "local"], default="sdpa")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--top", type=int, default=25)
    args = parser.parse_args(argv)
    common.quiet_libraries()
    common.set_threads()
    common.start_megatron()
    dtype = common.DTYPES["bf16" if args.dtype == "both" else args.dtype]
    if args.workload == "sft":
        profile_sft(dtype, args.backend, args.steps, args.top)
    elif args.workload == "generation":
        profile_generation(dtype, args.top)
    else:
        profile_dpo(dtype, args.backend, args.steps, args.top)


if __name__ == "__main__":
    main()
