"""KVCacheSampler under tensor parallelism: TP=2 ranks agree and reproduce the TP=1 samples.

Both layouts run the same weights: the worker writes a native checkpoint at TP=1 and loads it
(resharded) at TP=2, in separate processes under torchrun (gloo).
"""
from pathlib import Path

from tests.launch import check, torchrun

WORKER = Path(__file__).with_name("sampler_tp2_worker.py")


def test_tp2_samples_match_tp1(tmp_path):
    out = check(torchrun(WORKER, [tmp_path / "ckpt"], nproc=2))
    for kind in ("greedy", "sampled"):
        assert out.count(f" {kind} match ") == 2, out
    assert out.count(" unseeded agree") == 2, out
    assert out.count(" mode-on match") == 2, out  # the CPU mode, suspended in the loop, had nothing to do
    # the batch is only a real test if rows stopped at different times
    line = next(l for l in out.splitlines() if " sampled match " in l)
    ended = line.split("ended=")[1].split(" ")[0]
    assert "1" in ended and "0" in ended, line
