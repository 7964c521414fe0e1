"""GRPO step throughput (steps/s): aligner vs TRL 1.16 `GRPOTrainer`, same run.

    python bench/bench_grpo.py [--dtype fp32|bf16|both] [--reps 5] [--steps 2] [--quiet-load 3.5]

Workload (BENCH_CONFIG "GRPO step"): 8 prompts x 4 generations = 32 completions per step,
prompts of exactly 32 tokens, completions forced to exactly 32 new tokens (EOS forbidden:
min_length = max_length = 32 on aligner's side, min_new_tokens = max_new_tokens = 32 on TRL's),
temperature 1, top-k 0, top-p 1; the same Python reward function on both sides
(`bench_reward` below: a deterministic function of the completion text); group-normalised
advantages (mean and std per group of 4); clipped ratio 0.2/0.2; token-mean loss aggregation
(TRL's `loss_type="dapo"`); KL coefficient 0 (no reference model on either side); 1 epoch,
1 mini-batch = all 32 completions = 1 optimizer step per step, all 32 rows in one micro-batch;
Adam lr 1e-6 (TRL's default), betas (0.9, 0.999), no weight decay, constant LR, grad clip 1.0.

Both sides run in their own process, each its own loop, driven at its step boundary:

* aligner: the real GRPO engine, `aligner.trainers.grpo.build_engine(cfg, conf/gpt_grpo.yaml)`
  from the composed conf/gpt_grpo.yaml + overrides, stepped with `RolloutEngine.step()` (the
  seam `train()` uses; the metrics are logged each step as `train()` does). Every step: KV-cache
  sampling of 32 rows -> the reward function in its worker process -> actor log-probs ->
  advantages -> one policy update. Its timing/* metrics give the step breakdown.
* TRL: `GRPOTrainer.train()` with TRL 1.16 first on sys.path (installed into
  bench/.cache/trl-1.16.0, never into the venv), `per_device_train_batch_size=32`,
  `num_generations=4`, `gradient_accumulation_steps=1`, `num_iterations=1`, `beta=0`,
  gradient checkpointing off, no eval, no saving, no logging steps, no completion logging. A
  subclass only wraps `_generate_single_turn`, `_calculate_rewards` and
  `_generate_and_score_completions` with timers for its breakdown (behaviour unchanged).

Interleaving, sanity and result files as in bench_ppo.py (whose child protocol this reuses):
each child blocks at its step boundary until told to run a block of `--steps` steps, timed
inside the child from the command to the end of its last step; rounds rotate who goes first;
one side computes at a time. Before timing, both sides compute the log-probs of the same 4
fixed 64-token sequences with their own code (aligner: `engine.logprobs`; TRL:
`_get_per_token_logps_and_entropies`) and the orchestrator checks they agree, and that
aligner's prompt dataset (read from JSONL text) holds exactly the token ids TRL's tokenizer
call gives for the same texts.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402
import torch  # noqa: E402
from bench_ppo import _tensor_list, check_tokens, child_env, prompt_records  # noqa: E402
from peer_processes import BlockDriver, Channel, Child, install_trl  # noqa: E402

PROMPTS_PER_STEP, GENERATIONS, PROMPT_LEN, COMPLETION_LEN = 8, 4, 32, 32
SAMPLES = PROMPTS_PER_STEP * GENERATIONS
LR, BETAS, EPS, CLIP, GRAD_CLIP = 1e-6, (0.9, 0.999), 1e-8, 0.2, 1.0
TARGET_RATIO = 2.0

TRL_VERSION = "1.16.0"
TRL_DIR = common.CACHE_DIR / f"trl-{TRL_VERSION}"
# (distribution requirement, import name): what TRL 1.16's GRPOTrainer imports beyond the venv.
TRL_DEPS = [("datasets>=4.7.0", "datasets"), ("pandas", "pandas"), ("pyarrow>=24", "pyarrow"),
            ("dill>=0.3.0,<0.4.2", "dill"), ("xxhash", "xxhash"), ("multiprocess<0.70.20", "multiprocess"),
            ("six", "six")]


def bench_reward(prompts=None, responses=None, completions=None, **_):
    """The reward of both sides: a deterministic function of the completion text (the fraction
    of its characters that are letters). aligner calls it with `responses=`, TRL with
    `completions=` (both decoded with skip_special_tokens=True)."""
    texts = responses if responses is not None else completions
    return [sum(ch.isalpha() for ch in t) / max(len(t), 1) for t in texts]


# ------------------------------------------------------------------------------ fixed inputs



# ------------------------------------------------------------------------------ aligner child


def aligner_overrides(dtype_name: str, log_dir: Path, prompts_path: Path, total_steps: int) -> list[str]:
    model = common.fixed_model_dir()
    shape = common.FIXED_LLAMA
    reward_path = Path(__file__).resolve()
    return [
        f"pretrained_checkpoint.restore_from_path={model}", f"model.tokenizer.model={model}",
        f"exp_manager.explicit_log_dir={log_dir}", "exp_manager.resume_if_exists=false",
        "exp_manager.create_tensorboard_logger=false", f"trainer.precision={dtype_name}",
        f"trainer.grpo.max_steps={total_steps}", "trainer.grpo.val_check_interval=0", "trainer.grpo.save_interval=0",
        f"trainer.grpo.gradient_clip_val={GRAD_CLIP}", "trainer.grpo.ppo_epochs=1",
        # the fixed model's shape (the HF directory's config.json decides; these agree with it)
        f"model.hidden_size={shape['hidden_size']}", f"model.ffn_hidden_size={shape['intermediate_size']}",
        f"model.num_layers={shape['num_hidden_layers']}", f"model.num_attention_heads={shape['num_attention_heads']}",
        f"model.num_query_groups={shape['num_key_value_heads']}",
        f"model.max_position_embeddings={shape['max_position_embeddings']}", f"model.rope_theta={shape['rope_theta']}",
        f"model.vocab_size={shape['vocab_size']}",
        "algorithm.adv_estimator=grpo", "algorithm.norm_adv_by_std_in_grpo=true", "algorithm.use_kl_in_reward=false",
        "algorithm.use_kl_loss=false", "algorithm.loss_agg_mode=token-mean", f"algorithm.clip_ratio_low={CLIP}",
        f"algorithm.clip_ratio_high={CLIP}", "algorithm.entropy_coeff=0.0", "algorithm.filter_groups.enable=false",
        "algorithm.overlong_buffer.enable=false", "algorithm.mask_truncated_completions=false",
        f"reward.functions=[{{path:'{reward_path}:bench_reward',weight:1.0}}]", "reward.timeout_s=60",
        f"model.seed={common.SEED}", f"model.micro_batch_size={SAMPLES}", f"model.global_batch_size={SAMPLES}",
        f"model.encoder_seq_length={PROMPT_LEN + COMPLETION_LEN}",
        "model.optim.name=fused_adam", f"model.optim.lr={LR}", "model.optim.weight_decay=0.0",
        f"model.optim.betas=[{BETAS[0]},{BETAS[1]}]", f"model.optim.eps={EPS}", "model.optim.sched.name=Constant",
        "model.optim.sched.warmup_steps=0", f"model.optim.sched.min_lr={LR}",
        f"model.grpo.num_generations={GENERATIONS}", f"model.grpo.num_prompts_per_step={PROMPTS_PER_STEP}",
        f"model.grpo.rollout_micro_batch_size={SAMPLES}", f"model.grpo.forward_micro_batch_size={SAMPLES}",
        "model.grpo.offload_adam_states=false",
        "model.grpo.sampling_params.use_greedy=false", "model.grpo.sampling_params.temperature=1.0",
        "model.grpo.sampling_params.top_k=0", "model.grpo.sampling_params.top_p=1.0",
        f"model.grpo.length_params.max_length={COMPLETION_LEN}", f"model.grpo.length_params.min_length={COMPLETION_LEN}",
        f"model.data.train_ds.file_path={prompts_path}", "model.data.validation_ds.file_path=null",
    ]


def aligner_child(args, channel: Channel) -> None:
    import logging

    from hydra import compose, initialize_config_dir

    from aligner.trainers import grpo
    from aligner.training.entry import CONF_DIR

    common.quiet_libraries()
    logging.getLogger("megatron").setLevel(logging.WARNING)
    spec = json.loads(Path(args.spec).read_text())
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
        cfg = compose("gpt_grpo", overrides=spec["overrides"])
    driver = BlockDriver(channel)
    tokens = torch.tensor(spec["check_tokens"])

    engine = grpo.build_engine(cfg, CONF_DIR / "gpt_grpo.yaml")
    run = engine.run
    try:
        engine.algorithm.resumed(engine)
        channel.send(event="ready", sanity=aligner_sanity(engine, tokens), threads=torch.get_num_threads())
        driver.wait()
        while run.step < run.max_steps:
            metrics = engine.step()
            run.metrics.log(run.step, metrics)
            driver.step_done({k: float(v) for k, v in metrics.items()
                              if k.startswith(("timing/", "throughput/", "train/updates", "rollout/reward_mean",
                                               "rollout/response_length"))})
    finally:
        engine.algorithm.close()
        run.finish()
    channel.send(event="exit")


@torch.no_grad()
def aligner_sanity(engine, tokens: torch.Tensor) -> dict:
    from aligner.objectives.masks import response_mask
    from aligner.rollout.batch import Rollouts

    n, width = tokens.shape
    lengths = torch.full((n,), width)
    prompt_lengths = torch.full((n,), PROMPT_LEN)
    rollouts = Rollouts(tokens=tokens, lengths=lengths, prompt_lengths=prompt_lengths,
                        is_end=torch.zeros(n, dtype=torch.bool), mask=response_mask(prompt_lengths, lengths, width),
                        generator_logprobs=torch.zeros(n, width), group=torch.arange(n), prompt_index=torch.arange(n))
    logprobs = engine.logprobs(rollouts)[:, PROMPT_LEN - 1:width - 1]  # positions predicting the completion
    return {"logprobs": _tensor_list(logprobs),
            "prompt_ids": [engine.prompts[i]["prompt_tokens"].tolist() for i in range(len(engine.prompts))]}


# ---------------------------------------------------------------------------------- TRL child


def trl_child(args, channel: Channel) -> None:
    sys.path.insert(0, str(TRL_DIR))
    import trl

    if trl.__version__ != TRL_VERSION:
        raise SystemExit(f"expected trl {TRL_VERSION} from {TRL_DIR}, got {trl.__version__} from {trl.__file__}")
    common.quiet_libraries()
    torch.set_num_threads(args.trl_threads)
    import datasets
    import pyarrow
    from transformers import TrainerCallback
    from transformers.trainer_callback import PrinterCallback
    from trl import GRPOConfig, GRPOTrainer

    spec = json.loads(Path(args.spec).read_text())
    dtype = common.DTYPES[spec["dtype"]]
    # bf16: the policy is cast to bf16 weights (as bench_ppo.py does for TRL); TRL's `bf16=True`
    # would instead autocast an fp32 model.
    policy = common.load_hf_model(dtype)
    tokenizer = common.hf_tokenizer()
    tokenizer.padding_side = "left"
    config = GRPOConfig(
        output_dir=spec["out_dir"], use_cpu=True, seed=common.SEED, report_to="none", disable_tqdm=True,
        per_device_train_batch_size=SAMPLES, gradient_accumulation_steps=1, num_generations=GENERATIONS,
        num_iterations=1, max_steps=spec["total_steps"], max_completion_length=COMPLETION_LEN,
        generation_kwargs={"min_new_tokens": COMPLETION_LEN, "max_new_tokens": COMPLETION_LEN},
        temperature=1.0, top_p=1.0, top_k=0, beta=0.0, epsilon=CLIP, epsilon_high=CLIP, loss_type="dapo",
        scale_rewards="group", mask_truncated_completions=False, learning_rate=LR, lr_scheduler_type="constant",
        warmup_steps=0, weight_decay=0.0, adam_beta1=BETAS[0], adam_beta2=BETAS[1], adam_epsilon=EPS,
        max_grad_norm=GRAD_CLIP, gradient_checkpointing=False, eval_strategy="no", save_strategy="no",
        logging_strategy="no", log_completions=False, dataloader_num_workers=0, bf16=False, fp16=False,
    )
    # `datasets.Dataset.from_list/from_dict` fail here (datasets 5.2 + pyarrow 26: dill cannot
    # pickle pyarrow's MonthDayNano while fingerprinting); an explicit fingerprint skips that.
    dataset = datasets.Dataset(pyarrow.table({"prompt": [p["prompt"] for p in spec["prompts"]]}),
                               fingerprint="bench-grpo-prompts")
    prompt_ids = tokenizer(text=[p["prompt"] for p in spec["prompts"]])["input_ids"]  # what TRL's step calls
    driver = BlockDriver(channel)
    tokens = torch.tensor(spec["check_tokens"])
    parts: dict[str, float] = {}

    def timed_method(name, fn):
        def wrapper(*a, **k):
            start = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                parts[name] = parts.get(name, 0.0) + time.perf_counter() - start
        return wrapper

    class Trainer(GRPOTrainer):
        """GRPOTrainer with timers around three of its methods (nothing else changes)."""

        def __init__(self, *a, **k):
            super().__init__(*a, **k)
            self._generate_single_turn = timed_method("generate", self._generate_single_turn)
            self._calculate_rewards = timed_method("rewards", self._calculate_rewards)
            self._generate_and_score_completions = timed_method("rollout (generate, rewards, advantages)",
                                                                self._generate_and_score_completions)

    class Hook(TrainerCallback):
        def on_train_begin(self, args, state, control, model=None, **kwargs):
            with torch.no_grad():
                logps, _, _ = trainer._get_per_token_logps_and_entropies(
                    trainer.model, tokens, torch.ones_like(tokens), COMPLETION_LEN)
            channel.send(event="ready", sanity={"logprobs": _tensor_list(logps), "prompt_ids": prompt_ids},
                         threads=torch.get_num_threads())
            driver.wait()
            parts.clear()

        def on_step_end(self, args, state, control, **kwargs):
            detail = dict(parts)
            parts.clear()
            logged = trainer._metrics["train"]  # TRL's own per-step metrics (read, not changed)
            for key in ("completions/mean_length", "completions/min_length", "rewards/bench_reward/mean"):
                if logged.get(key):
                    detail[key] = float(logged[key][-1])
            driver.step_done(detail)

    trainer = Trainer(model=policy, reward_funcs=[bench_reward], args=config, train_dataset=dataset,
                      processing_class=tokenizer, callbacks=[Hook()])
    trainer.remove_callback(PrinterCallback)
    trainer.train()
    channel.send(event="exit")


# -------------------------------------------------------------------------------- orchestrator


def compare_sanity(ours: dict, theirs: dict, dtype_name: str) -> dict:
    a, b = torch.tensor(ours["logprobs"]), torch.tensor(theirs["logprobs"])
    out = {"logprobs": {"max_abs_diff": float((a - b).abs().max()), "aligner_mean": float(a.mean()),
                        "trl_mean": float(b.mean()), "shape": list(a.shape)},
           "prompt_ids_equal": ours["prompt_ids"] == theirs["prompt_ids"]}
    out["tolerance"] = {"fp32": 1e-4, "bf16": 0.25}[dtype_name]
    out["passed"] = out["prompt_ids_equal"] and out["logprobs"]["max_abs_diff"] <= out["tolerance"]
    return out


def mean_parts(details: list[dict], prefix: str = "") -> dict:
    keys = sorted({k for d in details for k in d if k.startswith(prefix)})
    return {k[len(prefix):].removesuffix("_s") if prefix else k: statistics.fmean(d.get(k, 0.0) for d in details)
            for k in keys}


def run_dtype(dtype_name: str, args) -> dict:
    block = args.steps
    total_steps = (args.warmup + args.reps) * block
    tokenizer = common.hf_tokenizer()
    prompts = prompt_records(tokenizer)  # 64 prompts of exactly 32 tokens that round-trip through text
    tokens = check_tokens(tokenizer, prompts)
    work = Path(tempfile.mkdtemp(prefix=f"bench_grpo_{dtype_name}_"))
    prompts_path = work / "prompts.jsonl"
    prompts_path.write_text("".join(json.dumps({"prompt": p["prompt"]}) + "\n" for p in prompts))
    spec = {"dtype": dtype_name, "total_steps": total_steps, "prompts": prompts, "check_tokens": tokens.tolist(),
            "out_dir": str(work / "trl"),
            "overrides": aligner_overrides(dtype_name, work / "aligner", prompts_path, total_steps)}
    spec_path = work / "spec.json"
    spec_path.write_text(json.dumps(spec))

    print(f"[{dtype_name}] starting the aligner GRPO engine and TRL {TRL_VERSION} GRPOTrainer "
          f"({args.threads} threads each); logs in {work}", flush=True)
    children: dict[str, Child] = {}
    try:
        children["aligner"] = Child(Path(__file__), "aligner", spec_path,
                                   work / "aligner.log", child_env(args.threads))
        children["trl"] = Child(Path(__file__), "trl", spec_path, work / "trl.log", child_env(args.threads),
                                ["--trl-threads", str(args.threads)])
        ready = {name: child.expect("ready") for name, child in children.items()}
        sanity = compare_sanity(ready["aligner"]["sanity"], ready["trl"]["sanity"], dtype_name)
        lp = sanity["logprobs"]
        print(f"[{dtype_name}] same function: log-probs of {lp['shape']} fixed completion tokens max|diff| "
              f"{lp['max_abs_diff']:.2e} (mean {lp['aligner_mean']:.5f} vs {lp['trl_mean']:.5f}); "
              f"prompt ids equal: {sanity['prompt_ids_equal']}", flush=True)
        if not sanity["passed"] and not args.allow_mismatch:
            raise SystemExit(f"the two sides do not compute the same function (tolerance {sanity['tolerance']}); "
                             "rerun with --allow-mismatch to time anyway")

        names = {"aligner": "aligner GRPO engine", "trl": f"TRL {TRL_VERSION} GRPOTrainer"}
        steps_per_s = {n: [] for n in names.values()}
        blocks = {n: [] for n in names}
        peaks, loads = [], []
        for _ in range(args.warmup):
            for child in children.values():
                child.run_block(block)
        order = list(children)
        print(f"[{dtype_name}] {args.reps} rounds x {block} GRPO steps of {PROMPTS_PER_STEP} prompts x "
              f"{GENERATIONS} generations (steps/s)", flush=True)
        for rep in range(args.reps):
            loads.append(common.wait_for_quiet(args.quiet_load, args.max_wait))
            for name in order[rep % 2:] + order[:rep % 2]:
                result = children[name].run_block(block)
                blocks[name].append(result)
                steps_per_s[names[name]].append(block / result["seconds"])
            if args.matmul_size:  # the ceiling is context only here (no MFU for GRPO); bf16 without
                # avx512_bf16 runs a 2048^3 matmul for minutes, hence --matmul-size
                peaks.append(common.matmul_flops(common.DTYPES[dtype_name], size=args.matmul_size))
            print(f"  rep {rep + 1}/{args.reps} (load {loads[-1]:.1f}): " + ", ".join(
                f"{n}={v[-1]:.3f}" for n, v in steps_per_s.items())
                + (f", matmul={peaks[-1] / 1e9:,.1f} GFLOP/s" if peaks else ""),
                  flush=True)
        load_after = os.getloadavg()[0]
        for child in children.values():
            child.finish()
    finally:
        for child in children.values():
            child.kill()

    stats = {n: common.summarize(v) for n, v in steps_per_s.items()}
    ours, peer = names["aligner"], names["trl"]
    ratios = common.ratios(stats, [ours], [peer])
    fastest = {names[n]: min(t for b in v for t in b["step_seconds"]) for n, v in blocks.items()}
    ratios["fastest_step"] = {f"{ours} / {peer}": fastest[peer] / fastest[ours]}
    targets = [common.target(f"{ours} / {peer} (median steps/s)", ratios["median"][f"{ours} / {peer}"], TARGET_RATIO)]
    aligner_details = [d for b in blocks["aligner"] for d in b["details"]]
    trl_details = [d for b in blocks["trl"] for d in b["details"]]
    ours_costs = mean_parts(aligner_details, "timing/")
    ours_costs["other"] = ours_costs.get("step", float("nan")) - sum(v for k, v in ours_costs.items() if k != "step")
    trl_costs = {k: v for k, v in mean_parts(trl_details).items() if "/" not in k}
    trl_costs["step (callback to callback)"] = statistics.fmean(t for b in blocks["trl"] for t in b["step_seconds"])
    trl_costs["rest (loss forward + backward + optimizer + loop)"] = (
        trl_costs["step (callback to callback)"] - trl_costs.get("rollout (generate, rewards, advantages)", 0.0))
    for n, s in stats.items():
        print(f"  {n:32s} median {s['median']:6.3f} steps/s  min {s['min']:6.3f}  max {s['max']:6.3f}  "
              f"spread {s['spread']:5.1%}")
    common.print_ratios(ratios)
    print("  fastest single step: " + ", ".join(f"{n} {v:.3f} s" for n, v in fastest.items())
          + f" -> ratio {ratios['fastest_step'][f'{ours} / {peer}']:.2f}x")
    for t in targets:
        print(f"  target {t['name']} >= {t['threshold']}: {t['value']:.3f} -> {'met' if t['met'] else 'MISSED'}")
    print("  aligner step, mean seconds: " + ", ".join(f"{k} {v:.3f}" for k, v in ours_costs.items()))
    print("  TRL step, mean seconds: " + ", ".join(f"{k} {v:.3f}" for k, v in trl_costs.items()))
    lengths = {"aligner_mean_response_length": [d.get("rollout/response_length") for d in aligner_details],
               "trl_mean_completion_length": [d.get("completions/mean_length") for d in trl_details],
               "trl_min_completion_length": [d.get("completions/min_length") for d in trl_details]}
    print(f"  completion lengths per timed step (forced {COMPLETION_LEN}): aligner mean "
          f"{lengths['aligner_mean_response_length']}, TRL mean {lengths['trl_mean_completion_length']}, "
          f"TRL min {lengths['trl_min_completion_length']}")
    payload = {
        "dtype": dtype_name,
        "workload": {"prompts_per_step": PROMPTS_PER_STEP, "generations_per_prompt": GENERATIONS,
                     "samples_per_step": SAMPLES, "prompt_len": PROMPT_LEN, "completion_len": COMPLETION_LEN,
                     "forced_full_length": True, "temperature": 1.0, "top_k": 0, "top_p": 1.0,
                     "reward": "bench_grpo.bench_reward (fraction of letters in the completion text), both sides",
                     "advantages": "group mean / group std (aligner grpo + norm_adv_by_std_in_grpo; TRL "
                                   "scale_rewards=group)",
                     "loss": "clipped ratio 0.2/0.2, token-mean (TRL loss_type=dapo), KL coefficient 0, no reference",
                     "epochs": 1, "mini_batches": 1, "micro_batch": SAMPLES, "optimizer_steps_per_step": 1,
                     "optimizer": {"lr": LR, "betas": BETAS, "eps": EPS, "weight_decay": 0.0, "clip_grad": GRAD_CLIP,
                                   "schedule": "constant"},
                     "steps_per_block": block, "reps": args.reps, "warmup_steps": args.warmup * block},
        "processes": {"aligner": f"aligner.trainers.grpo.build_engine + engine.step(), {args.threads} torch threads "
                                 "(+ its reward-function worker process)",
                      "trl": f"GRPOTrainer.train(), {args.threads} torch threads; policy cast to {dtype_name}",
                      "orchestrator": "idle while a block runs (blocks on a pipe)"},
        "thread_counts": {"aligner": ready["aligner"]["threads"], "trl": ready["trl"]["threads"]},
        "trl_version": TRL_VERSION, "trl_path": str(TRL_DIR.relative_to(common.REPO_ROOT)),
        "sanity": sanity,
        "matmul_flops": common.summarize(peaks) if peaks else None, "matmul_size": args.matmul_size,
        "load_average_1m_per_rep": loads, "load_average_1m_after_last_rep": load_after,
        "steps_per_s": stats,
        "samples_per_s_median": {n: s["median"] * SAMPLES for n, s in stats.items()},
        "fastest_step_s": fastest,
        "block_step_seconds": {n: [b["step_seconds"] for b in v] for n, v in blocks.items()},
        "completion_lengths": lengths,
        "aligner_step_breakdown_s": ours_costs,
        "trl_step_breakdown_s": trl_costs,
        "aligner_step_metrics": aligner_details,
        "trl_step_timings": trl_details,
        "ratios": ratios,
        "targets": targets,
    }
    path = common.write_result(f"grpo_{dtype_name}", payload)
    print(f"  wrote {path}")
    shutil.rmtree(work, ignore_errors=True)
    return payload


def main(argv=None):
    parser = common.base_arguments(__doc__.splitlines()[0], reps=5)
    parser.add_argument("--steps", type=int, default=2, help="GRPO steps per timed block")
    parser.add_argument("--threads", type=int, default=common.THREADS, help="torch threads of each side's process")
    parser.add_argument("--matmul-size", type=int, default=2048,
                        help="matmul ceiling size measured every round (BENCH_CONFIG: 2048); 0: not measured")
    parser.add_argument("--allow-mismatch", action="store_true", help="time even if the sanity check fails")
    parser.add_argument("--child", choices=["aligner", "trl"], help=argparse.SUPPRESS)
    parser.add_argument("--spec", help=argparse.SUPPRESS)
    parser.add_argument("--fds", help=argparse.SUPPRESS)
    parser.add_argument("--trl-threads", type=int, default=common.THREADS, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        read_fd, write_fd = (int(x) for x in args.fds.split(","))
        channel = Channel(read_fd, write_fd)
        (aligner_child if args.child == "aligner" else trl_child)(args, channel)
        return
    if args.reps < 3:
        parser.error("--reps must be >= 3")
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    common.quiet_libraries()
    common.set_threads()
    common.fixed_model_dir()
    install_trl(TRL_VERSION, TRL_DEPS)
    for dtype_name in common.dtypes_of(args.dtype):
        run_dtype(dtype_name, args)


if __name__ == "__main__":
    main()
