"""Supervised fine-tuning of a GPT policy (answer tokens only).

    python examples/nlp/gpt/train_gpt_sft.py [hydra overrides, e.g. trainer.devices=1 model.micro_batch_size=4]
    torchrun --nproc_per_node 2 examples/nlp/gpt/train_gpt_sft.py model.tensor_model_parallel_size=2
"""
from aligner.training.entry import hydra_entry

main = hydra_entry("gpt_sft", "aligner.trainers.sft:train")

if __name__ == "__main__":
    main()
