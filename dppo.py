"""Divergence Proximal Policy Optimization, DPPO (Qi, Zhou, Liu, Pang, Du, Lin, Lee 2026, "Rethinking the
Trust Region in LLM Reinforcement Learning", arXiv 2602.04879; reference code sail-sg/Stable-RL): GRPO whose
ratio clip is replaced by a mask on an estimate of a real divergence between the rollout and the current policy.

Objective: grpo.py's rollouts, with A_i = R_i - mean(R) over the group (no std) and no KL penalty; minibatch
updates of the unclipped surrogate, masked where it would leave the trust region (Eqs. 11-12), a token mean:
  l_t = -M_t rho_t A_i,  rho_t = pi_theta(y_t) / mu(y_t),
  M_t = 0 if D_t > delta and (A_i > 0 and rho_t > 1 or A_i < 0 and rho_t < 1), else 1.
PPO's clip |rho_t - 1| <= eps is a one-sample estimate of the TV distance between mu and pi_theta; DPPO masks
on an estimate D_t of a real divergence D(mu || pi_theta)(s_t) instead, and only the update moving further away.

Run:
  python dppo.py                                        # tiny world, CPU, a few minutes
  python dppo.py --model Qwen/Qwen2.5-0.5B-Instruct --data prompts.jsonl --eval-data test.jsonl --ood-data ood.jsonl \
      --max-new-tokens 512 --group-size 16 --lr 1e-6   # the authors' G 16, lr 1e-6
  python dppo.py --trust-region clip                    # the baseline: ratio clip 0.2 / 0.28, all else equal
  python dppo.py --gpus 8 ...                           # or: torchrun --nproc-per-node 8 dppo.py ...

Implementation details (as grpo.py's: data, groups, minibatches, normalisers over a step; plus):
  1. The trust region is anchored to the ROLLOUT: mu's log-probs (for Top-K also its top-K ids and log-probs)
     are sample()'s, never recomputed; keep --temperature 1 unless the mismatch is what you want to study.
  2. Divergences (Eqs. 13-16), without gradient: binary_tv |mu(a) - pi(a)| and binary_kl (the vocabulary
     collapsed to {sampled token, rest}); topk_tv and topk_kl over TopK(mu) U {a_t} (a_t not counted twice)
     plus an "other" bucket with the rest of the mass (clamped at 1e-12). delta 0.15 for TV, 0.05 for KL (the
     authors' script); K = 20, capped at the vocabulary size (the tiny world's 18 tokens: exact there).
  3. Loss as the reference code: -A * sg(min(rho, C)) * M * log pi_theta, C = 10, whose gradient is that of
     -M rho A (Eq. 11) wherever rho < C. --trust-region clip, the paper's baseline, is GRPO-style "ClipHigher"
     max(-A rho, -A clip(rho, 1 - 0.2, 1 + 0.28)). Either is a token mean over the optimizer step (grpo.py's
     --agg token); the authors' verl script takes seq-mean-token-sum-norm (grpo.py's --agg constant).
  4. Logged for both trust regions (only the selected one acts): clipfrac (tokens the clip cuts: A > 0 and
     rho > 1 + eps_high, or A < 0 and rho < 1 - eps_low), masked_frac (tokens DPPO's mask zeroes), divergence
     mean and max, and grpo.py's approx_kl, entropy, reward mean and std, response length.
  5. --rollout-precision bf16 samples each rollout from the policy's weights rounded to bf16 (restored for the
     update): mu differs from pi_theta before any update, as with a bf16 inference engine. On a GPU (autocast
     bf16) it rounds only what autocast leaves in fp32.
  6. Defaults: 2 minibatches x 2 epochs (four optimizer steps per rollout), so every update after the first is
     off-policy and the trust region has something to do. The authors' lr 1e-6 and G 16 are for 1B+ models;
     the tiny world takes grpo.py's 32 prompts x 8, lr 5e-5 (higher did worse on the first world), and 80
     rollout steps, not 100 (four optimizer steps each; the sampled accuracy had levelled by step 80).
"""

import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import Literal

import torch

from common import (Logger, UserError, VLLM, WORLD, add_lora, all_sum, batches, check_divisible,
                    check_finite, clip_grad, decode_responses, evaluate_splits, fit_context, init_distributed,
                    all_max, load_model, load_tokenizer, micro_batches, parse_args, peak_mem_gb,
                    prompt_ids, rank_slice, read_jsonl, reward, rollout_mismatch, run, sample, save_checkpoint,
                    seed_everything, select_rows, shard_model, warmup_schedule)
from state import Checkpointer


@dataclass
class Args:
    # the allowed values of this file's numeric flags (common.RANGES: those every script shares)
    ranges = {"group_size": ">= 2", "delta": ">= 0", "top_k": ">= 1", "clip_low": "[0, 1]", "clip_high": ">= 0"}
    aliases = {"top_k": "--topk"}  # the flag's first spelling still works
    model: str = str(WORLD / "student")
    """causal LM to train: a folder or a hub id"""
    data: str = str(WORLD / "prompts.jsonl")
    """training JSONL, one {"prompt", "answer"} per line"""
    eval_data: str = str(WORLD / "test_id.jsonl")
    """in-distribution test JSONL, one {"prompt", "answer"} per line (greedy accuracy)"""
    ood_data: str = str(WORLD / "test_ood.jsonl")
    """out-of-distribution test JSONL, same format"""
    out: str = "runs/dppo"
    """run folder: metrics.jsonl, summary.json and the checkpoint model/"""
    steps: int = 80
    """rollout steps (each followed by epochs x minibatches optimizer steps)"""
    prompts_per_step: int = 32
    """prompts sampled per rollout step, over all processes"""
    group_size: int = 8
    """G: responses sampled per prompt, the group their advantages compare"""
    minibatches: int = 2
    """optimizer steps per epoch over the rollout batch (more than 1: off-policy updates)"""
    epochs: int = 2
    """passes over the rollout batch"""
    micro_batch_size: int = 128
    """sequences per forward/backward on one process"""
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
    trust_region: Literal["dppo", "clip"] = "dppo"
    """dppo: the divergence mask (Eq. 12); clip: the baseline ratio clip [1 - clip_low, 1 + clip_high]"""
    divergence: Literal["binary_tv", "binary_kl", "topk_tv", "topk_kl"] = "binary_tv"
    """DPPO's divergence estimate: binary_tv, binary_kl, topk_tv or topk_kl"""
    delta: float = 0.0
    """DPPO's divergence threshold (0: the paper's, 0.15 for TV and 0.05 for KL)"""
    top_k: int = 20
    """K of the Top-K divergences: the rollout records mu's K most likely tokens (also --topk)"""
    clip_low: float = 0.2
    """baseline: the ratio is clipped from below at 1 - clip_low"""
    clip_high: float = 0.28
    """baseline: the ratio is clipped from above at 1 + clip_high"""
    rollout_precision: Literal["fp32", "bf16"] = "fp32"
    """fp32: rollouts from the policy itself; bf16: from its weights rounded to bf16 (as a bf16 engine's copy)"""
    lr: float = 5e-5
    """peak learning rate"""
    warmup_steps: int = 10
    """linear learning-rate warm-up, in optimizer steps"""
    weight_decay: float = 0.0
    """AdamW weight decay"""
    max_grad_norm: float = 1.0
    """clip the gradient norm to this"""
    seed: int = 1
    """seed of prompt order and sampling"""
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

def group_advantages(scores, group_size):
    """(B,) scores, groups of group_size adjacent responses -> (B,) advantages R - group mean (no std: Dr. GRPO's)."""
    rewards = scores.view(-1, group_size)
    centred = rewards - rewards.mean(-1, keepdim=True)
    return centred.view(-1)


def binary_divergence(logp, rollout_logp, kind):
    """Eqs. 13-14 on {a_t, rest}: "tv" |mu - pi|, "kl" mu log(mu / pi) + (1 - mu) log((1 - mu) / (1 - pi)). (B, T)."""
    logp, rollout_logp = logp.detach(), rollout_logp.detach()
    if kind == "tv":
        return (rollout_logp.exp() - logp.exp()).abs()
    rest_mu, rest_pi = ((-torch.expm1(x)).clamp(min=1e-12) for x in (rollout_logp, logp))  # 1 - mu, accurately
    return rollout_logp.exp() * (rollout_logp - logp) + rest_mu * (rest_mu.log() - rest_pi.log())


def topk_divergence(logp_set, rollout_logp_set, kind):
    """Eqs. 15-16 over the last dim's token set (mu's top-K, a_t; -inf in both: zero mass) and an "other" bucket
    (1 - sum, clamped at 1e-12): "tv" 1/2 sum |p_mu - p_pi|, "kl" sum p_mu log(p_mu / p_pi). (B, T, K) -> (B, T)."""
    logp_set, rollout_logp_set = logp_set.detach(), rollout_logp_set.detach()
    p_pi, p_mu = logp_set.exp(), rollout_logp_set.exp()
    other_pi, other_mu = ((1 - p.sum(-1)).clamp(min=1e-12) for p in (p_pi, p_mu))   # (B, T)
    if kind == "tv":
        return 0.5 * ((p_mu - p_pi).abs().sum(-1) + (other_mu - other_pi).abs())
    in_set = torch.where(p_mu > 0, p_mu * (rollout_logp_set - logp_set), torch.zeros_like(p_mu)).sum(-1)
    return in_set + other_mu * (other_mu.log() - other_pi.log())


def with_sampled_token(topk_values, sampled_values, topk_ids, sampled_ids):
    """Log-probs at mu's top-K (B, T, K) and at a_t (B, T) -> (B, T, K + 1) over TopK U {a_t}; a_t listed: -inf."""
    listed = (topk_ids == sampled_ids[..., None]).any(-1)                      # (B, T)
    return torch.cat([topk_values, sampled_values.masked_fill(listed, float("-inf"))[..., None]], -1)


def dppo_mask(logp, rollout_logp, advantages, divergence, delta):
    """Eq. 12: 0 where the update would move further outside the trust region, else 1. (B, T) float."""
    ratio = torch.exp(logp.detach() - rollout_logp)
    away = (advantages > 0) & (ratio > 1) | (advantages < 0) & (ratio < 1)
    return (~((divergence > delta) & away)).float()


def dppo_loss(logp, rollout_logp, advantages, mask, response_mask, n_tokens=None):
    """-A * sg(min(rho, C)) * M * log pi_theta, summed over valid tokens / n_tokens (default: their count),
    whose gradient is that of -token_mean(M * rho * A) (Eq. 11) wherever rho < C. Inputs (B, T)."""
    ratio = torch.exp(logp.detach() - rollout_logp).clamp(max=10.0)  # C, as the reference code
    losses = -advantages * ratio * mask * logp
    return (losses * response_mask).sum() / (response_mask.sum() if n_tokens is None else n_tokens)


def clip_loss(logp, rollout_logp, advantages, mask, clip_low, clip_high, n_tokens=None):
    """Baseline max(-A rho, -A clip(rho, 1 - clip_low, 1 + clip_high)), token sum / n_tokens (default: their count)."""
    ratio = torch.exp((logp - rollout_logp) * mask)                                    # (B, T)
    losses = torch.max(-advantages * ratio, -advantages * ratio.clamp(1 - clip_low, 1 + clip_high))
    return (losses * mask).sum() / (mask.sum() if n_tokens is None else n_tokens)


@contextmanager
@torch.no_grad()  # each step of the generator; the caller's block keeps its own grad mode
def rounded_weights(model, dtype):
    """Within the block the weights hold their values rounded to `dtype` (as a bf16 engine's copy); then exact again."""
    exact = [p.detach().clone() for p in model.parameters()]
    for p in model.parameters():
        p.copy_(p.to(dtype))
    try:
        yield
    finally:
        for p, value in zip(model.parameters(), exact):
            p.copy_(value)


# ----------------------------------------------------------------------------- training

def main():
    args = parse_args(Args)
    d = init_distributed(args.gpus)
    check_divisible(args.prompts_per_step, 1, d, "prompts_per_step")
    responses = args.prompts_per_step // d.world * args.group_size  # per process
    if responses % args.minibatches:
        raise UserError(f"the {responses} responses per process and step do not split into "
                        f"--minibatches {args.minibatches}")
    minibatch_size = args.prompts_per_step * args.group_size // args.minibatches
    args.micro_batch_size = check_divisible(minibatch_size, args.micro_batch_size, d)
    seed_everything(args.seed)
    tokenizer = load_tokenizer(args.model)
    rows = fit_context(read_jsonl(args.data, ("prompt", "answer")), tokenizer, args)
    model = shard_model(add_lora(load_model(args.model, d), args), d, args.gradient_checkpointing)
    engine = VLLM(args, d) if args.vllm else None  # --vllm: the rollouts' sampler
    kind = args.divergence.split("_")[1]  # the divergence: "tv" or "kl", its threshold delta, mu's top-K recorded
    delta = args.delta or {"tv": 0.15, "kl": 0.05}[kind]
    topk = min(args.top_k, model.lm.config.vocab_size) if args.divergence.startswith("topk") else 0
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    scheduler = warmup_schedule(optimizer, args.warmup_steps)
    ckpt = Checkpointer(args, d, tokenizer, model, optimizer, scheduler)
    log = Logger(args, d, ckpt)
    log.banner(minibatch_size, args.micro_batch_size, "sequences")

    before = ckpt.remember("before", lambda: evaluate_splits(model, tokenizer, args, d))
    log.evaluation("before training", before)

    plan = batches(len(rows), args.prompts_per_step, args.steps, args.seed)
    start_step, start, evals = ckpt.resume(log), time.time(), None
    for step, indices in enumerate(plan[start_step:], start_step + 1):
        # rollout: G responses per prompt (adjacent rows), scored; mu's log-probs recorded while sampling
        mine = [rows[i] for i in rank_slice(indices, d) for _ in range(args.group_size)]
        with rounded_weights(model, torch.bfloat16) if args.rollout_precision == "bf16" else nullcontext():
            rollout = sample(model, tokenizer, [prompt_ids(tokenizer, r["prompt"]) for r in mine], d,
                             args.max_new_tokens, args.temperature, micro_batch_size=args.generation_batch_size,
                             engine=engine, topk=topk)
        scores = torch.tensor([reward(t, r["answer"]) for t, r in zip(decode_responses(tokenizer, rollout), mine)],
                              device=d.device)
        mask, rollout_logp = rollout["response_mask"], rollout["logp"]
        groups = scores.view(-1, args.group_size)                                      # (P, k)
        advantages = group_advantages(scores, args.group_size)[:, None] * mask         # (B, T) per token

        # several epochs of minibatch updates, one optimizer step per minibatch
        update_sums = torch.zeros(2, dtype=torch.float64)  # loss, grad norm
        token_sums = torch.zeros(5, dtype=torch.float64)   # ratio clipped, k3, entropy, DPPO-masked, divergence
        divergence_max = 0.0
        for _ in range(args.epochs):
            for j in torch.randperm(args.minibatches).tolist():
                minibatch = list(range(j, len(mine), args.minibatches))
                # per-process share of the minibatch's normaliser: the gradient all-reduce averages over processes
                count = mask[minibatch].sum().item()
                n = all_sum(count, d).item() / d.world
                losses = torch.zeros(1, dtype=torch.float64)
                for mb in micro_batches(minibatch, args.micro_batch_size):
                    b = select_rows(rollout, mb)
                    out = model(b["input_ids"], b["attention_mask"], b["prompt_width"], entropy=True,
                                gather=b["topk_ids"] if topk else None)
                    m, adv = b["response_mask"], advantages[mb]
                    if topk:  # D over mu's top-K and the sampled token, with an "other" bucket
                        sampled_ids = b["input_ids"][:, b["prompt_width"]:]
                        divergence = topk_divergence(
                            with_sampled_token(out["gather_logp"], out["logp"], b["topk_ids"], sampled_ids),
                            with_sampled_token(b["topk_logp"], rollout_logp[mb], b["topk_ids"], sampled_ids), kind) * m
                    else:
                        divergence = binary_divergence(out["logp"], rollout_logp[mb], kind) * m
                    trust = dppo_mask(out["logp"], rollout_logp[mb], adv, divergence, delta)
                    pg = (dppo_loss(out["logp"], rollout_logp[mb], adv, trust, m, n) if args.trust_region == "dppo" else
                          clip_loss(out["logp"], rollout_logp[mb], adv, m, args.clip_low, args.clip_high, n))
                    pg.backward()
                    with torch.no_grad():
                        log_ratio = (out["logp"] - rollout_logp[mb]) * m
                        ratio = log_ratio.exp()
                        losses += pg.double().cpu()
                        clipped = (ratio > 1 + args.clip_high) & (adv > 0) | (ratio < 1 - args.clip_low) & (adv < 0)
                        token_sums += torch.stack([clipped * m, (ratio - 1 - log_ratio) * m,
                                                   out["entropy"] * m,
                                                   (1 - trust) * m, divergence]).sum((1, 2)).double().cpu()
                        divergence_max = max(divergence_max, divergence.max().item())
                losses = all_sum(losses, d).cpu() / d.world
                check_finite(losses.sum().item(), step, args.out)
                grad_norms = [clip_grad(model, args.max_grad_norm)]
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                update_sums += torch.cat([losses, torch.tensor(grad_norms, dtype=torch.float64)])
        loss, grad_norm = (update_sums / (args.epochs * args.minibatches)).tolist()
        rollout_tokens = all_sum(mask.sum(), d).item()
        clipfrac, approx_kl, entropy, masked_frac, divergence_mean = (
            all_sum(token_sums, d) / (args.epochs * rollout_tokens)).tolist()
        n_responses = args.prompts_per_step * args.group_size
        evals = None
        if args.eval_every and step % args.eval_every == 0:  # greedy ID and OOD accuracy, each process its share
            evals = evaluate_splits(model, tokenizer, args, d)
        log.log(step, {"train/loss": loss, "policy/clipfrac": clipfrac,
                       "policy/approx_kl": approx_kl, "policy/entropy": entropy,
                       "policy/masked_frac": masked_frac, "policy/divergence_mean": divergence_mean,
                       "policy/divergence_max": all_max(divergence_max, d).item(),
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
    log.summary(method="dppo", steps=args.steps, seconds=round(seconds, 1), before=before, after=after,
                trust_region=args.trust_region, divergence=args.divergence, delta=delta,
                peak_mem_gb=round(peak_mem_gb(d.device), 3))


if __name__ == "__main__":
    run(main)
