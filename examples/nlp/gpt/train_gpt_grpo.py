"""Critic-free RL on the rollout engine: GRPO, Dr. GRPO, DAPO's pieces, RLOO, REINFORCE++, ReMax.

    python examples/nlp/gpt/train_gpt_grpo.py algorithm.adv_estimator=grpo model.grpo.num_generations=8
    python examples/nlp/gpt/train_gpt_grpo.py algorithm.adv_estimator=rloo reward.remote_rm.enable=true
"""
from aligner.training.entry import hydra_entry

main = hydra_entry("gpt_grpo", "aligner.trainers.grpo:train")

if __name__ == "__main__":
    main()
