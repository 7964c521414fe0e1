"""The main job: SFT -> reward model -> PPO (actor + separate critic server) on the embedded
movie-review data, then an independent VADER judgement of samples before and after PPO.

    python examples/nlp/gpt/run_movie_review_pipeline.py [--out results/pipeline] [--quick]

Each stage is a separate process started exactly as a user would start it; the critic server is
started, health-checked, and stopped cleanly (SIGTERM) around the PPO actor. The critic and the
actor share a fresh random token (ALIGNER_CRITIC_TOKEN, passed through the environment, never on
a command line where `ps` would show it), so no other local process can train the critic.
"""
from __future__ import annotations

import argparse
import json
import os
import secrets
import signal
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[3]
SCRIPTS = REPO / "examples" / "nlp" / "gpt"


def stage(title: str) -> None:
    print(f"\n=== {title} ===", flush=True)


def run(script: str, overrides: list[str], env: dict[str, str] | None = None) -> None:
    cmd = [sys.executable, str(SCRIPTS / script), *overrides]
    print("$", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True, cwd=REPO, env=env)


def free_port() -> int:
    from aligner.distributed.launch_env import free_port as pick

    return pick()


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="results/pipeline", help="directory for every stage's run")
    parser.add_argument("--data", default="data/movie_reviews")
    parser.add_argument("--quick", action="store_true", help="a few steps per stage (smoke test)")
    parser.add_argument("--sft-steps", type=int, default=600)
    parser.add_argument("--rm-steps", type=int, default=300)
    parser.add_argument("--ppo-steps", type=int, default=100)
    args = parser.parse_args(argv)
    if args.quick:
        args.sft_steps, args.rm_steps, args.ppo_steps = 6, 6, 2
    out, data = Path(args.out).resolve(), Path(args.data).resolve()
    started = time.time()

    stage("data: movie-review snippets from the vaderSentiment 3.3.2 sdist")
    subprocess.run([sys.executable, "-m", "aligner.data.prep.movie_reviews", "--output-dir", str(data)],
                   check=True, cwd=REPO)
    tok = f"model.tokenizer.model={data / 'tokenizer'}"

    stage("1/3 supervised fine-tuning")
    run("train_gpt_sft.py", [tok, f"exp_manager.explicit_log_dir={out / 'sft'}", f"trainer.sft.max_steps={args.sft_steps}",
                             f"model.data.train_ds.file_path={data / 'sft_train.jsonl'}",
                             f"model.data.validation_ds.file_path={data / 'sft_val.jsonl'}"])

    stage("2/3 reward model")
    run("train_reward_model.py", [tok, f"exp_manager.explicit_log_dir={out / 'rm'}", f"trainer.rm.max_steps={args.rm_steps}",
                                  f"pretrained_checkpoint.restore_from_path={out / 'sft'}",
                                  f"model.data.train_ds.file_path={data / 'comparisons_train.jsonl'}",
                                  f"model.data.validation_ds.file_path={data / 'comparisons_val.jsonl'}"])

    stage("3/3 PPO: critic server + actor")
    # each process its share of the cores: one thread per core in each would oversubscribe them
    # (bench_ppo: 1 + 1 threads on 2 cores ran at least as fast as 2 + 2)
    threads = f"trainer.torch_threads={max(1, (os.cpu_count() or 2) // 2)}"
    port = free_port()
    token = secrets.token_hex(16)
    token_env = {**os.environ, "ALIGNER_CRITIC_TOKEN": token}  # both sides; not in argv (ps shows argv)
    critic_log = open(out / "critic_server.log", "w")
    critic_cmd = [sys.executable, str(SCRIPTS / "serve_ppo_critic.py"), tok,
                  f"exp_manager.explicit_log_dir={out / 'critic'}", f"trainer.ppo.port={port}",
                  f"trainer.ppo.max_steps={args.ppo_steps}", f"pretrained_checkpoint.restore_from_path={out / 'rm'}",
                  threads]
    print("$ ALIGNER_CRITIC_TOKEN=<random>", " ".join(critic_cmd), f"> {critic_log.name} &", flush=True)
    critic = subprocess.Popen(critic_cmd, cwd=REPO, stdout=critic_log, stderr=subprocess.STDOUT, env=token_env)
    try:
        from aligner.serving.client import CriticClient

        client = CriticClient("127.0.0.1", port, token=token, total_timeout_s=300)
        client.wait_until_ready(300)
        print(f"critic server ready on 127.0.0.1:{port} (health: {client.health()})", flush=True)
        run("train_gpt_ppo_actor.py", [tok, f"exp_manager.explicit_log_dir={out / 'ppo'}",
                                       f"trainer.ppo.max_steps={args.ppo_steps}",
                                       f"pretrained_checkpoint.restore_from_path={out / 'sft'}",
                                       f"remote_critic_rm.critic.port={port}",
                                       f"model.data.train_ds.file_path={data / 'prompts_train.jsonl'}",
                                       f"model.data.validation_ds.file_path={data / 'prompts_val.jsonl'}", threads],
            env=token_env)
    finally:
        critic.send_signal(signal.SIGTERM)
        try:
            code = critic.wait(timeout=60)
        except subprocess.TimeoutExpired:
            critic.kill()
            code = critic.wait()
        critic_log.close()
        print(f"critic server stopped (exit code {code})", flush=True)

    stage("results")
    return summarise(out, time.time() - started)


def summarise(out: Path, elapsed: float) -> dict:
    from aligner.evaluation.lexicon_judge import judge_samples
    from aligner.training.plots import plot_curves

    samples = sorted((out / "ppo" / "samples").glob("val_step_*.jsonl"))
    judged = {int(path.stem.rsplit("_", 1)[1]): judge_samples(path) for path in samples}
    before, after = judged[min(judged)], judged[max(judged)]
    history: dict[str, list] = {}
    for line in (out / "ppo" / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        for key in ("rollout/reward_mean", "rollout/kl", "val/reward_mean"):
            if key in record:
                history.setdefault(key, []).append((record["step"], record[key]))
    history["val/vader_response_mean (independent judge)"] = [(step, j["vader_response_mean"]) for step, j in judged.items()]
    plot = plot_curves(history, out / "ppo_reward_kl.png", list(history), title="PPO on movie reviews")
    print(f"{'val step':>8} {'RM reward':>10} {'VADER(response)':>16} {'positive':>9}")
    for step, j in judged.items():
        print(f"{step:8d} {j['reward_mean']:10.3f} {j['vader_response_mean']:16.3f} {j['positive_response_fraction']:9.0%}")
    print(f"{'step':>5} {'reward':>9} {'KL':>9}")
    for (step, reward), (_, kl) in zip(history.get("rollout/reward_mean", []), history.get("rollout/kl", [])):
        print(f"{step:5d} {reward:9.4f} {kl:9.4f}")
    summary = {"before_ppo": before, "after_ppo": after, "validation": {str(k): v for k, v in judged.items()},
               "plot": str(plot), "elapsed_s": round(elapsed, 1)}
    for label, result, name in (("before", before, samples[0].name), ("after ", after, samples[-1].name)):
        print(f"validation samples {label} PPO ({name}): RM reward {result['reward_mean']:.3f}, "
              f"VADER(response) {result['vader_response_mean']:.3f}, VADER(prompt+response) "
              f"{result['vader_full_mean']:.3f}, positive responses {result['positive_response_fraction']:.0%}")
    print(f"plot: {plot}\nwhole pipeline: {elapsed / 60:.1f} min")
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


if __name__ == "__main__":
    os.environ.setdefault("PYTHONWARNINGS", "ignore")
    main()
