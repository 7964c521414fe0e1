"""Reward-model training (Bradley-Terry) from an SFT checkpoint.

    python examples/nlp/gpt/train_reward_model.py [hydra overrides, e.g. trainer.devices=1 model.micro_batch_size=4]
    torchrun --nproc_per_node 2 examples/nlp/gpt/train_reward_model.py model.tensor_model_parallel_size=2
"""
from aligner.training.entry import hydra_entry

main = hydra_entry("training_rm", "aligner.trainers.reward_model:train")

if __name__ == "__main__":
    main()
