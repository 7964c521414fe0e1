"""The main job's summary: VADER at every validation step, before/after, the plot and summary.json."""
import importlib.util
import json

import pytest

from tests.launch import REPO



def _pipeline_module():
    spec = importlib.util.spec_from_file_location("pipeline", REPO / "examples/nlp/gpt/run_movie_review_pipeline.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _write_samples(path, responses, reward):
    path.write_text("".join(json.dumps({"prompt": "The film", "response": r, "reward": reward}) + "\n"
                            for r in responses))


def test_summary_judges_every_validation_step_with_vader(tmp_path, capsys):
    from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

    samples = tmp_path / "ppo" / "samples"
    samples.mkdir(parents=True)
    steps = {0: [" is awful and boring.", " is a film."], 5: [" is a film.", " is good."],
             10: [" is wonderful, a great delight.", " is good."]}
    for step, responses in steps.items():
        _write_samples(samples / f"val_step_{step:07d}.jsonl", responses, reward=step / 10)
    (tmp_path / "ppo" / "metrics.jsonl").write_text("".join(
        json.dumps({"step": s, "rollout/reward_mean": 0.1 * s, "rollout/kl": 0.5 * s}) + "\n" for s in range(1, 11)))

    summary = _pipeline_module().summarise(tmp_path, elapsed=60.0)

    vader = SentimentIntensityAnalyzer()
    expected = {step: sum(vader.polarity_scores(r)["compound"] for r in rs) / len(rs) for step, rs in steps.items()}
    assert set(summary["validation"]) == {"0", "5", "10"}
    for step, value in expected.items():
        assert summary["validation"][str(step)]["vader_response_mean"] == pytest.approx(value)
    assert expected[0] < 0 < 0.5 < expected[10]
    assert summary["before_ppo"]["vader_response_mean"] == pytest.approx(expected[0])
    assert summary["after_ppo"]["vader_response_mean"] == pytest.approx(expected[10])
    assert summary["after_ppo"]["positive_response_fraction"] == 1.0
    assert summary["before_ppo"]["reward_mean"] == 0.0 and summary["after_ppo"]["reward_mean"] == 1.0
    assert (tmp_path / "ppo_reward_kl.png").stat().st_size > 0
    assert json.loads((tmp_path / "summary.json").read_text())["validation"]["5"]["samples"] == 2
    printed = capsys.readouterr().out
    assert f"{expected[10]:16.3f}" in printed and "whole pipeline: 1.0 min" in printed
