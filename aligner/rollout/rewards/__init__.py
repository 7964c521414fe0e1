"""Reward functions shipped with aligner for its built-in tasks, usable as
``reward.functions: [{path: aligner.rollout.rewards.<module>:<function>}]``. Plain Python, no
torch: they run in the reward worker process."""
