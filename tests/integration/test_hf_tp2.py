"""Hugging Face import/export under real tensor and pipeline parallelism (2 processes, gloo).

At TP=2 the QKV rows are split by KV group, SwiGLU's fc1 by (gate, up) halves, the vocabulary
by rows; the worker compares gathered logits with transformers on the same checkpoint and
checks that save_hf at TP=2, and at PP=2, writes back exactly the original tensors. Mixtral is
also run at expert parallelism 2 (each rank holds half of the experts).
"""
import re
from pathlib import Path

from tests.launch import check, torchrun
from tests.unit.test_hf_convert import save_hf_case

WORKER = Path(__file__).with_name("hf_tp2_worker.py")
# llama_gqa / llama_theta500k have 2 KV heads: one group per rank at TP=2
# The families of tests/unit/test_hf_families.py (all with 2 KV heads), and Mixtral at EP=2 as well.
CASES = [("llama_mha", "lm"), ("llama_gqa", "lm"), ("llama_tied", "lm"), ("llama_theta500k", "lm"),
         ("gpt2", "lm"), ("llama_gqa", "score"),
         ("llama3", "lm"), ("qwen2", "lm"), ("qwen2_tied", "lm"), ("qwen3", "lm"), ("qwen3", "score"),
         ("mistral_window", "lm"), ("mixtral", "lm"), ("mixtral", "score")]
MOE = [case for case in CASES if case[0] == "mixtral"]


def diffs_of(out: str, label: str) -> dict[str, float]:
    """{'<rank> <dir name>': max |diff|} from the worker's `rank R <label> NAME max_abs_diff=X` reports.

    Matched anywhere in the text, not line by line: two ranks' prints can interleave on one line.
    """
    pattern = rf"rank (\d+) {re.escape(label)} (\S+?) max_abs_diff=([0-9.eE+-]+?)(?=rank |\s|$)"
    return {f"{rank} {name}": float(value) for rank, name, value in re.findall(pattern, out)}


def test_hf_import_export_at_tp2_pp2_and_ep2(tmp_path):
    dirs = [save_hf_case(tmp_path / "hf", case, head=head, seed=i) for i, (case, head) in enumerate(CASES)]
    out = check(torchrun(WORKER, [tmp_path / "out", *dirs], nproc=2, timeout=600))
    tp, ep = diffs_of(out, "tp=2"), diffs_of(out, "ep=2")
    print("\n".join(f"tp=2 rank {k}: {v:.2e}" for k, v in tp.items()))
    print("\n".join(f"ep=2 rank {k}: {v:.2e}" for k, v in ep.items()))
    assert len(tp) == 2 * len(CASES) and len(ep) == 2 * len(MOE), out
    assert max(tp.values()) < 1e-4 and max(ep.values()) < 1e-4
    assert out.count("pp=2 stage 1") == len(CASES)
    for name in ("tp2", "pp2"):
        assert sorted(p.name for p in (tmp_path / "out" / name).iterdir()) == sorted(p.name for p in dirs)
    assert sorted(p.name for p in (tmp_path / "out" / "ep2").iterdir()) == [f"mixtral_{head}" for _, head in MOE]
