"""A reward model served alone (PPO with remote_critic_rm.combine_rm_and_critic_server=false).

    python examples/nlp/gpt/serve_reward_model.py pretrained_checkpoint.restore_from_path=results/rm trainer.rm_server.port=5556
/v1/infer answers rewards [B] (and values = zeros [B, S], which the protocol requires); any batch size works.
"""
from aligner.training.entry import hydra_entry

main = hydra_entry("reward_model_server", "aligner.trainers.critic:serve_reward_model")

if __name__ == "__main__":
    main()
