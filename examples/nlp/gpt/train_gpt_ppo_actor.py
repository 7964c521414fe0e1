"""PPO actor: policy + reference policy here, critic and reward model behind an HTTP server.

    python examples/nlp/gpt/serve_ppo_critic.py trainer.ppo.port=5567 &   # the critic job
    python examples/nlp/gpt/train_gpt_ppo_actor.py remote_critic_rm.critic.port=5567
"""
from aligner.training.entry import hydra_entry

main = hydra_entry("gpt_ppo_actor", "aligner.trainers.ppo_actor:train")

if __name__ == "__main__":
    main()
