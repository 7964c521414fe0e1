"""What every online algorithm shares to turn prompts into scored experience and a policy update:
the rollout engine, its scorers, and Python reward functions named in the config
(``reward_functions``, with the built-in task rewards under ``rewards/``).

Nothing is imported here: the reward-function worker process imports
``aligner.rollout.reward_worker`` and must start without torch.
"""
