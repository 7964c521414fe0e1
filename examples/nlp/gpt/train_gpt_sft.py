"""Supervised fine-tuning of a GPT policy.

    python examples/nlp/gpt/train_gpt_sft.py model.data.train_ds.file_path=... trainer.sft.max_steps=100
    torchrun --nproc_per_node 2 examples/nlp/gpt/train_gpt_sft.py model.tensor_model_parallel_size=2
"""
from pathlib import Path

import hydra

from aligner.trainers import sft

CONF = Path(__file__).resolve().parents[3] / "conf"


@hydra.main(config_path=str(CONF), config_name="gpt_sft", version_base=None)
def main(cfg) -> None:
    sft.train(cfg, CONF / "gpt_sft.yaml")


if __name__ == "__main__":
    main()
