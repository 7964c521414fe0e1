"""What every benchmark shares: the fixed model, the matmul ceiling, interleaved timing, JSON.

The fixed configuration (/work/shared/reference/BENCH_CONFIG.md): a random-init
`LlamaForCausalLM` (seed 0, vocab 8192 from a byte-level BPE trained with `tokenizers`,
hidden 256, intermediate 688, 4 layers, 4 heads, 2 KV heads, max positions 512, rope_theta
10000, untied: 7.10M parameters) built once and cached in `bench/.cache/`, then imported into
aligner's megatron GPTModel so both sides compute the same function. torch threads = 2.

Timing discipline: the machine is shared and noisy, so every benchmark interleaves its
contenders (ours and the peer) repetition by repetition, rotating the order, and compares
medians. The matmul ceiling (2048 x 2048, same dtype) is measured inside the same rounds.

The peer runs without aligner's CPU compatibility `TorchFunctionMode` on the stack (that mode
exists only for megatron-core; transformers and TRL never see it when used on their own).
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Callable, Sequence

import torch

BENCH_DIR = Path(__file__).resolve().parent
REPO_ROOT = BENCH_DIR.parent
CACHE_DIR = BENCH_DIR / ".cache"
RESULTS_DIR = BENCH_DIR / "results"
if str(REPO_ROOT) not in sys.path:  # `python bench/bench_x.py` from anywhere imports this checkout
    sys.path.insert(0, str(REPO_ROOT))

THREADS = 2
SEED = 0
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
# Hugging Face LlamaConfig fields of the fixed model.
FIXED_LLAMA = dict(
    vocab_size=8192, hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=4,
    num_key_value_heads=2, max_position_embeddings=512, rope_theta=10000.0, tie_word_embeddings=False,
    rms_norm_eps=1e-5, hidden_act="silu", attention_bias=False, mlp_bias=False,
)
_MODEL_VERSION = "llama-v1"  # bump to rebuild the cache when the recipe below changes
_TOKENIZER_CORPUS_BYTES = 6_000_000
_HELD_OUT_CORPUS_BYTES = 1_000_000


def set_threads() -> None:
    torch.set_num_threads(THREADS)


# --------------------------------------------------------------------------------- fixed model


def _stdlib_texts():
    """(tokenizer corpus, held-out text): Python's standard library sources in sorted order.

    Always present, offline and deterministic for a given Python; the model is random-init,
    so only the tokenizer's vocabulary size matters, not the domain of the text.
    """
    import sysconfig

    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in root.rglob("*.py") if "site-packages" not in p.relative_to(root).parts)
    corpus, held_out, size = [], [], 0
    for path in files:
        text = path.read_text(encoding="utf-8", errors="replace")
        if size < _TOKENIZER_CORPUS_BYTES:
            corpus.extend(line for line in text.splitlines() if line.strip())
        elif size < _TOKENIZER_CORPUS_BYTES + _HELD_OUT_CORPUS_BYTES:
            held_out.append(text)
        else:
            break
        size += len(text)
    return corpus, "\n".join(held_out)


def fixed_model_dir() -> Path:
    """Directory of the fixed HF Llama + tokenizer (+ `tokens.pt`, held-out token ids), built once.

    Must run before megatron's CPU layer is installed: seeding goes through torch.manual_seed.
    """
    out = CACHE_DIR / _MODEL_VERSION
    if (out / "model.safetensors").is_file() and (out / "tokens.pt").is_file():
        return out
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from aligner.data.train_tokenizer import train_bpe_tokenizer

    tmp = CACHE_DIR / f"{_MODEL_VERSION}.tmp-{os.getpid()}"
    corpus, held_out = _stdlib_texts()
    train_bpe_tokenizer(corpus, FIXED_LLAMA["vocab_size"], tmp)
    tokenizer = AutoTokenizer.from_pretrained(str(tmp), local_files_only=True)
    if len(tokenizer) != FIXED_LLAMA["vocab_size"]:
        raise RuntimeError(f"tokenizer has {len(tokenizer)} tokens, expected {FIXED_LLAMA['vocab_size']}: "
                           "the corpus is too small; raise _TOKENIZER_CORPUS_BYTES in bench/common.py")
    fields = dict(FIXED_LLAMA)
    theta = fields.pop("rope_theta")
    config = LlamaConfig(**fields, rope_parameters={"rope_type": "default", "rope_theta": theta},
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(SEED)
    model = LlamaForCausalLM(config)
    model.save_pretrained(str(tmp), safe_serialization=True)
    ids = tokenizer(held_out, add_special_tokens=False)["input_ids"]
    torch.save(torch.tensor(ids, dtype=torch.long), tmp / "tokens.pt")
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.exists():  # a half-built directory from an interrupted run
        import shutil

        shutil.rmtree(out)
    os.replace(tmp, out)
    return out


def token_windows(count: int, length: int, seed: int) -> torch.Tensor:
    """[count, length] windows of real token ids from held-out text, at seeded random offsets."""
    stream = torch.load(fixed_model_dir() / "tokens.pt")
    generator = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, stream.numel() - length, (count,), generator=generator)
    return torch.stack([stream[s: s + length] for s in starts.tolist()])


def load_hf_model(dtype: torch.dtype):
    """The fixed model as transformers' LlamaForCausalLM (SDPA attention, transformers' default)."""
    from transformers import LlamaForCausalLM

    return LlamaForCausalLM.from_pretrained(str(fixed_model_dir()), dtype=dtype, attn_implementation="sdpa")


def hf_tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(fixed_model_dir()), local_files_only=True)


def start_megatron():
    """torch.distributed (gloo, world 1) + megatron parallel state; re-applies the thread count."""
    from aligner.distributed.setup import initialize

    fixed_model_dir()  # before the CPU layer patches torch's seeding
    layout = initialize(tensor_parallel=1, pipeline_parallel=1, seed=SEED)
    set_threads()
    return layout


def load_aligner_model(dtype: torch.dtype, attention_backend: str = "sdpa"):
    """(GPTModel with the fixed weights imported, its ModelConfig). Needs `start_megatron()` first."""
    from aligner.models.gpt import build_gpt
    from aligner.models.hf.convert import load_hf_weights, model_config_from_hf

    path = fixed_model_dir()
    config = dataclasses.replace(model_config_from_hf(path), attention_backend=attention_backend)
    model = build_gpt(config, dtype)
    load_hf_weights(path, model, config)
    return model, config


def parameter_count(model) -> int:
    return sum(p.numel() for p in model.parameters())


@torch.no_grad()
def logits_max_abs_diff(hf_model, our_model, tokens: torch.Tensor) -> float:
    """Largest |logit difference| between the two models on tokens [B,S]: both compute the same function."""
    from aligner.models.gpt import causal_attention_mask, position_ids_for, unwrap

    ours = unwrap(our_model)
    was_training = (hf_model.training, ours.training)
    hf_model.eval()
    ours.eval()
    try:
        with peer_context():
            theirs = hf_model(tokens).logits.float()
        mine = ours(tokens, position_ids_for(tokens), causal_attention_mask(tokens.shape[1], tokens.device),
                    runtime_gather_output=True).float()
    finally:
        hf_model.train(was_training[0])
        ours.train(was_training[1])
    return float((theirs - mine).abs().max())


# ------------------------------------------------------------------------------- peer context


@contextlib.contextmanager
def peer_context():
    """Run a block without aligner's CPU `TorchFunctionMode`; yields a context that re-enters it.

    That mode is thread-local and intercepts every torch call in Python. Aligner pays for it
    (it is part of aligner on CPU); a peer used on its own never would, so it is popped for
    peer code. `with reenter():` inside the block runs aligner code with the mode again.
    """
    from torch.overrides import _get_current_function_mode_stack, _pop_mode_temporarily

    from aligner.compat import megatron_cpu

    stack = _get_current_function_mode_stack()
    if stack and isinstance(stack[-1], megatron_cpu._CudaDeviceToCpu):
        with _pop_mode_temporarily() as mode:
            yield lambda: mode
    else:
        yield contextlib.nullcontext


# ------------------------------------------------------------------------------------- timing


def matmul_flops(dtype: torch.dtype, size: int = 2048, iters: int = 3) -> float:
    """FLOP/s of a size x size matmul in `dtype` on this process's threads (best of `iters`)."""
    generator = torch.Generator().manual_seed(SEED)
    a = torch.randn(size, size, generator=generator).to(dtype)
    b = torch.randn(size, size, generator=generator).to(dtype)
    torch.mm(a, b)  # first call pays for kernel selection and page faults
    best = float("inf")
    for _ in range(iters):
        start = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - start)
    return 2.0 * size ** 3 / best


def training_mfu(tokens_per_s: float, params: int, layers: int, hidden: int, seq: int, peak_flops: float) -> float:
    """BENCH_CONFIG's model FLOP utilisation: (6 N + 12 L H S) x tokens/s / matmul FLOP/s."""
    return (6.0 * params + 12.0 * layers * hidden * seq) * tokens_per_s / peak_flops


@dataclasses.dataclass
class Contender:
    """One side of a comparison.

    run_block: runs one timed block (several steps, or one generate call) and returns its
        wall time in seconds; anything outside it (data already prepared) is not timed.
    work: units of work per block (tokens, pairs) so throughput = work / seconds.
    peer: True for the library we compare against; it runs inside `peer_context()`.
    """

    name: str
    run_block: Callable[[], float]
    work: float
    peer: bool = False


def timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def wait_for_quiet(max_load: float, max_wait_s: float) -> float:
    """Wait (at most max_wait_s) until the 1-minute load average is <= max_load; return it.

    max_load <= 0 disables waiting. The load average counts this process too (about 2 while
    it computes), and lags by about a minute, so it is a coarse filter against other jobs.
    """
    deadline = time.monotonic() + max_wait_s
    while max_load > 0 and os.getloadavg()[0] > max_load and time.monotonic() < deadline:
        time.sleep(5)
    return os.getloadavg()[0]


def interleave(contenders: Sequence[Contender], reps: int, warmup: int, dtype: torch.dtype,
               log=print, quiet: tuple[float, float] = (0.0, 0.0),
               loads: list | None = None) -> tuple[dict[str, list[float]], list[float]]:
    """Throughput per repetition of every contender, and the matmul FLOP/s of every round.

    Each round runs every contender once (rotating who goes first, so drift and cache warmth
    favour no one) and one matmul-ceiling measurement. `quiet` = (max_load, max_wait_s) for
    `wait_for_quiet` before each round; the 1-minute load average at the start of each round
    is appended to `loads`.
    """
    for _ in range(warmup):
        for c in contenders:
            _run(c)
    throughput = {c.name: [] for c in contenders}
    peaks = []
    for rep in range(reps):
        load = wait_for_quiet(*quiet)
        if loads is not None:
            loads.append(load)
        order = list(contenders[rep % len(contenders):]) + list(contenders[:rep % len(contenders)])
        for c in order:
            seconds = _run(c)
            throughput[c.name].append(c.work / seconds)
        peaks.append(matmul_flops(dtype))
        log(f"  rep {rep + 1}/{reps}: " + ", ".join(f"{c.name}={throughput[c.name][-1]:,.1f}" for c in contenders)
            + f", matmul={peaks[-1] / 1e9:,.0f} GFLOP/s")
    return throughput, peaks


def _run(c: Contender) -> float:
    if c.peer:
        with peer_context():
            return c.run_block()
    return c.run_block()


def summarize(values: Sequence[float]) -> dict:
    """median, min, max, spread ((max - min) / median) and all values of a throughput series."""
    med = statistics.median(values)
    return {"median": med, "min": min(values), "max": max(values),
            "spread": (max(values) - min(values)) / med if med else float("nan"), "values": list(values)}


def ratios(stats: dict, ours: Sequence[str], peers: Sequence[str]) -> dict:
    """Throughput ratios ours / peer, of the medians and of the best repetitions.

    The median is the headline (BENCH_CONFIG). On a shared machine the slow repetitions are
    slow because of other jobs (with 2 OpenMP threads one descheduled thread stalls every
    operator), so the ratio of the best repetitions, each side's least-disturbed run, is the
    steadier estimate of the intrinsic ratio; both are reported.
    """
    return {
        "median": {f"{o} / {p}": stats[o]["median"] / stats[p]["median"] for o in ours for p in peers},
        "best": {f"{o} / {p}": stats[o]["max"] / stats[p]["max"] for o in ours for p in peers},
    }


def print_ratios(table: dict) -> None:
    for key in table["median"]:
        print(f"  ratio {key}: {table['median'][key]:.2f}x (medians), {table['best'][key]:.2f}x (best reps)")


def target(name: str, value: float, threshold: float) -> dict:
    return {"name": name, "value": value, "threshold": threshold, "met": bool(value >= threshold)}


# ------------------------------------------------------------------------------------ results


def machine_info() -> dict:
    cpu = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "cpu": cpu, "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
        "platform": platform.platform(), "python": platform.python_version(),
        "load_average_1m_at_write": os.getloadavg()[0],
    }


def versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for package in ("torch", "megatron-core", "transformers", "trl", "accelerate", "tokenizers"):
        try:
            out[package] = version(package)
        except PackageNotFoundError:
            out[package] = None
    return out


def write_result(name: str, payload: dict) -> Path:
    """bench/results/<name>.json with machine, versions, the fixed config and `payload`."""
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    record = {
        "benchmark": name,
        "written": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join([Path(sys.argv[0]).name] + sys.argv[1:]),
        "machine": machine_info(),
        "versions": versions(),
        "model": {**FIXED_LLAMA, "seed": SEED, "cache": str(fixed_model_dir().relative_to(REPO_ROOT))},
        "note": "shared 2-core machine: other jobs run concurrently; contenders are interleaved per repetition "
                "and compared by medians",
        **payload,
    }
    path = RESULTS_DIR / f"{name}.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(record, indent=2) + "\n")
    os.replace(tmp, path)
    return path


def base_arguments(description: str, reps: int) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--dtype", choices=["fp32", "bf16", "both"], default="both")
    parser.add_argument("--reps", type=int, default=reps, help="timed repetitions per contender (>= 3)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed blocks per contender first")
    parser.add_argument("--quiet-load", type=float, default=0.0,
                        help="before each round wait until the 1-minute load average is at most this (0: never wait)")
    parser.add_argument("--max-wait", type=float, default=300.0, help="longest wait for --quiet-load, seconds")
    return parser


def dtypes_of(choice: str) -> list[str]:
    return ["fp32", "bf16"] if choice == "both" else [choice]


def quiet_libraries() -> None:
    """Keep library chatter (deprecation notices, per-step logs) out of the timed output."""
    import logging
    import warnings

    warnings.filterwarnings("ignore")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    for name in ("transformers", "megatron", "aligner", "trl", "accelerate", "datasets"):
        logging.getLogger(name).setLevel(logging.ERROR)
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
    except ImportError:
        pass
