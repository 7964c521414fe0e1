"""An independent judge of sentiment: VADER's lexicon (never used in training).

The reward model is learnt from human ratings; if PPO only fooled it, VADER would not move.
"""
from __future__ import annotations

import json
from pathlib import Path
from statistics import mean


def vader_scores(texts: list[str]) -> list[float]:
    try:
        from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer
    except ImportError as exc:  # a test/demo extra
        raise ImportError("the VADER judge needs vaderSentiment==3.3.2: pip install 'aligner[demo]'") from exc
    analyzer = SentimentIntensityAnalyzer()
    return [analyzer.polarity_scores(text)["compound"] for text in texts]


def judge_samples(path: str | Path) -> dict[str, float]:
    """VADER over a samples jsonl written by PPO validation.

    `vader_response_mean` judges what the policy wrote (the prompt is a fixed review prefix, the
    same before and after PPO); `vader_full_mean` judges prompt + response, as the RM sees it.
    """
    records = [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
    responses = vader_scores([r["response"] for r in records])
    full = vader_scores([r["prompt"] + r["response"] for r in records])
    return {"vader_response_mean": mean(responses), "vader_full_mean": mean(full),
            "positive_response_fraction": mean(1.0 if s > 0.05 else 0.0 for s in responses),
            "reward_mean": mean(r["reward"] for r in records), "samples": len(records)}
