"""Dynamic Policy Optimization, DYPO (Zhu et al. 2026, "Bridging SFT and RL: Dynamic Policy
Optimization for Robust Reasoning", arXiv 2604.08926): SFT and RL in one objective, gated per prompt.

Per step, each prompt q gets k sampled responses with 0/1 rewards; phi(q) = the number right.
  Hard (phi = 0):  nothing to learn from the samples -> multi-teacher SFT on a teacher trace (Eq. 5)
  Mid  (0<phi<k):  the group has contrast          -> alpha * GRPO + (1 - alpha) * GAL (Eq. 14)
  Easy (phi = k):  nothing to learn                -> dropped
Objective (the paper's Eq. 4), one loss and one optimizer step:
  L = E_q[ 1_H(q) * gamma * L_SFT(q) + 1_M(q) * (alpha * L_GRPO(q) + (1 - alpha) * L_GAL(q)) ]
  L_SFT(q) = -log pi(tau | q), tau drawn uniformly from the m teachers' responses to q   (Eq. 5)
  L_GAL(q) = mean over (success s, failure f) pairs of the group of
             -log sigmoid(beta * ([log pi(s) - log pi_ref(s)] - [log pi(f) - log pi_ref(f)]))  (Eq. 14)
  L_GRPO(q) = (1/k) sum_i sum_t -min(rho_t A_i, clip(rho_t, 1 - eps, 1 + eps) A_i), A_i = (R_i - mean) / (std
             + 1e-6); on-policy its gradient is -(1/k) sum_i A_i grad log pi(tau_i | q) (Eq. 12)

Run:
  python dypo.py                                       # tiny world, CPU, a few minutes
  python dypo.py --model Qwen/Qwen2.5-Math-1.5B --data train.jsonl --eval-data test.jsonl \\
      --ood-data ood.jsonl --max-new-tokens 1024 --gpus 1
  python dypo.py --gpus 8 ...                          # or: torchrun --nproc-per-node 8 dypo.py ...

Implementation details (grpo.py's skeleton; one joint micro-batch loop in place of its minibatch epochs):
  1. Data: JSONL with `prompt`, `answer`, `teacher_responses` (one per teacher; the tiny world has a large and
     a small one's). A Hard prompt without one is skipped, counted (data/hard_without_teacher), warned once.
  2. E_q: the mean over all the step's prompts, Easy ones (adding 0) included, whatever the micro-batches.
  3. Scale: all three terms are token sums, as the paper writes them (L_SFT the trace's NLL, EOS in; L_GAL on
     sequence log-probs; L_GRPO each response's sum, "summation-based RL", App. A.1.4). grpo.py's per-response
     MEAN (`--grpo-agg mean`, this file's reading before issue 31) shrinks GRPO by the response length.
  4. L_GRPO is grpo.py's loss with --beta 0, its ratio against sample()'s log-probs, one step per rollout: on-
     policy, the clip guards only the sampler-trainer gap (bf16 on GPU). clipfrac: the mean over Mid prompts.
  5. pi_ref in GAL: grpo.py's frozen reference, scoring only the Mid responses, once per rollout. One forward
     per micro-batch (--micro-batch-size prompts) over Mid responses and Hard traces; one with nothing to train
     runs a zero-weight row, so every process makes the same forwards under FSDP.
  6. The paper's public code differs; this file follows the paper. The code (a) takes separate SFT and RL steps;
     (b) adds lambda * GAL to a GSPO loss, not alpha-mixing GAL and GRPO; (c) uses beta 0.1 and no reference in
     GAL (here beta 1 and pi_ref, Eq. 14); (d) once detached GAL's log-probs (no gradient; here they carry it,
     tested); (e) takes GSPO's length-normalised ratio, each response a token mean (here a sum, Eq. 12).
  7. The paper's alpha 0.5, beta 1; gamma (--sft-weight, not in the paper) 1. `--alpha 1 --sft-weight 0` is plain
     GRPO (Hard, Easy groups have zero advantage); the README's SFT-then-RL: sft.py, then that GRPO.
"""

import time
from collections import Counter
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F

from common import (Logger, VLLM, WORLD, add_lora, all_sum, batches, check_divisible,
                    check_finite, clip_grad, decode_responses, evaluate_splits, fit_context, init_distributed,
                    load_model, load_reference, load_tokenizer, logprobs, micro_batches, pad_batch, parse_args,
                    peak_mem_gb, prompt_ids, rank_slice, read_jsonl, response_ids, reward, rollout_mismatch, run,
                    sample, save_checkpoint, seed_everything, select_rows, shard_model, warmup_schedule)
from state import Checkpointer


@dataclass
class Args:
    # the allowed values of this file's numeric flags (common.RANGES: those every script shares)
    ranges = {"group_size": ">= 2", "clip_eps": ">= 0", "alpha": "[0, 1]", "beta_gal": "> 0", "sft_weight": ">= 0"}
    model: str = str(WORLD / "student")
    """causal LM to train (also the reference): a folder or a hub id"""
    data: str = str(WORLD / "prompts.jsonl")
    """training JSONL, one {"prompt", "answer", "teacher_responses": [...]} per line"""
    eval_data: str = str(WORLD / "test_id.jsonl")
    """in-distribution test JSONL, one {"prompt", "answer"} per line (greedy accuracy)"""
    ood_data: str = str(WORLD / "test_ood.jsonl")
    """out-of-distribution test JSONL, same format"""
    out: str = "runs/dypo"
    """run folder: metrics.jsonl, summary.json and the checkpoint model/"""
    steps: int = 100
    """rollout steps (each followed by one optimizer step)"""
    prompts_per_step: int = 32
    """prompts sampled per rollout step, over all processes"""
    group_size: int = 8
    """k: responses sampled per prompt, the group that routes it (>= 2) and that its advantages compare"""
    micro_batch_size: int = 16
    """prompts per forward/backward on one process (their k responses, or one teacher trace each)"""
    generation_batch_size: int = 0
    """sequences one generation call holds on one process, a bound on the KV cache (0: the whole rollout at
    once); the responses are the same"""
    vllm: bool = False
    """sample the rollouts with a vLLM engine in this process and on its GPU, the policy's weights pushed into
    it before each rollout (README: vLLM)"""
    vllm_memory: float = 0.3
    """the share of the GPU's memory the vLLM engine takes, for its weights and KV cache"""
    max_new_tokens: int = 48
    """longest response sampled (and generated at evaluation)"""
    max_prompt_length: int = 0
    """longest prompt kept from --data, in tokens (0: any that leaves --max-new-tokens in the model's context)"""
    temperature: float = 1.0
    """sampling temperature of the rollouts"""
    clip_eps: float = 0.2
    """PPO ratio clip: rho is clipped to [1 - eps, 1 + eps]"""
    alpha: float = 0.5
    """weight of GRPO against GAL on Mid prompts (Eq. 4)"""
    beta_gal: float = 1.0
    """beta of the Group Alignment Loss (Eq. 14)"""
    sft_weight: float = 1.0
    """gamma: weight of the multi-teacher SFT loss on Hard prompts (Eq. 4; not given in the paper)"""
    grpo_agg: Literal["sum", "mean"] = "sum"
    """L_GRPO per response: the SUM of its tokens' surrogate (the paper's trajectory scale, Eq. 12) or their MEAN
    (grpo.py's --agg sequence, this file's reading before issue 31: it shrinks GRPO by the response length)"""
    lr: float = 5e-5
    """peak learning rate"""
    warmup_steps: int = 5
    """linear learning-rate warm-up, in optimizer steps"""
    weight_decay: float = 0.0
    """AdamW weight decay"""
    max_grad_norm: float = 1.0
    """clip the gradient norm to this"""
    seed: int = 1
    """seed of prompt order, sampling and the teacher draw"""
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
    """also write the model and the full training state (for --resume) every this many rollout steps
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

def route(rewards):
    """Difficulty grading, DYPO's gate. rewards: (P, k) in {0, 1}. Returns (hard, mid), boolean (P,): hard = no
    response right (-> SFT), mid = some but not all right (-> RL); the rest (all right) is dropped."""
    phi = rewards.sum(-1)
    return phi == 0, (phi > 0) & (phi < rewards.shape[-1])


def grpo_advantages(rewards, scale=True):
    """(P, k) rewards of P groups of k responses -> (P, k) advantages: (R - group mean) / (group std +
    1e-6), the std unbiased (torch.std); with scale=False R - group mean (Dr. GRPO)."""
    if not len(rewards):  # no group: torch's std() would warn
        return rewards
    centred = rewards - rewards.mean(-1, keepdim=True)
    return centred / (rewards.std(-1, keepdim=True) + 1e-6) if scale else centred


def grpo_loss(logp, rollout_logp, advantages, mask, clip_eps, agg="sum"):
    """L_GRPO per group, at the trajectory scale of Eq. 12. logp, rollout_logp, mask: (P, k, T), mask 1 on valid
    tokens; advantages (P, k). Per token -min(rho A, clip(rho, 1 - eps, 1 + eps) A), rho = exp(logp -
    rollout_logp); per response the SUM over its tokens (agg "sum": on-policy the gradient is -A_i grad log
    pi(tau_i | q)) or their MEAN (agg "mean", grpo.py's --agg sequence); then the mean over the k responses.
    Returns (P,) losses, and (P,) each group's share of tokens whose gradient the clip removes (A > 0 and
    rho > 1 + eps, or A < 0 and rho < 1 - eps)."""
    ratio = torch.exp((logp - rollout_logp) * mask)                                    # (P, k, T)
    A = advantages[..., None]
    losses = -torch.min(ratio * A, ratio.clamp(1 - clip_eps, 1 + clip_eps) * A)
    losses = (losses * mask).sum(-1)                                                   # (P, k)
    if agg == "mean":
        losses = losses / mask.sum(-1).clamp(min=1)
    clipped = ((ratio > 1 + clip_eps) & (A > 0) | (ratio < 1 - clip_eps) & (A < 0)) * mask
    return losses.mean(-1), clipped.sum((1, 2)) / mask.sum((1, 2)).clamp(min=1)


def gal_loss(seq_logp, ref_seq_logp, rewards, beta):
    """Group Alignment Loss (Eq. 14): on-policy DPO inside each group. seq_logp (with gradient),
    ref_seq_logp: (P, k) sequence log-probs (the sum over a response's tokens); rewards: (P, k) in {0, 1}.
    Mean over every (success, failure) pair of the same group of -log sigmoid(beta * (margin_s - margin_f)),
    margin = log pi - log pi_ref. Groups without both outcomes have no pairs; no pairs at all gives 0."""
    margin = seq_logp - ref_seq_logp                                                  # (P, k)
    diff = margin[:, :, None] - margin[:, None, :]                                    # (P, k, k): s row, f column
    pairs = (rewards[:, :, None] > 0.5) & (rewards[:, None, :] < 0.5)                 # (P, k, k)
    losses = -F.logsigmoid(beta * diff)
    return (losses * pairs).sum() / pairs.sum().clamp(min=1)


def sft_nll(logp, mask):
    """Eq. 5: -log pi(tau | q), the sequence NLL of each teacher trace. logp, mask: (H, T) -> (H,)."""
    return -(logp * mask).sum(-1)


def teacher_trace(row, u):
    """Multi-teacher SFT: one of the row's teacher responses, uniformly (u in [0, 1)); None if none."""
    traces = row.get("teacher_responses") or []
    return traces[int(u * len(traces))] if traces else None


def dypo_loss(mid_logp, mid_rollout_logp, mid_mask, mid_ref_seq_logp, mid_rewards, hard_logp, hard_mask,
              alpha, beta_gal, sft_weight, clip_eps, grpo_agg="sum"):
    """Eq. 4, summed (not averaged) over the Mid and Hard prompts given; Easy prompts add nothing.
    Mid: mid_logp (with gradient), mid_rollout_logp, mid_mask (M, k, T), mid_ref_seq_logp and
    mid_rewards (M, k). Hard: hard_logp (with gradient), hard_mask (H, T), one teacher trace each.
    grpo_agg: each response's GRPO surrogate summed ("sum") or averaged ("mean") over its tokens (grpo_loss).
    Returns (loss, parts): parts holds detached sums for logging."""
    M = mid_rewards.shape[0]
    grpo, clipfrac = grpo_loss(mid_logp, mid_rollout_logp, grpo_advantages(mid_rewards), mid_mask, clip_eps,
                               grpo_agg)                                                # (M,)
    seq = (mid_logp * mid_mask).sum(-1)                                               # (M, k)
    gal = torch.stack([gal_loss(seq[j:j + 1], mid_ref_seq_logp[j:j + 1], mid_rewards[j:j + 1], beta_gal)
                       for j in range(M)]) if M else seq.new_zeros(0)                # (M,) one mean per group
    nll = sft_nll(hard_logp, hard_mask)                                               # (H,)
    loss = (alpha * grpo + (1 - alpha) * gal).sum() + sft_weight * nll.sum()
    n_pairs = mid_rewards.sum(-1) * (mid_rewards.shape[-1] - mid_rewards.sum(-1))     # (M,)
    parts = {"grpo": grpo.sum(), "gal": (gal * n_pairs).sum(), "pairs": n_pairs.sum(), "clipfrac": clipfrac.sum(),
             "nll": nll.sum()}
    return loss, {k: v.item() for k, v in parts.items()}


# ----------------------------------------------------------------------------- training

def main():
    args = parse_args(Args)
    d = init_distributed(args.gpus)
    args.micro_batch_size = check_divisible(args.prompts_per_step, args.micro_batch_size, d, "prompts_per_step")
    seed_everything(args.seed)
    tokenizer = load_tokenizer(args.model)
    rows = fit_context(read_jsonl(args.data, ("prompt", "answer"), optional=("teacher_responses",)), tokenizer,
                       args, cut=("teacher_responses",))
    model = shard_model(add_lora(load_model(args.model, d), args), d, args.gradient_checkpointing)
    engine = VLLM(args, d) if args.vllm else None  # --vllm: the rollouts' sampler
    reference = load_reference(args, d, model)  # pi_ref of GAL
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    scheduler = warmup_schedule(optimizer, args.warmup_steps)
    teacher_draws = torch.Generator().manual_seed(args.seed)  # same on every process: global indices
    no_teacher_total = torch.zeros((), dtype=torch.long)  # Hard prompts skipped so far (updated in place)
    ckpt = Checkpointer(args, d, tokenizer, model, optimizer, scheduler, teacher_draws=teacher_draws,
                        no_teacher_total=no_teacher_total)
    log = Logger(args, d, ckpt)
    log.banner(args.prompts_per_step, args.micro_batch_size, f"prompts (x {args.group_size} samples)")

    before = ckpt.remember("before", lambda: evaluate_splits(model, tokenizer, args, d))
    log.evaluation("before training", before)

    k = args.group_size
    plan = batches(len(rows), args.prompts_per_step, args.steps, args.seed)
    start_step, start, evals = ckpt.resume(log), time.time(), None
    for step, indices in enumerate(plan[start_step:], start_step + 1):
        # rollout: k responses per prompt (adjacent rows), scored; mu's log-probs recorded while sampling
        mine = [rows[i] for i in rank_slice(indices, d) for _ in range(args.group_size)]
        rollout = sample(model, tokenizer, [prompt_ids(tokenizer, r["prompt"]) for r in mine], d,
                         args.max_new_tokens, args.temperature, micro_batch_size=args.generation_batch_size,
                         engine=engine)
        scores = torch.tensor([reward(t, r["answer"]) for t, r in zip(decode_responses(tokenizer, rollout), mine)],
                              device=d.device)
        mask, rollout_logp = rollout["response_mask"], rollout["logp"]
        groups = scores.view(-1, args.group_size)                                      # (P, k)
        hard, mid = route(groups)  # the gate: Hard -> SFT on a teacher trace, Mid -> GRPO + GAL, Easy -> dropped
        ref_logp = torch.zeros_like(rollout_logp)  # pi_ref of GAL scores the Mid prompts' responses only
        with torch.no_grad():
            for mb in micro_batches(mid.repeat_interleave(k).nonzero().flatten().tolist(), args.micro_batch_size * k):
                ref_logp[mb] = logprobs(reference, select_rows(rollout, mb))

        # Eq. 4, one optimizer step: per micro-batch, one forward of Mid responses and Hard traces, loss / n_prompts
        u = rank_slice(torch.rand(args.prompts_per_step, generator=teacher_draws).tolist(), d)
        traces = [teacher_trace(mine[q * k], x) for q, x in enumerate(u)]
        no_teacher = int((hard & torch.tensor([t is None for t in traces], device=d.device)).sum())
        prompts = [prompt_ids(tokenizer, r["prompt"]) for r in mine[::k]]                 # one per prompt
        responses = [ids[m.bool()].tolist() for ids, m in zip(rollout["input_ids"][:, rollout["prompt_width"]:], mask)]
        n_prompts = all_sum(len(groups), d).item() / d.world
        stats = Counter(hard=hard.sum().item(), mid=mid.sum().item(), no_teacher=no_teacher)  # sums, for the log
        for mb in micro_batches(list(range(len(groups))), args.micro_batch_size):
            mids = [q for q in mb if mid[q]]
            hards = [q for q in mb if hard[q] and traces[q] is not None]
            rollout_rows = [q * k + i for q in mids for i in range(k)]
            train_prompts = [prompts[q] for q in mids for _ in range(k)] + [prompts[q] for q in hards]
            train_responses = [responses[j] for j in rollout_rows] + [response_ids(tokenizer, traces[q]) for q in hards]
            weight = 1.0
            if not train_prompts:  # nothing to train here: one zero-weight row keeps FSDP's forwards in step
                train_prompts, train_responses, weight = prompts[:1], [responses[0] or [tokenizer.eos_token_id]], 0.0
            b = pad_batch(train_prompts, train_responses, tokenizer.pad_token_id, d.device)
            logp, m = logprobs(model, b), b["response_mask"]                              # (rows, T)
            n, shape = len(rollout_rows), (len(mids), k, m.shape[1])  # rows [:n] the Mid responses, then Hard traces
            loss, parts = dypo_loss(logp[:n].view(shape),
                                    F.pad(rollout_logp[rollout_rows], (0, m.shape[1] - mask.shape[1])).view(shape),
                                    m[:n].view(shape), ref_logp[rollout_rows].sum(-1).view(len(mids), k), groups[mids],
                                    logp[n:n + len(hards)], m[n:n + len(hards)], args.alpha, args.beta_gal,
                                    args.sft_weight, args.clip_eps, args.grpo_agg)
            loss = weight * loss / n_prompts
            loss.backward()
            stats.update(parts, loss=loss.item(), sft=len(hards), trained=len(mids) + len(hards))
        totals = dict(zip(sorted(stats), all_sum([float(stats[x]) for x in sorted(stats)], d).tolist()))
        loss = totals["loss"] / d.world
        check_finite(loss, step, args.out)
        grad_norm = clip_grad(model, args.max_grad_norm)
        # no prompt trained (all Easy, or Hard without a trace): no gradient, no update (AdamW would still move)
        if totals["trained"]:
            optimizer.step()
            scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        if totals["no_teacher"] and not no_teacher_total:
            log.print(f"warning: step {step}: {int(totals['no_teacher'])} Hard prompt(s) have no teacher_responses "
                      f"and are skipped (counted in data/hard_without_teacher)")
        no_teacher_total += int(totals["no_teacher"])
        P, n_mid = args.prompts_per_step, max(totals["mid"], 1)
        clipfrac = totals["clipfrac"] / n_mid
        rollout_tokens = all_sum(mask.sum(), d).item()
        n_responses = args.prompts_per_step * args.group_size
        evals = None
        if args.eval_every and step % args.eval_every == 0:  # greedy ID and OOD accuracy, each process its share
            evals = evaluate_splits(model, tokenizer, args, d)
        log.log(step, {"train/loss": loss, "policy/clipfrac": clipfrac,
                       "route/hard": totals["hard"] / P, "route/mid": totals["mid"] / P, "gal/pairs": totals["pairs"],
                       "route/easy": 1 - (totals["hard"] + totals["mid"]) / P, "grpo/loss": totals["grpo"] / n_mid,
                       "gal/loss": totals["gal"] / max(totals["pairs"], 1),
                       "sft/nll": totals["nll"] / max(totals["sft"], 1), "data/hard_without_teacher": no_teacher_total,
                       "rollout/reward_mean": all_sum(scores.sum(), d).item() / n_responses,
                       "rollout/reward_std": all_sum(groups.std(-1).sum(), d).item() / args.prompts_per_step,
                       "rollout/response_length": rollout_tokens / n_responses,
                       "rollout/truncated": all_sum(rollout["truncated"].sum(), d).item() / n_responses,
                       "train/grad_norm": grad_norm,
                       "train/lr": scheduler.get_last_lr()[0], "sys/peak_mem_gb": peak_mem_gb(d.device),
                       **rollout_mismatch(rollout, d)}, evals)
        stop = ckpt.sigterm()  # a SIGTERM reached any process: save the state, then exit
        if stop or args.save_every and step % args.save_every == 0:
            ckpt.save(step)
        if stop:
            ckpt.exit(step)
    seconds = time.time() - start

    after = evals or evaluate_splits(model, tokenizer, args, d)  # the last step's, if it was evaluated
    save_checkpoint(model, tokenizer, f"{args.out}/model", d)
    log.summary(method="dypo", steps=args.steps, seconds=round(seconds, 1), before=before, after=after,
                hard_without_teacher=int(no_teacher_total),
                peak_mem_gb=round(peak_mem_gb(d.device), 3))


if __name__ == "__main__":
    run(main)
