"""DPO step throughput (pairs/s): aligner vs TRL 1.16 `DPOTrainer`, same model, data and process.

    python bench/bench_dpo.py [--dtype fp32|bf16|both] [--reps 5] [--steps 4] [--backend sdpa|local]
                              [--diagnostics] [--quiet-load 3.5]

Workload (BENCH_CONFIG): batches of 8 pairs, prompt 32 tokens + chosen 32 / rejected 32 tokens,
sigmoid DPO loss (beta 0.1) against a frozen reference model, Adam (lr 1e-6, no weight decay),
gradient clipping 1.0, one micro-batch per step.

aligner: the flow of `aligner.trainers.dpo` without a `Run`: the initial weights parked in host
memory (`ParkedWeights`), swapped in for a forward-only `collect_forward` with
`ReferenceLogProbs`, swapped out, then `train_step` with `PreferenceLoss`. Collation
(`collate_comparisons`) is inside the timed step, as TRL's collator is inside its.

TRL: `DPOTrainer(use_cpu=True)` with a separate reference model (the default, not precomputed),
gradient checkpointing off (TRL turns it on by default; aligner does not checkpoint), no eval,
no saving, no logging steps, no progress bar. Its dataset is given already tokenized (a
subclass skips TRL's text tokenization, which runs once before training and is not timed), so
both sides see exactly the same token ids. TRL's own `train()` loop drives its steps; a callback
times every step and, between blocks of TRL steps, runs a block of aligner steps, so the two
interleave in one process. bf16: TRL's `bf16=True` (autocast, fp32 weights and Adam: the same
numerics as aligner) and a variant with the models cast to bf16; the target uses the faster.
Target: >= 1.5x TRL (median pairs/s).

--diagnostics adds aligner with candidate library fixes applied in-process (never targets):
fused Adam + a one-way reference swap (`OneWaySwap`). (The vocabulary projection on answer
positions only, an earlier diagnostic, is now the library's: `models.gpt.next_token_logits`.)
"""
from __future__ import annotations

import contextlib
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402
import torch  # noqa: E402

PAIRS, PROMPT_LEN, ANSWER_LEN = 8, 32, 32
BETA, LR, BETAS, EPS, CLIP = 0.1, 1e-6, (0.9, 0.999), 1e-8, 1.0
N_BATCHES = 4
TARGET_RATIO = 1.5


def make_pairs():
    """N_BATCHES * PAIRS examples of (prompt, chosen, rejected) token-id lists from held-out text."""
    n = N_BATCHES * PAIRS
    prompts = common.token_windows(n, PROMPT_LEN, seed=300)
    chosen = common.token_windows(n, ANSWER_LEN, seed=301)
    rejected = common.token_windows(n, ANSWER_LEN, seed=302)
    return [{"prompt_ids": p.tolist(), "chosen_ids": c.tolist(), "rejected_ids": r.tolist()}
            for p, c, r in zip(prompts, chosen, rejected)]


# ----------------------------------------------------------------------------------- aligner


class OneWaySwap:
    """Diagnostic stand-in for `ParkedWeights.swapped_in` with half the copies.

    `ParkedWeights._exchange` is symmetric (scratch <- live, live <- parked, parked <- scratch),
    so swapping in and out again copies every weight 6 times. The reference is frozen, so the
    parked copy never needs rewriting: live -> scratch, parked -> live, and back from scratch
    is 3 copies, same result.
    """

    def __init__(self, parked):
        self.parked = parked
        self.scratch = {name: torch.empty_like(t) for name, t in parked.host.items()}

    @contextlib.contextmanager
    def swapped_in(self, model):
        from aligner.models.gpt import unwrap

        base = unwrap(model)
        live = dict(base.named_parameters())
        live.update({k: v for k, v in base.named_buffers() if v.is_floating_point()})
        with torch.no_grad():
            for name, parked in self.parked.host.items():
                self.scratch[name].copy_(live[name])
                live[name].copy_(parked)
        try:
            yield
        finally:
            with torch.no_grad():
                for name in self.parked.host:
                    live[name].copy_(self.scratch[name])


def aligner_stepper(dtype: torch.dtype, backend: str, examples, pad_id: int, fixes: tuple[str, ...] = ()):
    """One DPO step of aligner. `fixes` (diagnostic only): candidate library fixes to apply,
    any of "fused_adam", "one_way_swap"."""
    from aligner.data.collate import collate_comparisons
    from aligner.models.weight_swap import ParkedWeights
    from aligner.trainers.dpo import PreferenceLoss, ReferenceLogProbs
    from aligner.training.optim import OptimSettings, build_optimizer, wrap_data_parallel
    from aligner.training.step import collect_forward, train_step

    model, _config = common.load_aligner_model(dtype, backend)
    reference = ParkedWeights(model)  # the initial policy, as park_initial_weights does at step 0
    settings = OptimSettings.from_config(
        {"name": "adam", "lr": LR, "weight_decay": 0.0, "betas": list(BETAS), "eps": EPS,
         "sched": {"name": "Constant"}}, max_steps=10**6, gradient_clip_val=CLIP)
    ddp = wrap_data_parallel(model, settings)
    optimizer, scheduler = build_optimizer(ddp, settings, dtype)
    if "fused_adam" in fixes:
        from bench_sft_train import use_fused_adam

        use_fused_adam(optimizer)
    if "one_way_swap" in fixes:
        reference = OneWaySwap(reference)
    loss = PreferenceLoss(beta=BETA, loss_type="dpo", average_log_probs=False, sft_loss_weight=0.0,
                          preference_loss_weight=1.0, gt_reward_scale=1.0)
    reference_loss = ReferenceLogProbs()
    items = [{"chosen": torch.tensor(e["prompt_ids"] + e["chosen_ids"]),
              "rejected": torch.tensor(e["prompt_ids"] + e["rejected_ids"]),
              "chosen_prompt_len": len(e["prompt_ids"]), "rejected_prompt_len": len(e["prompt_ids"]),
              "chosen_reward": float("nan"), "rejected_reward": float("nan")} for e in examples]
    state = {"i": 0}

    def step() -> dict:
        start = (state["i"] % N_BATCHES) * PAIRS
        state["i"] += 1
        micro_batches = [collate_comparisons(items[start:start + PAIRS], pad_id)]
        with reference.swapped_in(ddp):
            records = collect_forward(ddp, reference_loss, micro_batches)
        for micro, record in zip(micro_batches, records):
            micro["ref_token_logps"] = record["token_logps"]
        return train_step(ddp, optimizer, scheduler, loss, micro_batches)

    return step


# ------------------------------------------------------------------------------------- peer


def trl_trainer(dtype: torch.dtype, autocast: bool, examples, total_steps: int, callback, out_dir: str):
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    class PretokenizedDPOTrainer(DPOTrainer):
        """DPOTrainer on a dataset that already holds prompt_ids / chosen_ids / rejected_ids."""

        def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
            return dataset

    weights_dtype = torch.float32 if autocast else dtype
    model = common.load_hf_model(weights_dtype)
    ref_model = common.load_hf_model(weights_dtype)
    args = DPOConfig(
        output_dir=out_dir, use_cpu=True, bf16=autocast, seed=common.SEED, report_to="none", disable_tqdm=True,
        per_device_train_batch_size=PAIRS, gradient_accumulation_steps=1, max_steps=total_steps,
        learning_rate=LR, lr_scheduler_type="constant", weight_decay=0.0, adam_beta1=BETAS[0],
        adam_beta2=BETAS[1], adam_epsilon=EPS, max_grad_norm=CLIP, beta=BETA, loss_type=["sigmoid"],
        gradient_checkpointing=False, eval_strategy="no", save_strategy="no", logging_strategy="no",
        dataloader_num_workers=0, dataloader_drop_last=True, max_length=None,
    )
    return PretokenizedDPOTrainer(model=model, ref_model=ref_model, args=args,
                                  train_dataset=Dataset.from_list(examples),
                                  processing_class=common.hf_tokenizer(), callbacks=[callback])


def interleaved_callback(block_steps: int, warmup_steps: int, reps: int, ours: dict, dtype: torch.dtype,
                         quiet=(0.0, 0.0)):
    """A TrainerCallback timing every TRL step and running aligner blocks between TRL blocks."""
    from transformers import TrainerCallback

    class Interleave(TrainerCallback):
        def __init__(self):
            self.mark = None
            self.step_seconds: list[float] = []
            self.trl_blocks: list[float] = []
            self.ours_blocks = {name: [] for name in ours}
            self.peaks: list[float] = []
            self.loads: list[float] = []
            self.reenter = None  # set by the caller: context that re-enters aligner's CPU mode

        def on_step_begin(self, args, state, control, **kwargs):
            if self.mark is None:
                self.mark = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            self.step_seconds.append(time.perf_counter() - self.mark)
            done = state.global_step - warmup_steps
            if done == 0:  # TRL is warm: warm aligner up too (untimed)
                self._ours(record=False)
            elif done > 0 and done % block_steps == 0 and len(self.trl_blocks) < reps:
                self.trl_blocks.append(sum(self.step_seconds[-block_steps:]))
                self._ours(record=True)
                self.peaks.append(common.matmul_flops(dtype))
                print(f"  rep {len(self.trl_blocks)}/{reps}: TRL={PAIRS * block_steps / self.trl_blocks[-1]:.2f} "
                      + " ".join(f"{n}={PAIRS * block_steps / v[-1]:.2f}" for n, v in self.ours_blocks.items()
                                 if v) + f" pairs/s, matmul={self.peaks[-1] / 1e9:,.0f} GFLOP/s", flush=True)
            if done >= 0 and len(self.trl_blocks) < reps and done % block_steps == 0:
                self.loads.append(common.wait_for_quiet(*quiet))  # before the next round starts
            self.mark = time.perf_counter()

        def _ours(self, record: bool):
            with self.reenter():
                for name, step in ours.items():
                    seconds = common.timed(lambda: [step() for _ in range(block_steps)])
                    if record:
                        self.ours_blocks[name].append(seconds)

    return Interleave()


@torch.no_grad()
def hf_sequence_logps(model, examples) -> torch.Tensor:
    """[pairs] summed log-prob of the chosen answers under a transformers model (independent check)."""
    ids = torch.tensor([e["prompt_ids"] + e["chosen_ids"] for e in examples])
    logp = torch.log_softmax(model(ids).logits.float(), dim=-1)
    picked = logp[:, :-1].gather(-1, ids[:, 1:].unsqueeze(-1)).squeeze(-1)
    return picked[:, PROMPT_LEN - 1:].sum(-1)


def run_dtype(dtype_name: str, reps: int, warmup: int, block_steps: int, backend: str, diagnostics: bool,
              quiet=(0.0, 0.0)) -> dict:
    dtype = common.DTYPES[dtype_name]
    examples = make_pairs()
    tokenizer = common.hf_tokenizer()
    name = f"aligner {backend}"

    # Same function, same data: aligner's first-step chosen log-probs vs transformers' (policy == reference).
    check = aligner_stepper(dtype, backend, examples, tokenizer.pad_token_id)
    first = check()
    with common.peer_context():
        expected = float(hf_sequence_logps(common.load_hf_model(dtype), examples[:PAIRS]).mean())
    sanity = {"aligner_first_step_loss": first["loss"], "aligner_chosen_logps": first["chosen_logps"],
              "transformers_chosen_logps": expected}
    print(f"[{dtype_name}] first step: loss {first['loss']:.6f} (ln 2 = 0.693147), chosen log-prob "
          f"aligner {first['chosen_logps']:.4f} vs transformers {expected:.4f}")
    del check

    ours = {name: aligner_stepper(dtype, backend, examples, tokenizer.pad_token_id)}
    if diagnostics:
        small = ("fused_adam", "one_way_swap")
        ours[f"{name} + fused Adam + one-way swap (diagnostic)"] = aligner_stepper(
            dtype, backend, examples, tokenizer.pad_token_id, fixes=small)
    # peer name -> autocast (TRL's bf16=True: fp32 weights, bf16 compute)
    peers = {"TRL DPOTrainer": False} if dtype == torch.float32 else \
        {"TRL DPOTrainer bf16 autocast": True, "TRL DPOTrainer bf16 weights": False}
    trl_pairs, ours_pairs, peaks, loads = {}, {n: [] for n in ours}, [], []
    ours_by_run = {}  # peer -> aligner contender -> pairs/s measured interleaved with that peer
    warmup_steps = max(1, warmup) * block_steps
    for peer_name, autocast in peers.items():
        print(f"[{dtype_name}] {peer_name} interleaved with {', '.join(ours)}: {reps} reps x {block_steps} steps "
              f"of {PAIRS} pairs (pairs/s)")
        callback = interleaved_callback(block_steps, warmup_steps, reps, ours, dtype, quiet)
        with tempfile.TemporaryDirectory() as out_dir, common.peer_context() as reenter:
            callback.reenter = reenter
            trainer = trl_trainer(dtype, autocast, examples, warmup_steps + reps * block_steps, callback, out_dir)
            trainer.train()
        trl_pairs[peer_name] = [PAIRS * block_steps / s for s in callback.trl_blocks]
        ours_by_run[peer_name] = {n: [PAIRS * block_steps / s for s in seconds]
                                  for n, seconds in callback.ours_blocks.items()}
        for n, values in ours_by_run[peer_name].items():
            ours_pairs[n] += values
        peaks += callback.peaks
        loads += callback.loads

    stats = {n: common.summarize(v) for n, v in {**ours_pairs, **trl_pairs}.items()}
    # Each ratio pairs a peer with the aligner repetitions interleaved with it (same run).
    ratios = {"median": {}, "best": {}}
    for p in trl_pairs:
        paired = {n: common.summarize(v) for n, v in ours_by_run[p].items()}
        paired[p] = stats[p]
        for kind, table in common.ratios(paired, list(ours_pairs), [p]).items():
            ratios[kind].update(table)
    best_peer = max(trl_pairs, key=lambda p: stats[p]["median"])
    targets = [common.target(f"{name} / {best_peer} (median pairs/s)", ratios["median"][f"{name} / {best_peer}"],
                             TARGET_RATIO)]
    for n, s in stats.items():
        print(f"  {n:60s} median {s['median']:7.2f} pairs/s  min {s['min']:7.2f}  spread {s['spread']:5.1%}")
    common.print_ratios(ratios)
    for t in targets:
        print(f"  target {t['name']} >= {t['threshold']}: {t['value']:.3f} -> {'met' if t['met'] else 'MISSED'}")
    payload = {
        "dtype": dtype_name,
        "workload": {"pairs": PAIRS, "prompt_len": PROMPT_LEN, "chosen_len": ANSWER_LEN, "rejected_len": ANSWER_LEN,
                     "beta": BETA, "loss": "sigmoid DPO", "reference": "frozen initial policy, computed every step",
                     "optimizer": {"lr": LR, "betas": BETAS, "eps": EPS, "weight_decay": 0.0, "clip_grad": CLIP},
                     "steps_per_block": block_steps, "reps": reps, "warmup_steps": warmup_steps,
                     "attention_backend": backend},
        "sanity": sanity,
        "matmul_flops": common.summarize(peaks),
        "load_average_1m_per_rep": loads,
        "pairs_per_s": stats,
        "aligner_pairs_per_s_by_peer_run": {p: {n: common.summarize(v) for n, v in runs.items()}
                                            for p, runs in ours_by_run.items()},
        "ratios": ratios,
        "targets": targets,
    }
    path = common.write_result(f"dpo_{dtype_name}", payload)
    print(f"  wrote {path}")
    return payload


def main(argv=None):
    parser = common.base_arguments(__doc__.splitlines()[0], reps=5)
    parser.add_argument("--steps", type=int, default=4, help="DPO steps per timed block")
    parser.add_argument("--backend", choices=["sdpa", "local"], default="sdpa", help="aligner attention backend")
    parser.add_argument("--diagnostics", action="store_true",
                        help="also time aligner with candidate library fixes applied in-process (not targets)")
    args = parser.parse_args(argv)
    common.quiet_libraries()
    common.set_threads()
    common.start_megatron()
    for dtype_name in common.dtypes_of(args.dtype):
        run_dtype(dtype_name, args.reps, args.warmup, args.steps, args.backend, args.diagnostics,
                  (args.quiet_load, args.max_wait))


if __name__ == "__main__":
    main()
