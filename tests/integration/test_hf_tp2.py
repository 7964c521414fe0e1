"""Hugging Face import/export under real tensor and pipeline parallelism (2 processes, gloo).

At TP=2 the QKV rows are split by KV group, SwiGLU's fc1 by (gate, up) halves, the vocabulary
by rows; the worker compares gathered logits with transformers on the same checkpoint and
checks that save_hf at TP=2, and at PP=2, writes back exactly the original tensors.
"""
from pathlib import Path

from tests.launch import check, torchrun
from tests.unit.test_hf_convert import save_hf_case

WORKER = Path(__file__).with_name("hf_tp2_worker.py")
# llama_gqa / llama_theta500k have 2 KV heads: one group per rank at TP=2
CASES = [("llama_mha", "lm"), ("llama_gqa", "lm"), ("llama_tied", "lm"), ("llama_theta500k", "lm"),
         ("gpt2", "lm"), ("llama_gqa", "score")]


def test_hf_import_export_at_tp2_and_pp2(tmp_path):
    dirs = [save_hf_case(tmp_path / "hf", case, head=head, seed=i) for i, (case, head) in enumerate(CASES)]
    out = check(torchrun(WORKER, [tmp_path / "out", *dirs], nproc=2, timeout=400))
    diffs = [float(line.split("max_abs_diff=")[1]) for line in out.splitlines() if "max_abs_diff=" in line]
    assert len(diffs) == 2 * len(CASES), out
    assert max(diffs) < 1e-4
    assert out.count("pp=2 stage 1") == len(CASES)
    for name in ("tp2", "pp2"):
        assert sorted(p.name for p in (tmp_path / "out" / name).iterdir()) == sorted(p.name for p in dirs)
