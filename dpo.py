"""Direct Preference Optimization (Rafailov et al. 2023, arXiv 2305.18290).

Objective (the paper's Eq. 7): for a prompt x with a chosen response y_w and a rejected one y_l,
  L = -log sigmoid( beta * [log pi(y_w|x) - log pi_ref(y_w|x)] - beta * [log pi(y_l|x) - log pi_ref(y_l|x)] )
with log pi(y|x) the SUM of the response tokens' log-probs; mean over the pairs of the batch.
beta * (log pi - log pi_ref) is the implicit reward (Eq. 5); training raises it for chosen responses.

Run:
  python dpo.py                                         # tiny world, CPU, under 2 minutes
  python dpo.py --model Qwen/Qwen2.5-0.5B-Instruct --data prefs.jsonl --eval-data test.jsonl --ood-data ood.jsonl
  python dpo.py --gpus 8 ...                            # or: torchrun --nproc-per-node 8 dpo.py ...

Implementation details:
  1. Data: JSONL with `prompt`, `chosen`, `rejected` (TRL's names); EOS is appended to both
     responses and counts in their log-prob. The tiny world's pairs were sampled from the base
     student: chosen is a right worked solution, rejected a wrong one (world/build.py).
  2. One forward over 2B rows per micro-batch: the chosen rows, then the rejected rows, with the
     prompt repeated (`concatenated_logps`).
  3. The reference is the initial policy. Its log-probs for every pair this run will use are
     computed by the policy itself before the first update, so no second model is ever loaded.
  4. Mean over the pairs of the global batch, whatever the micro-batch size and process count. The
     authors' code also sums each response's log-probs and averages over pairs: no normalisation differs.
  5. Logged: reward accuracy (r_w > r_l), margin r_w - r_l, and the mean chosen and rejected rewards.
  6. Deviation: the default beta is 1.0, not the usual 0.1, tuned on the first tiny world (answers
     of 2-4 tokens), where beta 0.1 let both implicit rewards fall while their margin grew and
     greedy accuracy dropped; kept, with lr 3e-5, on the world of worked solutions.
     Pass --beta 0.1 on real models, as in the paper.
"""

import time
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F

from common import (Logger, WORLD, add_lora, all_sum, batches, check_divisible, check_finite, clip_grad,
                    evaluate_splits, fit_context, init_distributed, load_model, load_tokenizer, logprobs,
                    micro_batches, pad_batch, parse_args, peak_mem_gb, prompt_ids, rank_slice, read_jsonl,
                    response_ids, run, save_checkpoint, seed_everything, shard_model, warmup_schedule)
from state import Checkpointer


@dataclass
class Args:
    # the allowed values of this file's numeric flags (common.RANGES: those every script shares)
    ranges = {"beta": "> 0"}
    model: str = str(WORLD / "student")
    """causal LM to train (and the reference): a local folder or a Hugging Face hub id"""
    data: str = str(WORLD / "prefs.jsonl")
    """training JSONL, one {"prompt", "chosen", "rejected"} per line"""
    eval_data: str = str(WORLD / "test_id.jsonl")
    """in-distribution test JSONL, one {"prompt", "answer"} per line (greedy accuracy)"""
    ood_data: str = str(WORLD / "test_ood.jsonl")
    """out-of-distribution test JSONL, same format"""
    out: str = "runs/dpo"
    """run folder: metrics.jsonl, summary.json and the checkpoint model/"""
    steps: int = 150
    """optimizer steps"""
    batch_size: int = 64
    """preference pairs per optimizer step, over all processes"""
    micro_batch_size: int = 64
    """pairs per forward/backward on one process (each is two sequences)"""
    beta: float = 1.0
    """DPO beta: the weight of the implicit reward; larger keeps the policy closer to the reference"""
    lr: float = 3e-5
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
    """seed of data order"""
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

def dpo_loss(chosen_logp, rejected_logp, ref_chosen_logp, ref_rejected_logp, beta):
    """Eq. 7 per pair. Inputs: sequence log-probs (the sum over a response's tokens), (B,). Returns
    (losses, chosen_rewards, rejected_rewards), each (B,), one per pair, not reduced (the loop sums
    them / the step's pair count); the rewards (Eq. 5) are detached, for logging."""
    chosen_rewards = beta * (chosen_logp - ref_chosen_logp)        # (B,)
    rejected_rewards = beta * (rejected_logp - ref_rejected_logp)  # (B,)
    losses = -F.logsigmoid(chosen_rewards - rejected_rewards)               # (B,)
    return losses, chosen_rewards.detach(), rejected_rewards.detach()


def encode_pairs(tokenizer, rows, device):
    """Preference rows -> one padded batch of 2B sequences: [prompt | chosen] rows, then [prompt | rejected]."""
    prompts = [prompt_ids(tokenizer, r["prompt"]) for r in rows]
    responses = ([response_ids(tokenizer, r["chosen"]) for r in rows]
                 + [response_ids(tokenizer, r["rejected"]) for r in rows])
    return pad_batch(prompts + prompts, responses, tokenizer.pad_token_id, device)


def concatenated_logps(model, batch):
    """One forward over the 2B rows -> (chosen, rejected) sequence log-probs, each (B,)."""
    return logprobs(model, batch).sum(-1).chunk(2)


# ----------------------------------------------------------------------------- training

def main():
    args = parse_args(Args)
    d = init_distributed(args.gpus)
    args.micro_batch_size = check_divisible(args.batch_size, args.micro_batch_size, d)
    seed_everything(args.seed)
    tokenizer = load_tokenizer(args.model)
    rows = fit_context(read_jsonl(args.data, ("prompt", "chosen", "rejected")), tokenizer, args,
                       cut=("chosen", "rejected"))
    model = shard_model(add_lora(load_model(args.model, d), args), d, args.gradient_checkpointing)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    scheduler = warmup_schedule(optimizer, args.warmup_steps)
    ckpt = Checkpointer(args, d, tokenizer, model, optimizer, scheduler)
    log = Logger(args, d, ckpt)
    log.banner(args.batch_size, args.micro_batch_size, "pairs")
    plan = [rank_slice(indices, d) for indices in batches(len(rows), args.batch_size, args.steps, args.seed)]

    # Reference log-probs: the initial policy scores every micro-batch this run will train on, then
    # trains. (Step by step, so every process makes the same number of forward passes under FSDP.)
    model.eval()
    with torch.no_grad():
        ref = [[concatenated_logps(model, encode_pairs(tokenizer, [rows[i] for i in mb], d.device))
                for mb in micro_batches(mine, args.micro_batch_size)] for mine in plan]
    model.train()

    before = ckpt.remember("before", lambda: evaluate_splits(model, tokenizer, args, d))
    log.evaluation("before training", before)

    start_step, start, evals = ckpt.resume(log), time.time(), None
    for step, mine in enumerate(plan[start_step:], start_step + 1):
        # per-process share of the step's pair count: the gradient all-reduce averages over processes
        n_pairs = all_sum(len(mine), d).item() / d.world
        sums = torch.zeros(5, dtype=torch.float64)  # loss, chosen reward, rejected reward, accuracy, margin
        for mb, (ref_chosen_logp, ref_rejected_logp) in zip(micro_batches(mine, args.micro_batch_size), ref[step - 1]):
            chosen_logp, rejected_logp = concatenated_logps(
                model, encode_pairs(tokenizer, [rows[i] for i in mb], d.device))
            losses, chosen_rewards, rejected_rewards = dpo_loss(
                chosen_logp, rejected_logp, ref_chosen_logp, ref_rejected_logp, args.beta)
            (losses.sum() / n_pairs).backward()
            sums += torch.stack([losses.sum(), chosen_rewards.sum(), rejected_rewards.sum(),
                                 (chosen_rewards > rejected_rewards).sum(),
                                 (chosen_rewards - rejected_rewards).sum()]).detach().double().cpu()
        loss, chosen, rejected, accuracy, margin = (all_sum(sums, d) / args.batch_size).tolist()
        check_finite(loss, step, args.out)
        grad_norm = clip_grad(model, args.max_grad_norm)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        evals = None
        if args.eval_every and step % args.eval_every == 0:  # greedy ID and OOD accuracy, each process its share
            evals = evaluate_splits(model, tokenizer, args, d)
        log.log(step, {"train/loss": loss, "rewards/accuracy": accuracy, "rewards/margin": margin,
                       "rewards/chosen": chosen, "rewards/rejected": rejected, "train/grad_norm": grad_norm,
                       "train/lr": scheduler.get_last_lr()[0], "sys/peak_mem_gb": peak_mem_gb(d.device)}, evals)
        stop = ckpt.sigterm()  # a SIGTERM reached any process: save the state, then exit
        if stop or args.save_every and step % args.save_every == 0:
            ckpt.save(step)
        if stop:
            ckpt.exit(step)
    seconds = time.time() - start

    after = evals or evaluate_splits(model, tokenizer, args, d)  # the last step's, if it was evaluated
    save_checkpoint(model, tokenizer, f"{args.out}/model", d)
    log.summary(method="dpo", steps=args.steps, seconds=round(seconds, 1), before=before, after=after,
                peak_mem_gb=round(peak_mem_gb(d.device), 3))


if __name__ == "__main__":
    run(main)
