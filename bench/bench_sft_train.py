"""Training-step throughput: aligner (megatron GPTModel + DDP + optimizer, through `train_step`)
vs transformers' LlamaForCausalLM + torch AdamW, same weights, same data, same process.

    python bench/bench_sft_train.py [--dtype fp32|bf16|both] [--reps 5] [--steps 3] [--diagnostics]
                                    [--quiet-load 3.5]

Workload (BENCH_CONFIG): batch 8 x 256 tokens, causal-LM loss on every token, Adam (lr 1e-4,
betas 0.9/0.999, eps 1e-8, no weight decay), gradient clipping at 1.0 on both sides.
aligner runs with each attention backend ('sdpa': torch's fused kernel; 'local': megatron's
unfused DotProductAttention).

The peer in bf16 has two honest set-ups and both are measured:
  * "autocast": fp32 weights and AdamW, forward under torch.autocast(bfloat16); the same
    numerics as aligner's bf16 (bf16 compute, fp32 master weights and Adam states);
  * "bf16 weights": the model cast to bfloat16 and AdamW on bf16 parameters (no fp32 master
    copy; cheaper, less exact). The throughput target is checked against the faster of the two.
Targets (issue 2): bf16 throughput >= 1.0x transformers and MFU >= 35%.

--diagnostics adds aligner (sdpa) with candidate library fixes applied in-process (never
targets): torch's fused CPU Adam inside megatron's optimizer (`use_fused_adam`), and that plus
a RoPE without megatron's repeated work (`lean_rope`, bit-identical).
"""
from __future__ import annotations

import contextlib
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402  (puts the repository on sys.path)
import torch  # noqa: E402

BATCH, SEQ = 8, 256
LR, BETAS, EPS, CLIP = 1e-4, (0.9, 0.999), 1e-8, 1.0
N_BATCHES = 4  # distinct batches cycled through, identical for every contender
TARGET_RATIO, TARGET_MFU = 1.0, 0.35


def make_batches():
    """N_BATCHES windows of SEQ + 1 real tokens: inputs are [:, :SEQ], targets [:, 1:]."""
    return [common.token_windows(BATCH, SEQ + 1, seed=100 + i) for i in range(N_BATCHES)]


class Cycle:
    def __init__(self, items):
        self.items, self.i = items, 0

    def next(self):
        item = self.items[self.i % len(self.items)]
        self.i += 1
        return item


# ----------------------------------------------------------------------------------- aligner


def use_fused_adam(optimizer) -> None:
    """Diagnostic: switch the torch Adam inside megatron's optimizer to torch's fused CPU kernel.

    megatron-core builds `torch.optim.Adam(...)` without `fused`/`foreach` when neither TE nor
    apex is installed, and on CPU that means torch's per-tensor Python loop (~8 ops per tensor).
    Must run before the first step (the step counters' dtype is chosen then).
    """
    for group in optimizer.optimizer.param_groups:
        group["fused"], group["foreach"] = True, False


@contextlib.contextmanager
def lean_rope():
    """Diagnostic: megatron's unfused RoPE without its repeated work, bit-identical results.

    `rope_utils._apply_rotary_pos_emb_bshd` runs for q and for k in every layer and each time
    recomputes cos(freqs) and sin(freqs), multiplies them by mscale (1.0), casts them, and
    ends with `torch.cat((t, t_pass))` where t_pass is empty: a full copy of q/k. Here cos/sin
    are computed once per freqs tensor (one per forward) and the empty concatenation is skipped.
    """
    from megatron.core.models.common.embeddings import rope_utils

    original = rope_utils._apply_rotary_pos_emb_bshd
    cache = {}

    def apply(t, freqs, rotary_interleaved=False, multi_latent_attention=False, mscale=1.0):
        if rotary_interleaved or multi_latent_attention or mscale != 1.0 or t.shape[-1] != freqs.shape[-1]:
            return original(t, freqs, rotary_interleaved, multi_latent_attention, mscale)
        key = (freqs.data_ptr(), tuple(freqs.shape), freqs._version, t.dtype)
        if cache.get("key") != key:
            cache.update(key=key, cos=torch.cos(freqs).to(t.dtype), sin=torch.sin(freqs).to(t.dtype))
        x1, x2 = torch.chunk(t, 2, dim=-1)
        return t * cache["cos"] + torch.cat((-x2, x1), dim=-1) * cache["sin"]

    rope_utils._apply_rotary_pos_emb_bshd = apply
    try:
        yield
    finally:
        rope_utils._apply_rotary_pos_emb_bshd = original


def aligner_stepper(dtype: torch.dtype, backend: str, windows, fused_adam: bool = False, rope_fix: bool = False):
    from aligner.trainers.sft import SFTLoss
    from aligner.training.optim import OptimSettings, build_optimizer, wrap_data_parallel
    from aligner.training.step import train_step

    model, config = common.load_aligner_model(dtype, backend)
    params = common.parameter_count(model)
    settings = OptimSettings.from_config(
        {"name": "adam", "lr": LR, "weight_decay": 0.0, "betas": list(BETAS), "eps": EPS,
         "sched": {"name": "Constant"}}, max_steps=10**6, gradient_clip_val=CLIP)
    ddp = wrap_data_parallel(model, settings)
    optimizer, scheduler = build_optimizer(ddp, settings, dtype)
    if fused_adam:
        use_fused_adam(optimizer)
    loss = SFTLoss()
    batches = Cycle([{"tokens": w[:, :SEQ].contiguous(), "labels": w[:, 1:].contiguous(),
                      "loss_mask": torch.ones(BATCH, SEQ)} for w in windows])

    def step():
        with lean_rope() if rope_fix else contextlib.nullcontext():
            return train_step(ddp, optimizer, scheduler, loss, [batches.next()])["loss"]

    return step, params, config, (ddp, optimizer, scheduler, loss, batches)


# ------------------------------------------------------------------------------------- peer


def transformers_stepper(dtype: torch.dtype, autocast: bool, windows):
    """One step: forward with labels, backward, clip, fused AdamW (transformers Trainer's default optimizer)."""
    model = common.load_hf_model(torch.float32 if autocast else dtype)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR, betas=BETAS, eps=EPS, weight_decay=0.0, fused=True)
    batches = Cycle([(w[:, :SEQ].contiguous(), w[:, 1:].contiguous()) for w in windows])
    amp = torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast)

    def step():
        inputs, targets = batches.next()
        with amp:
            # shift_labels: the same SEQ targets per row as aligner (labels= alone would drop the last one).
            loss = model(input_ids=inputs, labels=targets, shift_labels=targets).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return float(loss)

    return step, model


# ------------------------------------------------------------------------------------- main


def block(step, steps: int):
    return lambda: common.timed(lambda: [step() for _ in range(steps)])


def run_dtype(dtype_name: str, reps: int, warmup: int, steps: int, diagnostics: bool, quiet=(0.0, 0.0)) -> dict:
    dtype = common.DTYPES[dtype_name]
    windows = make_batches()
    ours = {}
    for backend in ("sdpa", "local"):
        ours[backend] = aligner_stepper(dtype, backend, windows)
    if diagnostics:
        ours["sdpa + fused Adam (diagnostic)"] = aligner_stepper(dtype, "sdpa", windows, fused_adam=True)
        ours["sdpa + fused Adam + lean RoPE (diagnostic)"] = aligner_stepper(dtype, "sdpa", windows, fused_adam=True,
                                                                            rope_fix=True)
    params, config = ours["sdpa"][1], ours["sdpa"][2]
    peers = {"transformers": (False,)} if dtype == torch.float32 else \
        {"transformers autocast": (True,), "transformers bf16 weights": (False,)}
    peer_steps = {}
    for name, (autocast,) in peers.items():
        with common.peer_context():
            peer_steps[name] = transformers_stepper(dtype, autocast, windows)

    # Same function, same data: the first losses agree (fp32: to float rounding).
    first_losses = {f"aligner {b}": float(ours[b][0]()) for b in ours}
    for name, (step, _model) in peer_steps.items():
        with common.peer_context():
            first_losses[name] = step()
    print(f"[{dtype_name}] first-step losses: " + ", ".join(f"{k}={v:.6f}" for k, v in first_losses.items()))

    tokens_per_block = BATCH * SEQ * steps
    contenders = [common.Contender(f"aligner {b}", block(ours[b][0], steps), tokens_per_block) for b in ours]
    contenders += [common.Contender(n, block(s, steps), tokens_per_block, peer=True) for n, (s, _m) in peer_steps.items()]
    print(f"[{dtype_name}] {reps} reps x {steps} steps of {BATCH}x{SEQ} tokens (tokens/s):")
    loads = []
    throughput, peaks = common.interleave(contenders, reps, warmup, dtype, quiet=quiet, loads=loads)

    peak = statistics.median(peaks)
    stats = {}
    for name, values in throughput.items():
        s = common.summarize(values)
        s["mfu"] = common.training_mfu(s["median"], params, config.num_layers, config.hidden_size, SEQ, peak)
        stats[name] = s
    peer_names = list(peer_steps)
    best_peer = max(peer_names, key=lambda n: stats[n]["median"])
    ratios = common.ratios(stats, [f"aligner {b}" for b in ours], peer_names)
    default = "aligner sdpa"
    targets = [common.target(f"{default} / {best_peer} (median tokens/s)",
                             ratios["median"][f"{default} / {best_peer}"], TARGET_RATIO)]
    if dtype == torch.bfloat16:
        targets.append(common.target(f"{default} MFU", stats[default]["mfu"], TARGET_MFU))
    for name, s in stats.items():
        print(f"  {name:50s} median {s['median']:8,.0f} tok/s  min {s['min']:8,.0f}  spread {s['spread']:5.1%}  "
              f"MFU {s['mfu']:6.1%}")
    print(f"  matmul {dtype_name} ceiling median {peak / 1e9:,.0f} GFLOP/s")
    common.print_ratios(ratios)
    for t in targets:
        print(f"  target {t['name']} >= {t['threshold']}: {t['value']:.3f} -> {'met' if t['met'] else 'MISSED'}")
    payload = {
        "dtype": dtype_name,
        "workload": {"batch": BATCH, "seq": SEQ, "steps_per_block": steps, "reps": reps, "warmup_blocks": warmup,
                     "optimizer": {"lr": LR, "betas": BETAS, "eps": EPS, "weight_decay": 0.0, "clip_grad": CLIP},
                     "params": params},
        "first_step_losses": first_losses,
        "matmul_flops": common.summarize(peaks),
        "load_average_1m_per_rep": loads,
        "tokens_per_s": stats,
        "ratios": ratios,
        "targets": targets,
        "mfu_formula": "(6*params + 12*layers*hidden*seq) * tokens_per_s / median matmul FLOP/s of this dtype",
    }
    path = common.write_result(f"sft_train_{dtype_name}", payload)
    print(f"  wrote {path}")
    return payload


def main(argv=None):
    parser = common.base_arguments(__doc__.splitlines()[0], reps=5)
    parser.add_argument("--steps", type=int, default=3, help="optimizer steps per timed block")
    parser.add_argument("--diagnostics", action="store_true",
                        help="also time aligner with candidate library fixes applied in-process (not targets)")
    args = parser.parse_args(argv)
    common.quiet_libraries()
    common.set_threads()
    common.start_megatron()
    for dtype_name in common.dtypes_of(args.dtype):
        run_dtype(dtype_name, args.reps, args.warmup, args.steps, args.diagnostics, (args.quiet_load, args.max_wait))


if __name__ == "__main__":
    main()
