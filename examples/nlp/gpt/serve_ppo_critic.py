"""PPO critic server (combined with the reward model by default), started before the actor job.

    python examples/nlp/gpt/serve_ppo_critic.py pretrained_checkpoint.restore_from_path=results/rm
    torchrun --nproc_per_node 2 examples/nlp/gpt/serve_ppo_critic.py trainer.ppo.ready_file=results/critic/ready
Stop it with SIGTERM or Ctrl-C (rank 0 stops the other ranks; every rank exits 0).
"""
from aligner.training.entry import hydra_entry

main = hydra_entry("gpt_ppo_critic", "aligner.trainers.critic:serve")

if __name__ == "__main__":
    main()
