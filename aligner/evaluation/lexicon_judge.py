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
    """Mean VADER compound score of prompt + response over a samples jsonl written by PPO validation."""
    records = [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
    texts = [r["prompt"] + r["response"] for r in records]
    scores = vader_scores(texts)
    return {"vader_compound_mean": mean(scores), "reward_mean": mean(r["reward"] for r in records),
            "positive_fraction": mean(1.0 if s > 0.05 else 0.0 for s in scores), "samples": len(records)}
