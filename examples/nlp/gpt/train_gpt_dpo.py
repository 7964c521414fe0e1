"""DPO-family preference training (dpo, ipo, rpo_sq, rpo_fwd_kl, rpo_bwd_kl).

    python examples/nlp/gpt/train_gpt_dpo.py [hydra overrides, e.g. trainer.devices=1 model.micro_batch_size=4]
    torchrun --nproc_per_node 2 examples/nlp/gpt/train_gpt_dpo.py model.tensor_model_parallel_size=2
"""
from aligner.training.entry import hydra_entry

main = hydra_entry("gpt_dpo", "aligner.trainers.dpo:train")

if __name__ == "__main__":
    main()
