"""Group Relative Policy Optimization, GRPO (Shao et al. 2024, "DeepSeekMath", arXiv 2402.03300, Sec. 4.1),
with the token-level aggregation of DAPO (Yu et al. 2025, arXiv 2503.14476) and the constant one and the
std-free advantage of Dr. GRPO (Liu et al. 2025, "Understanding R1-Zero-Like Training", arXiv 2503.20783).

Objective: sample G responses per prompt from the policy, each scored 0/1; no critic: every token of
response i gets the group-relative advantage A_i = (R_i - mean(R)) / std(R) over its group; then
minibatch updates of the clipped surrogate with a KL penalty to a frozen reference (Eq. 3, as a loss)
  l_t = -min(rho_t A_i, clip(rho_t, 1 - eps, 1 + eps) A_i) + beta * k3_t,  rho_t = pi_theta(y_t) / mu(y_t),
  k3_t = pi_ref(y_t) / pi_theta(y_t) - log(pi_ref(y_t) / pi_theta(y_t)) - 1,
averaged over each response's tokens, then over the responses (--agg sequence, Eq. 3); or summed over
all tokens / their count (--agg token, DAPO) or / (responses x --max-new-tokens) (--agg constant, Dr. GRPO).

Run:
  python grpo.py                                        # tiny world, CPU, a few minutes
  python grpo.py --model Qwen/Qwen2.5-Math-1.5B --data prompts.jsonl --eval-data test.jsonl --ood-data ood.jsonl \
      --max-new-tokens 1024 --group-size 64 --lr 1e-6   # the paper's G 64, lr 1e-6, beta 0.04
  python grpo.py --beta 0 --agg constant --no-scale-rewards ...  # Dr. GRPO; --beta 0 loads no reference
  python grpo.py --gpus 8 ...                           # or: torchrun --nproc-per-node 8 grpo.py ...

Implementation details (as ppo.py's: data, score, reference, mu's log-probs, minibatches; no critic, no GAE):
  1. Advantages: a group's G responses are adjacent rows of one process's rollout (the prompts, not the
     responses, are split over processes), so its mean and std are local. The std is torch.std's (unbiased)
     plus 1e-6 (the paper gives neither): an all-right or all-wrong group gets A = 0. --no-scale-rewards
     drops the division (Dr. GRPO). No whitening, no discounting: Sec. 4.1.2's outcome supervision.
  2. The reference is loaded only when --beta > 0 and never updated (no iterative GRPO, Sec. 4.1.3). The KL
     penalty is in the loss, not in the reward (ppo.py's place): k3 (Schulman 2020), unbiased for
     KL(pi_theta || pi_ref) on samples of pi_theta and never negative, at every update, with a gradient.
  3. The default (1 minibatch, 1 epoch: one optimizer step per rollout) is on-policy: rho = 1 up to numerics
     and the clip never binds; more minibatches or epochs make every update after the first off-policy.
  4. Aggregation (--agg): a step's loss (minibatch, all its micro-batches and processes) is its token losses'
     sum / n: "sequence" divides each response's sum by its length, n = responses; "token" n = valid tokens;
     "constant" n = responses x --max-new-tokens (Dr. GRPO's budget, not the padded width, which varies).
     Each micro-batch divides by the minibatch's n over all processes / the process count, so micro-batching
     and processes do not change the gradient. DeepSeekMath has no public training code; verl's names:
     seq-mean-token-mean ("sequence"), token-mean ("token").
  5. Logged: ppo.py's clipfrac, approx_kl and entropy, kl_ref (token mean of k3, when --beta > 0); per
     rollout: reward mean, reward std (mean over groups of the group's std), response length.
  6. Deviations: the paper's beta 0.04, lr 1e-6, G 64 are for a 7B model; the tiny-world defaults (32 prompts
     x 8, lr 5e-5, warm-up 10, beta 0.04, 100 steps) are dypo.py's plain GRPO's (`--alpha 1 --sft-weight 0`).
"""

import time
from dataclasses import dataclass
from typing import Literal

import torch

from common import (Logger, UserError, VLLM, WORLD, add_lora, all_sum, batches, check_divisible,
                    check_finite, clip_grad, decode_responses, evaluate_splits, fit_context, init_distributed,
                    load_model, load_reference, load_tokenizer, logprobs, micro_batches, parse_args, peak_mem_gb,
                    prompt_ids, rank_slice, read_jsonl, reward, rollout_mismatch, run, sample, save_checkpoint,
                    seed_everything, select_rows, shard_model, warmup_schedule)
from state import Checkpointer


@dataclass
class Args:
    # the allowed values of this file's numeric flags (common.RANGES: those every script shares)
    ranges = {"group_size": ">= 2", "clip_eps": ">= 0", "beta": ">= 0", "tis_cap": ">= 0"}
    model: str = str(WORLD / "student")
    """causal LM to train (also the reference): a folder or a hub id"""
    data: str = str(WORLD / "prompts.jsonl")
    """training JSONL, one {"prompt", "answer"} per line"""
    eval_data: str = str(WORLD / "test_id.jsonl")
    """in-distribution test JSONL, one {"prompt", "answer"} per line (greedy accuracy)"""
    ood_data: str = str(WORLD / "test_ood.jsonl")
    """out-of-distribution test JSONL, same format"""
    out: str = "runs/grpo"
    """run folder: metrics.jsonl, summary.json and the checkpoint model/"""
    steps: int = 100
    """rollout steps (each followed by epochs x minibatches optimizer steps)"""
    prompts_per_step: int = 32
    """prompts sampled per rollout step, over all processes"""
    group_size: int = 8
    """G: responses sampled per prompt, the group their advantages compare"""
    minibatches: int = 1
    """optimizer steps per epoch over the rollout batch (more than 1: off-policy updates)"""
    epochs: int = 1
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
    tis_cap: float = 0.0
    """with --vllm, truncated importance sampling: the ratio's denominator is the learner's own log-prob of the
    rollout (pi_old), and each token's loss is weighted by min(pi_old / mu, this cap), mu the engine's (0: off)"""
    max_new_tokens: int = 48
    """longest response sampled (and generated at evaluation)"""
    max_prompt_length: int = 0
    """longest prompt kept from --data, in tokens (0: any that leaves --max-new-tokens in the model's context)"""
    temperature: float = 1.0
    """sampling temperature of the rollouts"""
    clip_eps: float = 0.2
    """PPO ratio clip: rho is clipped to [1 - eps, 1 + eps]"""
    beta: float = 0.04
    """weight of the per-token k3 KL penalty to the reference in the loss (0: no reference model is loaded)"""
    agg: Literal["sequence", "token", "constant"] = "sequence"
    """loss aggregation: sequence (GRPO, Eq. 3: each response's token mean, then the mean over responses),
    token (DAPO: mean over all tokens), constant (Dr. GRPO: token sum / (responses x --max-new-tokens))"""
    scale_rewards: bool = True
    """divide the advantage by the group's reward std (--no-scale-rewards: Dr. GRPO's R - mean)"""
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

def grpo_advantages(rewards, scale=True):
    """(P, k) rewards of P groups of k responses -> (P, k) advantages: (R - group mean) / (group std +
    1e-6), the std unbiased (torch.std); with scale=False R - group mean (Dr. GRPO)."""
    if not len(rewards):  # no group: torch's std() would warn
        return rewards
    centred = rewards - rewards.mean(-1, keepdim=True)
    return centred / (rewards.std(-1, keepdim=True) + 1e-6) if scale else centred


def kl_k3(logp, ref_logp):
    """Schulman's k3 estimator of KL(pi_theta || pi_ref) per token: exp(ref_logp - logp) - (ref_logp -
    logp) - 1, unbiased on tokens sampled from pi_theta and never negative. Elementwise."""
    log_ratio = ref_logp - logp
    return log_ratio.exp() - log_ratio - 1


def grpo_loss(logp, rollout_logp, ref_logp, advantages, mask, clip_eps, beta, agg, n=None, weight=None):
    """The GRPO loss (Eq. 3). logp, rollout_logp, ref_logp, mask: (P, k, T), mask 1 on valid tokens;
    advantages (P, k). (Any leading shape works: the loop passes (B, T) rows with advantages (B,).)
    Per token: -min(rho A, clip(rho, 1 - eps, 1 + eps) A) + beta * k3(logp, ref_logp), rho = exp(logp -
    rollout_logp); ref_logp may be None when beta is 0; `weight` (like mask; --tis-cap) multiplies each token's
    loss. Aggregated by `agg` (sum / n):
      "sequence"  each response's token mean, summed over responses / n (default P k: the mean over responses)
      "token"     sum over valid tokens / n (default their count: the token mean)
      "constant"  sum over valid tokens / n (default P k T)
    With the default n it is the batch's loss; a micro-batch's share of a bigger batch's takes that batch's n."""
    ratio = torch.exp((logp - rollout_logp) * mask)                                    # (P, k, T)
    A = advantages[..., None]
    losses = -torch.min(ratio * A, ratio.clamp(1 - clip_eps, 1 + clip_eps) * A)
    if beta:
        losses = losses + beta * kl_k3(logp * mask, ref_logp * mask)
    losses = losses * mask * (1 if weight is None else weight)
    if agg == "sequence":
        return (losses.sum(-1) / mask.sum(-1).clamp(min=1)).sum() / (mask[..., 0].numel() if n is None else n)
    return losses.sum() / ((mask.sum() if agg == "token" else mask.numel()) if n is None else n)


# ----------------------------------------------------------------------------- training

def main():
    args = parse_args(Args)
    if args.tis_cap and not args.vllm:
        raise UserError("--tis-cap corrects the mismatch of --vllm's sampler; without --vllm there is none")
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
    reference = load_reference(args, d, model) if args.beta > 0 else None
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
        rollout = sample(model, tokenizer, [prompt_ids(tokenizer, r["prompt"]) for r in mine], d,
                         args.max_new_tokens, args.temperature, micro_batch_size=args.generation_batch_size,
                         engine=engine)
        scores = torch.tensor([reward(t, r["answer"]) for t, r in zip(decode_responses(tokenizer, rollout), mine)],
                              device=d.device)
        mask, rollout_logp = rollout["response_mask"], rollout["logp"]
        tis = None
        if args.tis_cap:  # truncated importance sampling: min(pi_old / mu, C) per token, rho against pi_old
            tis = ((rollout["policy_logp"] - rollout_logp).exp().clamp(max=args.tis_cap) * mask)       # (B, T)
            rollout_logp = rollout["policy_logp"]
        ref_logp = None
        if reference is not None:  # --beta > 0
            with torch.no_grad():
                ref_logp = torch.cat([logprobs(reference, select_rows(rollout, mb))
                                      for mb in micro_batches(list(range(len(mine))), args.micro_batch_size)])
        groups = scores.view(-1, args.group_size)                                      # (P, k)
        advantages = grpo_advantages(groups, args.scale_rewards).view(-1)             # (B,) one per response

        # several epochs of minibatch updates, one optimizer step per minibatch
        update_sums = torch.zeros(2, dtype=torch.float64)  # loss, grad norm
        token_sums = torch.zeros(4, dtype=torch.float64)   # ratio clipped, k3, entropy, k3 to the reference
        for _ in range(args.epochs):
            for j in torch.randperm(args.minibatches).tolist():
                minibatch = list(range(j, len(mine), args.minibatches))
                # per-process share of the minibatch's normaliser: the gradient all-reduce averages over processes
                count = {"sequence": len(minibatch), "token": mask[minibatch].sum().item(),
                         "constant": len(minibatch) * args.max_new_tokens}[args.agg]
                n = all_sum(count, d).item() / d.world
                losses = torch.zeros(1, dtype=torch.float64)
                for mb in micro_batches(minibatch, args.micro_batch_size):
                    b = select_rows(rollout, mb)
                    out = model(b["input_ids"], b["attention_mask"], b["prompt_width"], entropy=True)
                    m, adv = b["response_mask"], advantages[mb]
                    ref = None if ref_logp is None else ref_logp[mb]
                    pg = grpo_loss(out["logp"], rollout_logp[mb], ref, adv, m, args.clip_eps, args.beta, args.agg, n,
                                   None if tis is None else tis[mb])
                    pg.backward()
                    with torch.no_grad():
                        log_ratio = (out["logp"] - rollout_logp[mb]) * m
                        ratio = log_ratio.exp()
                        losses += pg.double().cpu()
                        A = adv[:, None]
                        clipped = (ratio > 1 + args.clip_eps) & (A > 0) | (ratio < 1 - args.clip_eps) & (A < 0)
                        kl_ref = torch.zeros_like(m) if ref is None else kl_k3(out["logp"] * m, ref * m)
                        token_sums += torch.stack([clipped * m, (ratio - 1 - log_ratio) * m,
                                                   out["entropy"] * m,
                                                   kl_ref * m]).sum((1, 2)).double().cpu()
                losses = all_sum(losses, d).cpu() / d.world
                check_finite(losses.sum().item(), step, args.out)
                grad_norms = [clip_grad(model, args.max_grad_norm)]
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                update_sums += torch.cat([losses, torch.tensor(grad_norms, dtype=torch.float64)])
        loss, grad_norm = (update_sums / (args.epochs * args.minibatches)).tolist()
        rollout_tokens = all_sum(mask.sum(), d).item()
        clipfrac, approx_kl, entropy, kl_ref = (
            all_sum(token_sums, d) / (args.epochs * rollout_tokens)).tolist()
        n_responses = args.prompts_per_step * args.group_size
        evals = None
        if args.eval_every and step % args.eval_every == 0:  # greedy ID and OOD accuracy, each process its share
            evals = evaluate_splits(model, tokenizer, args, d)
        log.log(step, {"train/loss": loss, "policy/clipfrac": clipfrac,
                       "policy/approx_kl": approx_kl, "policy/entropy": entropy,
                       **({"policy/kl_ref": kl_ref} if reference is not None else {}),
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
    log.summary(method="grpo", steps=args.steps, seconds=round(seconds, 1), before=before, after=after,
                peak_mem_gb=round(peak_mem_gb(d.device), 3))


if __name__ == "__main__":
    run(main)
