"""Supervised fine-tuning: maximise log pi(completion | prompt), loss on completion tokens only.

The simplest method file, and the skeleton the others copy (Args, the method's maths as pure
functions, then main(): load, evaluate, train, evaluate, save, summarise).

Objective: L = -(1 / N) * sum over completion tokens y_t of log pi_theta(y_t | x, y_<t), where N is
the number of completion tokens in the whole optimizer step (all micro-batches, all processes),
so gradient accumulation and the process count do not change the loss.

Run:
  python sft.py                                        # tiny world, CPU, about a minute
  python sft.py --model Qwen/Qwen2.5-0.5B --data sft.jsonl --eval-data test.jsonl --ood-data ood.jsonl
  python sft.py --gpus 8 ...                           # or: torchrun --nproc-per-node 8 sft.py ...

Implementation details:
  1. Data: JSONL with `prompt` (string, or chat messages for the tokenizer's chat template) and
     `completion`; an EOS token is appended to each completion and trained on.
  2. Token-mean over the optimizer step (see the objective), AdamW, linear warm-up then constant.
     TRL's SFTTrainer divides by the step's completion tokens too: no normalisation differs.
  3. A `--model` folder holding only config.json and a tokenizer starts from random weights:
     this is how world/build.py trains the tiny world's models with this same file.
"""

import time
from dataclasses import dataclass
from typing import Literal

import torch

from common import (Logger, WORLD, add_lora, all_sum, batches, check_divisible, check_finite, clip_grad,
                    evaluate_splits, fit_context, init_distributed, load_model, load_tokenizer, logprobs,
                    micro_batches, pad_batch, parse_args, peak_mem_gb, prompt_ids, rank_slice, read_jsonl,
                    response_ids, run, save_checkpoint, seed_everything, shard_model, warmup_schedule)
from state import Checkpointer


@dataclass
class Args:
    model: str = str(WORLD / "student")
    """causal LM to train: a local folder or a Hugging Face hub id"""
    data: str = str(WORLD / "sft.jsonl")
    """training JSONL, one {"prompt", "completion"} per line"""
    eval_data: str = str(WORLD / "test_id.jsonl")
    """in-distribution test JSONL, one {"prompt", "answer"} per line (greedy accuracy)"""
    ood_data: str = str(WORLD / "test_ood.jsonl")
    """out-of-distribution test JSONL, same format"""
    out: str = "runs/sft"
    """run folder: metrics.jsonl, summary.json and the checkpoint model/"""
    steps: int = 150
    """optimizer steps"""
    batch_size: int = 64
    """sequences per optimizer step, over all processes"""
    micro_batch_size: int = 64
    """sequences per forward/backward on one process (gradient accumulation fills the rest)"""
    lr: float = 1e-3
    """peak learning rate of AdamW"""
    warmup_steps: int = 10
    """linear learning-rate warm-up"""
    weight_decay: float = 0.0
    """AdamW weight decay"""
    max_grad_norm: float = 1.0
    """clip the global gradient norm to this"""
    max_new_tokens: int = 48
    """longest response generated at evaluation"""
    max_prompt_length: int = 0
    """longest prompt kept from --data, in tokens (0: any that leaves --max-new-tokens in the model's context)"""
    seed: int = 1
    """seed of data order and initialisation"""
    gpus: int = 1
    """processes to launch (one per GPU; CPU processes with gloo when there is no GPU)"""
    gradient_checkpointing: bool = False
    """recompute decoder-layer activations in the backward pass to save memory"""
    lora_rank: int = 0
    """train LoRA adapters of this rank (PEFT) instead of every weight; 0: full fine-tuning (README: LoRA)"""
    lora_alpha: float = 16.0
    """LoRA's scale: the adapters' update B A is multiplied by lora_alpha / lora_rank"""
    lora_targets: str = ""
    """comma-separated names of the modules LoRA adapts (e.g. q_proj,v_proj); empty: every linear layer of the
    decoder layers"""
    save_every: int = 0
    """also write the model and the full training state (for --resume) every this many steps
    (0: the model at the end only)"""
    eval_every: int = 0
    """also score greedy ID and OOD accuracy every this many steps, into metrics.jsonl (0: only before and after)"""
    report_to: Literal["none", "wandb", "trackio", "tensorboard"] = "none"
    """also send the metrics, the arguments and the evaluation responses to this tracker, from rank 0
    (README: tracking)"""
    resume: bool = False
    """continue from the last training state in --out, to the weights of an uninterrupted run
    (README: long runs)"""


# ----------------------------------------------------------------------------- the method

def sft_loss(logp, mask, n_tokens=None):
    """Negative log-likelihood summed over the completion tokens / n_tokens (default: their count
    here, the token mean; the loop passes the optimizer step's count). logp, mask: (B, R)."""
    return -(logp * mask).sum() / (mask.sum() if n_tokens is None else n_tokens)


# ----------------------------------------------------------------------------- training

def main():
    args = parse_args(Args)
    d = init_distributed(args.gpus)
    args.micro_batch_size = check_divisible(args.batch_size, args.micro_batch_size, d)
    seed_everything(args.seed)
    tokenizer = load_tokenizer(args.model)
    rows = fit_context(read_jsonl(args.data, ("prompt", "completion")), tokenizer, args, cut=("completion",))
    model = shard_model(add_lora(load_model(args.model, d), args), d, args.gradient_checkpointing)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    scheduler = warmup_schedule(optimizer, args.warmup_steps)
    ckpt = Checkpointer(args, d, tokenizer, model, optimizer, scheduler)
    log = Logger(args, d, ckpt)
    log.banner(args.batch_size, args.micro_batch_size, "sequences")

    before = ckpt.remember("before", lambda: evaluate_splits(model, tokenizer, args, d))
    log.evaluation("before training", before)

    plan = batches(len(rows), args.batch_size, args.steps, args.seed)
    start_step, start, evals = ckpt.resume(log), time.time(), None
    for step, indices in enumerate(plan[start_step:], start_step + 1):
        mine = [rows[i] for i in rank_slice(indices, d)]
        prompts = [prompt_ids(tokenizer, r["prompt"]) for r in mine]
        completions = [response_ids(tokenizer, r["completion"]) for r in mine]
        # per-process share of the step's token count: the gradient all-reduce averages over processes
        n_tokens = all_sum(sum(map(len, completions)), d).item() / d.world
        loss_sum = 0.0
        for mb in micro_batches(list(range(len(mine))), args.micro_batch_size):
            batch = pad_batch([prompts[i] for i in mb], [completions[i] for i in mb],
                              tokenizer.pad_token_id, d.device)
            loss = sft_loss(logprobs(model, batch), batch["response_mask"], n_tokens)
            loss.backward()
            loss_sum += loss.item()
        loss = all_sum(loss_sum, d).item() / d.world
        check_finite(loss, step, args.out)
        grad_norm = clip_grad(model, args.max_grad_norm)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        evals = None
        if args.eval_every and step % args.eval_every == 0:  # greedy ID and OOD accuracy, each process its share
            evals = evaluate_splits(model, tokenizer, args, d)
        log.log(step, {"train/loss": loss, "train/grad_norm": grad_norm,
                       "train/lr": scheduler.get_last_lr()[0], "sys/peak_mem_gb": peak_mem_gb(d.device)}, evals)
        stop = ckpt.sigterm()  # a SIGTERM reached any process: save the state, then exit
        if stop or args.save_every and step % args.save_every == 0:
            ckpt.save(step)
        if stop:
            ckpt.exit(step)
    seconds = time.time() - start

    after = evals or evaluate_splits(model, tokenizer, args, d)  # the last step's, if it was evaluated
    save_checkpoint(model, tokenizer, f"{args.out}/model", d)
    log.summary(method="sft", steps=args.steps, seconds=round(seconds, 1), before=before, after=after,
                peak_mem_gb=round(peak_mem_gb(d.device), 3))


if __name__ == "__main__":
    run(main)
