"""PPO update throughput (episodes/s): aligner vs TRL 1.12 `trl.experimental.ppo.PPOTrainer`, same run.

    python bench/bench_ppo.py [--dtype fp32|bf16|both] [--reps 5] [--steps 2] [--quiet-load 3.5]
                              [--actor-threads 2 --critic-threads 2]

Workload (BENCH_CONFIG "PPO update"): 32 episodes per update, prompts of 32 tokens, responses of
32 tokens forced to full length (no stop token: EOS forbidden on aligner's side with
min_length = max_length, `stop_token=None` on TRL's), temperature 1, top-k 0, top-p 1;
4 mini-batches of 8 episodes (one optimizer step each), 1 PPO epoch; policy and reference =
the fixed 7.10M Llama; critic and reward model = the same trunk with one scalar head
(`LlamaForSequenceClassification`, num_labels 1, head seeded; built once into bench/.cache/).
Adam lr 3e-6 (TRL's default), betas (0.9, 0.999), no weight decay, constant schedule, no
gradient clipping (TRL's PPO loop never clips), KL coefficient 0.05 with the k1 estimator,
gamma 1, lambda 0.95, ratio clip 0.2, value clip 0.2, advantages whitened.

Both sides run as their users run them, each its own native loop, in separate processes:

* aligner: the real PPO engine (`aligner.trainers.ppo_actor.build_engine`, conf/gpt_ppo_actor.yaml +
  overrides), stepped through `RolloutEngine.step()`
  in one process, and the real critic server (examples/nlp/gpt/serve_ppo_critic.py, critic and
  RM combined, RM weights parked and swapped in) in another, over HTTP. Every step: generate
  with the KV-cache sampler -> critic/RM infer fired -> actor log-probs -> reference log-probs
  (parked-weights swap) -> values/rewards collected -> GAE -> critic train fired -> 4 PPO
  mini-batch updates -> critic train awaited (`wait_for_critic_each_step`, so no critic work
  spills into the peer's time).
* TRL: `PPOTrainer.train()` in a third process with TRL 1.12 first on sys.path (installed into
  bench/.cache/trl-1.12.0, never into the venv), policy + separate reference + value model +
  reward model, `per_device_train_batch_size=32`, `num_mini_batches=4`, `num_ppo_epochs=1`,
  `local_rollout_forward_batch_size=32`, gradient checkpointing off, no eval, no saving, no
  sample generations, no printing callback.

Interleaving: each child blocks at its loop's step boundary (aligner: after the step's metrics
are logged; TRL: `on_step_end`) until this orchestrator tells it to run a block of `--steps`
updates; the block is timed inside the child from that command to the end of its last update,
so it covers every line of the loop. Rounds rotate who goes first; only one side computes at
a time (the critic server is idle while TRL runs). Before timing, both sides score the same
sequences and the orchestrator checks they agree: policy and reference log-probs, critic
values, RM rewards, and that aligner's prompt dataset holds exactly TRL's prompt token ids.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402
import torch  # noqa: E402
from peer_processes import BlockDriver, Channel, Child, install_trl  # noqa: E402

EPISODES, PROMPT_LEN, RESPONSE_LEN = 32, 32, 32
MINI_BATCHES, PPO_EPOCHS = 4, 1
MINI_BATCH = EPISODES // MINI_BATCHES
LR, BETAS, EPS = 3e-6, (0.9, 0.999), 1e-8
KL_COEF, GAMMA, LAM, RATIO_CLIP, VALUE_CLIP, VF_COEF = 0.05, 1.0, 0.95, 0.2, 0.2, 0.1
N_PROMPTS = 64
CHECK_ROWS = 4
TARGET_RATIO = 2.0

TRL_VERSION = "1.12.0"
TRL_DIR = common.CACHE_DIR / f"trl-{TRL_VERSION}"
# (distribution requirement, import name): what TRL 1.12's experimental PPO imports beyond the venv.
TRL_DEPS = [("datasets>=4.7.0", "datasets"), ("pandas", "pandas"), ("pyarrow>=24", "pyarrow"),
            ("dill>=0.3.0,<0.4.2", "dill"), ("xxhash", "xxhash"), ("multiprocess<0.70.20", "multiprocess"),
            ("six", "six")]
SCRIPTS = common.REPO_ROOT / "examples" / "nlp" / "gpt"


# ------------------------------------------------------------------------------ fixed inputs



def value_model_dir() -> Path:
    """The critic / reward model: the fixed Llama trunk + a seeded scalar head, as an HF
    `LlamaForSequenceClassification` directory (with the tokenizer), built once."""
    out = common.CACHE_DIR / "llama-v1-value"
    if (out / "model.safetensors").is_file():
        return out
    from transformers import LlamaForSequenceClassification

    source = common.fixed_model_dir()
    model = LlamaForSequenceClassification.from_pretrained(str(source), num_labels=1, dtype=torch.float32)
    generator = torch.Generator().manual_seed(common.SEED + 1)
    with torch.no_grad():
        model.score.weight.copy_(torch.randn(model.score.weight.shape, generator=generator) * 0.02)
    model.config.pad_token_id = common.hf_tokenizer().pad_token_id
    tmp = common.CACHE_DIR / f"llama-v1-value.tmp-{os.getpid()}"
    model.save_pretrained(str(tmp), safe_serialization=True)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (source / name).is_file():
            shutil.copy(source / name, tmp / name)
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)
    return out


def _clean(ids, tokenizer) -> bool:
    return not {tokenizer.pad_token_id, tokenizer.eos_token_id, tokenizer.bos_token_id} & set(ids)


def prompt_records(tokenizer) -> list[dict]:
    """N_PROMPTS prompts of exactly PROMPT_LEN tokens whose text re-encodes to the same ids
    (aligner reads text from JSONL, TRL gets the ids: both must see the same tokens)."""
    windows = common.token_windows(8 * N_PROMPTS, PROMPT_LEN + 8, seed=400)
    out = []
    for window in windows.tolist():
        ids = tokenizer(tokenizer.decode(window), add_special_tokens=False)["input_ids"][:PROMPT_LEN]
        text = tokenizer.decode(ids)
        if (len(ids) == PROMPT_LEN and _clean(ids, tokenizer)
                and tokenizer(text, add_special_tokens=False)["input_ids"] == ids):
            out.append({"prompt": text, "input_ids": ids})
        if len(out) == N_PROMPTS:
            return out
    raise RuntimeError("not enough round-tripping prompts")


def check_tokens(tokenizer, prompts) -> torch.Tensor:
    """[CHECK_ROWS, 64]: fixed prompts + fixed responses both sides score before timing."""
    responses = [w for w in common.token_windows(8 * CHECK_ROWS, RESPONSE_LEN, seed=401).tolist()
                 if _clean(w, tokenizer)][:CHECK_ROWS]
    return torch.tensor([p["input_ids"] + r for p, r in zip(prompts, responses)])


# ------------------------------------------------------------------------- child protocol


def _tensor_list(t: torch.Tensor) -> list:
    return t.detach().float().cpu().tolist()


# ------------------------------------------------------------------------------ aligner child


def aligner_overrides(dtype_name: str, port: int, log_dir: Path, prompts_path: Path, total_steps: int) -> list[str]:
    model = common.fixed_model_dir()
    return [
        f"pretrained_checkpoint.restore_from_path={model}", f"model.tokenizer.model={model}",
        f"exp_manager.explicit_log_dir={log_dir}", "exp_manager.resume_if_exists=false",
        "exp_manager.create_tensorboard_logger=false", f"remote_critic_rm.critic.port={port}",
        f"trainer.precision={dtype_name}", f"trainer.ppo.max_steps={total_steps}",
        "trainer.ppo.val_check_interval=0", "trainer.ppo.save_interval=0", "trainer.ppo.gradient_clip_val=0.0",
        f"trainer.ppo.initial_policy_kl_penalty={KL_COEF}", "trainer.ppo.use_absolute_kl=false",
        f"trainer.ppo.discount_factor={GAMMA}", f"trainer.ppo.gae_lambda={LAM}",
        "trainer.ppo.normalize_advantages=true", "trainer.ppo.critic_warmup_steps=0",
        f"trainer.ppo.ppo_epochs={PPO_EPOCHS}", "trainer.ppo.wait_for_critic_each_step=true",
        f"model.seed={common.SEED}", f"model.micro_batch_size={MINI_BATCH}", f"model.global_batch_size={MINI_BATCH}",
        f"model.encoder_seq_length={PROMPT_LEN + RESPONSE_LEN}",
        "model.optim.name=fused_adam", f"model.optim.lr={LR}", "model.optim.weight_decay=0.0",
        f"model.optim.betas=[{BETAS[0]},{BETAS[1]}]", f"model.optim.eps={EPS}", "model.optim.sched.name=Constant",
        "model.optim.sched.warmup_steps=0", f"model.optim.sched.min_lr={LR}",
        f"model.ppo.rollout_micro_batch_size={EPISODES}", f"model.ppo.num_rollout_samples={EPISODES}",
        f"model.ppo.forward_micro_batch_size={EPISODES}", "model.ppo.offload_adam_states=false",
        "model.ppo.entropy_bonus=0.0", f"model.ppo.ratio_eps={RATIO_CLIP}",
        "model.ppo.use_is_end_mask=false",  # forced full length: no response ends with EOS
        "model.ppo.sampling_params.use_greedy=false", "model.ppo.sampling_params.temperature=1.0",
        "model.ppo.sampling_params.top_k=0", "model.ppo.sampling_params.top_p=1.0",
        f"model.ppo.length_params.max_length={RESPONSE_LEN}", f"model.ppo.length_params.min_length={RESPONSE_LEN}",
        f"model.data.train_ds.file_path={prompts_path}", "model.data.validation_ds.file_path=null",
    ]


def critic_overrides(dtype_name: str, port: int, log_dir: Path, total_steps: int) -> list[str]:
    return [
        f"pretrained_checkpoint.restore_from_path={value_model_dir()}", f"exp_manager.explicit_log_dir={log_dir}",
        "exp_manager.resume_if_exists=false", "exp_manager.create_tensorboard_logger=false",
        f"trainer.precision={dtype_name}", f"trainer.ppo.port={port}", "trainer.ppo.combine_rm_and_critic_server=true",
        f"trainer.ppo.inference_micro_batch_size={EPISODES}", "trainer.ppo.critic_epochs=1",
        f"trainer.ppo.critic_mini_batches={MINI_BATCHES}", f"trainer.ppo.max_steps={total_steps}",
        "trainer.ppo.gradient_clip_val=0.0", f"model.micro_batch_size={MINI_BATCH}",
        f"model.loss_clip_val={VALUE_CLIP}", "model.optim.name=fused_adam", f"model.optim.lr={LR}",
        "model.optim.weight_decay=0.0", f"model.optim.betas=[{BETAS[0]},{BETAS[1]}]", f"model.optim.eps={EPS}",
        "model.optim.sched.name=Constant", "model.optim.sched.warmup_steps=0", f"model.optim.sched.min_lr={LR}",
        "model.reward_standardization.enable=false",  # TRL uses the raw RM score
    ]


def aligner_child(args, channel: Channel) -> None:
    import logging

    from hydra import compose, initialize_config_dir

    from aligner.trainers import ppo_actor
    from aligner.training.entry import CONF_DIR

    common.quiet_libraries()
    logging.getLogger("megatron").setLevel(logging.WARNING)
    spec = json.loads(Path(args.spec).read_text())
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
        cfg = compose("gpt_ppo_actor", overrides=spec["overrides"])
    driver = BlockDriver(channel)
    tokens = torch.tensor(spec["check_tokens"])

    # The library's engine, driven through its step() seam: a sanity check and a wait before the
    # first step, and a step-boundary report after each.
    engine = ppo_actor.build_engine(cfg, CONF_DIR / "gpt_ppo_actor.yaml")
    run = engine.run
    try:
        engine.algorithm.resumed(engine)
        channel.send(event="ready", sanity=aligner_sanity(engine, tokens), threads=torch.get_num_threads())
        driver.wait()
        while run.step < run.max_steps:
            metrics = engine.step()
            run.metrics.log(run.step, metrics)
            driver.step_done({k: float(v) for k, v in metrics.items()
                              if k.startswith(("timing/", "throughput/", "train/updates"))})
    finally:
        engine.algorithm.close()
        run.finish()
    channel.send(event="exit")


@torch.no_grad()
def aligner_sanity(engine, tokens: torch.Tensor) -> dict:
    from aligner.objectives.masks import response_mask
    from aligner.rollout.batch import Rollouts

    n, width = tokens.shape
    lengths = torch.full((n,), width)
    prompt_lengths = torch.full((n,), PROMPT_LEN)
    rollouts = Rollouts(tokens=tokens, lengths=lengths, prompt_lengths=prompt_lengths,
                        is_end=torch.zeros(n, dtype=torch.bool), mask=response_mask(prompt_lengths, lengths, width),
                        generator_logprobs=torch.zeros(n, width), group=torch.arange(n), prompt_index=torch.arange(n))
    response = slice(PROMPT_LEN - 1, width - 1)  # positions predicting the response tokens
    logprobs = engine.logprobs(rollouts)[:, response]
    with engine.reference.swapped_in(engine.run.model):
        ref_logprobs = engine.logprobs(rollouts)[:, response]
    scored = engine.algorithm.critic.infer(tokens, lengths)
    return {"logprobs": _tensor_list(logprobs), "ref_logprobs": _tensor_list(ref_logprobs),
            "values": _tensor_list(scored["values"][:, response]), "rewards": _tensor_list(scored["rewards"]),
            "prompt_ids": [engine.prompts[i]["prompt_tokens"].tolist() for i in range(len(engine.prompts))]}


# ---------------------------------------------------------------------------------- TRL child


def trl_child(args, channel: Channel) -> None:
    sys.path.insert(0, str(TRL_DIR))
    os.environ["TRL_EXPERIMENTAL_SILENCE"] = "1"
    import trl

    if trl.__version__ != TRL_VERSION:
        raise SystemExit(f"expected trl {TRL_VERSION} from {TRL_DIR}, got {trl.__version__} from {trl.__file__}")
    common.quiet_libraries()
    torch.set_num_threads(args.trl_threads)
    from transformers import LlamaForSequenceClassification, TrainerCallback
    from transformers.trainer_callback import PrinterCallback
    from trl.experimental.ppo import PPOConfig, PPOTrainer

    spec = json.loads(Path(args.spec).read_text())
    dtype = common.DTYPES[spec["dtype"]]
    # bf16: the models are cast (TRL's PPO calls `generate` and the reference / reward model
    # outside accelerate's autocast, so `bf16=True` alone would leave most of it in fp32).
    policy, reference = common.load_hf_model(dtype), common.load_hf_model(dtype)
    value, reward = (LlamaForSequenceClassification.from_pretrained(str(value_model_dir()), dtype=dtype,
                                                                    attn_implementation="sdpa") for _ in range(2))
    tokenizer = common.hf_tokenizer()
    config = PPOConfig(
        output_dir=spec["out_dir"], use_cpu=True, seed=common.SEED, report_to="none", disable_tqdm=True,
        per_device_train_batch_size=EPISODES, gradient_accumulation_steps=1, num_mini_batches=MINI_BATCHES,
        num_ppo_epochs=PPO_EPOCHS, total_episodes=EPISODES * spec["total_steps"],
        local_rollout_forward_batch_size=EPISODES, response_length=RESPONSE_LEN, temperature=1.0,
        stop_token=None, stop_token_id=None, missing_eos_penalty=None, learning_rate=LR,
        lr_scheduler_type="constant", weight_decay=0.0, adam_beta1=BETAS[0], adam_beta2=BETAS[1],
        adam_epsilon=EPS, kl_coef=KL_COEF, kl_estimator="k1", cliprange=RATIO_CLIP, cliprange_value=VALUE_CLIP,
        vf_coef=VF_COEF, gamma=GAMMA, lam=LAM, whiten_rewards=False, num_sample_generations=0,
        gradient_checkpointing=False, eval_strategy="no", save_strategy="no", logging_strategy="no",
        dataloader_num_workers=0, bf16=False, fp16=False,
    )
    # A plain list of tokenized rows (what PPOTrainer's DataLoader + DataCollatorWithPadding read);
    # `datasets.Dataset.from_list` fails here in datasets 5.2 + pyarrow 26 (dill cannot pickle
    # pyarrow's MonthDayNano while fingerprinting), and the container does not change a step.
    dataset = [{"input_ids": p["input_ids"]} for p in spec["prompts"]]
    driver = BlockDriver(channel)
    sanity = trl_sanity(policy, reference, value, reward, torch.tensor(spec["check_tokens"]), tokenizer.pad_token_id)

    class Hook(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            channel.send(event="ready", sanity=sanity, threads=torch.get_num_threads())
            driver.wait()

        def on_step_end(self, args, state, control, **kwargs):
            driver.step_done()

    trainer = PPOTrainer(args=config, processing_class=tokenizer, model=policy, ref_model=reference,
                         reward_model=reward, train_dataset=dataset, eval_dataset=dataset, value_model=value,
                         callbacks=[Hook()])
    trainer.remove_callback(PrinterCallback)
    trainer.train()
    channel.send(event="exit")


@torch.no_grad()
def trl_sanity(policy, reference, value, reward, tokens: torch.Tensor, pad_id: int) -> dict:
    """TRL's own scoring functions on the check sequences (what its train() computes per rollout)."""
    from trl.experimental.ppo.ppo_trainer import forward
    from trl.experimental.utils import get_reward
    from trl.trainer.utils import selective_log_softmax

    response = tokens[:, PROMPT_LEN:]

    def logprobs(model):
        logits = forward(model, tokens, pad_id).logits[:, PROMPT_LEN - 1:-1].float() / (1.0 + 1e-7)
        return selective_log_softmax(logits, response)

    full_value, _, _ = get_reward(value, tokens, pad_id, PROMPT_LEN)
    _, score, _ = get_reward(reward, tokens, pad_id, PROMPT_LEN)
    return {"logprobs": _tensor_list(logprobs(policy)), "ref_logprobs": _tensor_list(logprobs(reference)),
            "values": _tensor_list(full_value[:, PROMPT_LEN - 1:-1].squeeze(-1)), "rewards": _tensor_list(score)}


# -------------------------------------------------------------------------------- orchestrator


def child_env(threads: int) -> dict:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("RANK", "WORLD_SIZE", "LOCAL_", "MASTER_", "OMPI_", "SLURM_", "PMI_"))}
    env.update(OMP_NUM_THREADS=str(threads), ALIGNER_NUM_THREADS=str(threads), PYTHONPATH=str(common.REPO_ROOT),
               PYTHONWARNINGS="ignore", TOKENIZERS_PARALLELISM="false", TRL_EXPERIMENTAL_SILENCE="1")
    return env


def start_critic(dtype_name: str, port: int, work: Path, total_steps: int, threads: int):
    from aligner.serving.client import CriticClient

    log_path = work / "critic.log"
    proc = subprocess.Popen([sys.executable, str(SCRIPTS / "serve_ppo_critic.py"),
                             *critic_overrides(dtype_name, port, work / "critic", total_steps)],
                            stdout=open(log_path, "w"), stderr=subprocess.STDOUT, env=child_env(threads),
                            cwd=str(common.REPO_ROOT))
    client = CriticClient("127.0.0.1", port, total_timeout_s=300)
    try:
        client.wait_until_ready(300)
    except Exception:
        proc.kill()
        raise SystemExit(f"the critic server did not become ready:\n{log_path.read_text()[-5000:]}")
    finally:
        client.close()
    return proc, log_path


def stop_process(proc) -> int | None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            return proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
    return proc.wait()


def compare_sanity(ours: dict, theirs: dict, prompts: list[dict], dtype_name: str) -> dict:
    """Largest |difference| per quantity; both sides must compute the same function."""
    out = {}
    for key in ("logprobs", "ref_logprobs", "values", "rewards"):
        a, b = torch.tensor(ours[key]), torch.tensor(theirs[key])
        out[key] = {"max_abs_diff": float((a - b).abs().max()), "aligner_mean": float(a.mean()),
                    "trl_mean": float(b.mean())}
    out["prompt_ids_equal"] = ours["prompt_ids"] == [p["input_ids"] for p in prompts]
    tolerance = {"fp32": 2e-3, "bf16": 0.25}[dtype_name]
    out["tolerance"] = tolerance
    out["passed"] = out["prompt_ids_equal"] and all(out[k]["max_abs_diff"] <= tolerance
                                                    for k in ("logprobs", "ref_logprobs", "values", "rewards"))
    return out


def breakdown(details: list[dict]) -> dict:
    """Mean seconds per step of each of aligner's timing/* sections (profile_costs.py style)."""
    keys = sorted({k for d in details for k in d if k.startswith("timing/")})
    table = {k[len("timing/"):-2]: statistics.fmean(d.get(k, 0.0) for d in details) for k in keys}
    step = table.get("step", float("nan"))
    table["other (advantages, metrics, HTTP send of critic train, refit)"] = step - sum(
        v for k, v in table.items() if k != "step")
    return table


def run_dtype(dtype_name: str, args) -> dict:
    from aligner.distributed.launch_env import free_port

    dtype_label = dtype_name
    block = args.steps
    total_steps = (args.warmup + args.reps) * block
    tokenizer = common.hf_tokenizer()
    prompts = prompt_records(tokenizer)
    tokens = check_tokens(tokenizer, prompts)
    value_model_dir()
    work = Path(tempfile.mkdtemp(prefix=f"bench_ppo_{dtype_name}_"))
    prompts_path = work / "prompts.jsonl"
    prompts_path.write_text("".join(json.dumps({"prompt": p["prompt"]}) + "\n" for p in prompts))
    port = free_port()
    spec = {"dtype": dtype_name, "total_steps": total_steps, "prompts": prompts, "check_tokens": tokens.tolist(),
            "out_dir": str(work / "trl"),
            "overrides": aligner_overrides(dtype_name, port, work / "actor", prompts_path, total_steps)}
    spec_path = work / "spec.json"
    spec_path.write_text(json.dumps(spec))

    print(f"[{dtype_label}] starting the critic server ({args.critic_threads} threads), the aligner actor "
          f"({args.actor_threads} threads) and TRL {TRL_VERSION} ({args.trl_threads} threads); logs in {work}",
          flush=True)
    critic, critic_log = start_critic(dtype_name, port, work, total_steps, args.critic_threads)
    children = {}
    try:
        children["aligner"] = Child(Path(__file__), "aligner", spec_path,
                                   work / "aligner.log", child_env(args.actor_threads))
        children["trl"] = Child(Path(__file__), "trl", spec_path, work / "trl.log", child_env(args.trl_threads),
                                ["--trl-threads", str(args.trl_threads)])
        ready = {name: child.expect("ready") for name, child in children.items()}
        sanity = compare_sanity(ready["aligner"]["sanity"], ready["trl"]["sanity"], prompts, dtype_name)
        print(f"[{dtype_label}] same function: " + ", ".join(
            f"{k} max|diff| {sanity[k]['max_abs_diff']:.2e} (mean {sanity[k]['aligner_mean']:.4f} vs "
            f"{sanity[k]['trl_mean']:.4f})" for k in ("logprobs", "ref_logprobs", "values", "rewards"))
              + f"; prompt ids equal: {sanity['prompt_ids_equal']}", flush=True)
        if not sanity["passed"] and not args.allow_mismatch:
            raise SystemExit(f"the two sides do not compute the same function (tolerance {sanity['tolerance']}); "
                             "rerun with --allow-mismatch to time anyway")

        names = {"aligner": "aligner (actor + critic server)", "trl": f"TRL {TRL_VERSION} PPOTrainer"}
        episodes = {n: [] for n in names.values()}
        blocks = {n: [] for n in names}
        peaks, loads = [], []
        for _ in range(args.warmup):
            for child in children.values():
                child.run_block(block)
        order = list(children)
        print(f"[{dtype_label}] {args.reps} rounds x {block} PPO updates of {EPISODES} episodes (episodes/s)",
              flush=True)
        for rep in range(args.reps):
            loads.append(common.wait_for_quiet(args.quiet_load, args.max_wait))
            rotated = order[rep % 2:] + order[:rep % 2]
            for name in rotated:
                result = children[name].run_block(block)
                blocks[name].append(result)
                episodes[names[name]].append(EPISODES * block / result["seconds"])
            peaks.append(common.matmul_flops(common.DTYPES[dtype_name]))
            print(f"  rep {rep + 1}/{args.reps} (load {loads[-1]:.1f}): " + ", ".join(
                f"{n}={v[-1]:.2f}" for n, v in episodes.items()) + f", matmul={peaks[-1] / 1e9:,.0f} GFLOP/s",
                  flush=True)
        for child in children.values():
            child.finish()
    finally:
        for child in children.values():
            child.kill()
        stop_process(critic)

    stats = {n: common.summarize(v) for n, v in episodes.items()}
    ours, peer = names["aligner"], names["trl"]
    ratios = common.ratios(stats, [ours], [peer])
    # Fastest single update of each side (every update is timed inside its block): on a machine
    # this noisy, the least-disturbed update is the steadiest estimate (reported, not the target).
    fastest = {names[n]: min(t for b in v for t in b["step_seconds"]) for n, v in blocks.items()}
    ratios["fastest_update"] = {f"{ours} / {peer}": fastest[peer] / fastest[ours]}
    targets = [common.target(f"{ours} / {peer} (median episodes/s)", ratios["median"][f"{ours} / {peer}"],
                             TARGET_RATIO)]
    details = [d for b in blocks["aligner"] for d in b["details"]]
    costs = breakdown(details)
    for n, s in stats.items():
        print(f"  {n:40s} median {s['median']:7.2f} episodes/s  min {s['min']:7.2f}  max {s['max']:7.2f}  "
              f"spread {s['spread']:5.1%}")
    common.print_ratios(ratios)
    print(f"  fastest single update: " + ", ".join(f"{n} {v:.3f} s" for n, v in fastest.items())
          + f" -> ratio {ratios['fastest_update'][f'{ours} / {peer}']:.2f}x")
    for t in targets:
        print(f"  target {t['name']} >= {t['threshold']}: {t['value']:.3f} -> {'met' if t['met'] else 'MISSED'}")
    print("  aligner step, mean seconds per section: " + ", ".join(f"{k} {v:.3f}" for k, v in costs.items()))
    payload = {
        "dtype": dtype_name,
        "workload": {"episodes_per_update": EPISODES, "prompt_len": PROMPT_LEN, "response_len": RESPONSE_LEN,
                     "forced_full_length": True, "mini_batches": MINI_BATCHES, "mini_batch_size": MINI_BATCH,
                     "ppo_epochs": PPO_EPOCHS, "temperature": 1.0, "top_k": 0, "top_p": 1.0,
                     "optimizer": {"lr": LR, "betas": BETAS, "eps": EPS, "weight_decay": 0.0, "clip_grad": None,
                                   "schedule": "constant"},
                     "kl_coef": KL_COEF, "kl_estimator": "k1", "gamma": GAMMA, "lam": LAM, "ratio_clip": RATIO_CLIP,
                     "value_clip": VALUE_CLIP, "trl_vf_coef": VF_COEF, "updates_per_block": block, "reps": args.reps,
                     "warmup_updates": args.warmup * block,
                     "value_model": str(value_model_dir().relative_to(common.REPO_ROOT))},
        "processes": {
            "aligner": f"actor (aligner.trainers.ppo_actor.train) {args.actor_threads} torch threads + critic "
                       f"server (serve_ppo_critic.py, critic+rm combined, HTTP on 127.0.0.1) {args.critic_threads} "
                       "torch threads, separate processes; the actor waits for the critic's train each step",
            "trl": f"PPOTrainer.train() in one process, {args.trl_threads} torch threads; models cast to "
                   f"{dtype_name}",
            "orchestrator": "idle while a block runs (blocks on a pipe)",
        },
        "thread_counts": {"aligner_actor": ready["aligner"]["threads"], "aligner_critic": args.critic_threads,
                          "trl": ready["trl"]["threads"]},
        "trl_version": TRL_VERSION, "trl_path": str(TRL_DIR.relative_to(common.REPO_ROOT)),
        "sanity": sanity,
        "matmul_flops": common.summarize(peaks),
        "load_average_1m_per_rep": loads,
        "episodes_per_s": stats,
        "fastest_update_s": fastest,
        "block_step_seconds": {n: [b["step_seconds"] for b in v] for n, v in blocks.items()},
        "aligner_step_breakdown_s": costs,
        "aligner_step_timings": details,
        "ratios": ratios,
        "targets": targets,
    }
    path = common.write_result(f"ppo_{dtype_name}", payload)
    print(f"  wrote {path}")
    shutil.rmtree(work, ignore_errors=True)
    return payload


def main(argv=None):
    parser = common.base_arguments(__doc__.splitlines()[0], reps=5)
    parser.set_defaults(dtype="fp32")
    parser.add_argument("--steps", type=int, default=2, help="PPO updates per timed block")
    parser.add_argument("--actor-threads", type=int, default=2, help="torch threads of aligner's actor process")
    parser.add_argument("--critic-threads", type=int, default=2, help="torch threads of aligner's critic server")
    parser.add_argument("--trl-threads", type=int, default=common.THREADS, help="torch threads of TRL's process")
    parser.add_argument("--allow-mismatch", action="store_true", help="time even if the sanity check fails")
    parser.add_argument("--child", choices=["aligner", "trl"], help=argparse.SUPPRESS)
    parser.add_argument("--spec", help=argparse.SUPPRESS)
    parser.add_argument("--fds", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        read_fd, write_fd = (int(x) for x in args.fds.split(","))
        channel = Channel(read_fd, write_fd)
        (aligner_child if args.child == "aligner" else trl_child)(args, channel)
        return
    if args.reps < 3:
        parser.error("--reps must be >= 3")
    # SIGTERM -> SystemExit, so `finally` stops the critic server and the children.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    common.quiet_libraries()
    common.set_threads()
    common.fixed_model_dir()
    install_trl(TRL_VERSION, TRL_DEPS)
    for dtype_name in common.dtypes_of(args.dtype):
        run_dtype(dtype_name, args)


if __name__ == "__main__":
    main()
