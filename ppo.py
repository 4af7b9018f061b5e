"""Proximal Policy Optimization for language models, RLHF-style, with a critic (Schulman et al. 2017, arXiv
1707.06347; Ouyang et al. 2022; Huang et al. 2024, "The N+ implementation details of RLHF with PPO", arXiv 2403.17031).

Objective: sample G responses per prompt from the policy; per-token reward r_t = -beta * (log mu(y_t) -
log pi_ref(y_t)) plus the 0/1 answer reward at the last token; GAE advantages from a learned critic;
then several epochs of minibatch updates of the clipped surrogate (the PPO paper's Eq. 7, L^CLIP)
  L = token mean of max(-A_t * rho_t, -A_t * clip(rho_t, 1 - eps, 1 + eps)),  rho_t = pi_theta(y_t) / mu(y_t)
and of the clipped value loss 0.5 * token mean of max((V - R)^2, (clip(V, V_old +- c) - R)^2).

Run:
  python ppo.py                                         # tiny world, CPU, a few minutes
  python ppo.py --model Qwen/Qwen2.5-0.5B-Instruct --data prompts.jsonl --eval-data test.jsonl --ood-data ood.jsonl \
      --max-new-tokens 512 --lr 1e-6 --critic-lr 1e-5
  python ppo.py --gpus 8 ...                            # or: torchrun --nproc-per-node 8 ppo.py ...

Implementation details:
  1. Data: JSONL with `prompt` and `answer`; the score is common.reward (1 when the response's last
     number equals the answer, else 0), added at the last response token.
  2. The critic: a separate copy of the policy's trunk (from --model) with a zero-initialised scalar head, V(s_t)
     read from the hidden state that predicts y_t. Separate (as Ouyang et al., Huang et al.): the value loss
     never moves the policy's features and needs no coefficient. Sharded like the policy, LoRA under --lora-rank
     (its head trains whole); one AdamW, two parameter groups (--lr, --critic-lr), gradient norms clipped apart.
  3. The reference is a frozen copy of --model (load_model(trainable=False): bf16 on GPU, not sharded; with
     --lora-rank the policy with its adapters off, no copy); it scores each rollout batch once.
  4. mu's log-probs are those sample() recorded while drawing the tokens, of logits / temperature, used in the
     KL penalty and as the ratio's denominator (no recomputation): keep --temperature 1 for rho_t = 1 at first.
     --vllm --tis-cap C puts the learner's pi_old there and weights each token's policy loss by min(pi_old / mu, C).
  5. GAE with gamma 1, lambda 0.95 (Huang et al.) over response tokens, the value after the last token 0;
     returns = advantages + values; advantages whitened over every valid token of the global rollout batch.
  6. Minibatch j holds the responses whose index is j modulo --minibatches (the same set on 1 or N processes,
     split evenly); each epoch visits them in a new random order, one optimizer step each. Token mean over
     the step (all its micro-batches and processes), as TRL's PPOTrainer; OpenAI's lm-human-preferences
     samples fixed-length responses, where token and per-response means coincide.
  7. Logged per rollout step (mean over its updates): clipfrac (tokens whose gradient the clip removes: A > 0
     and rho > 1 + eps, or A < 0 and rho < 1 - eps), approx_kl (k3 = (rho - 1) - log rho), entropy, value loss
     and clipfrac; per rollout: reward mean, response length, kl_ref (token mean of log mu - log pi_ref), and
     the critic's explained variance for the returns.
  8. Tiny-world defaults: 64 prompts x 4 at lr 1e-4 (tuned on the first world's ID split), 20 rollout steps (each
     costs four updates of policy and critic); on real models use rates like the example's (Huang et al.: 3e-6).
"""

import time
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from common import (Logger, UserError, VLLM, WORLD, add_lora, all_sum, autocast, batches, check_divisible,
                    check_finite, clip_grad, decode_responses, evaluate_splits, fit_context, init_distributed,
                    load_model, load_reference, load_tokenizer, logprobs, micro_batches, parse_args, peak_mem_gb,
                    prompt_ids, rank_slice, read_jsonl, reward, rollout_mismatch, run, sample, save_checkpoint,
                    seed_everything, select_rows, shard_model, warmup_schedule)
from state import Checkpointer


@dataclass
class Args:
    # the allowed values of this file's numeric flags (common.RANGES: those every script shares)
    ranges = {"clip_eps": ">= 0", "value_clip": ">= 0", "kl_coef": ">= 0", "gamma": "[0, 1]", "lam": "[0, 1]",
              "critic_lr": "> 0", "tis_cap": ">= 0"}
    model: str = str(WORLD / "student")
    """causal LM to train (also the reference and the critic's initialisation): a folder or a hub id"""
    data: str = str(WORLD / "prompts.jsonl")
    """training JSONL, one {"prompt", "answer"} per line"""
    eval_data: str = str(WORLD / "test_id.jsonl")
    """in-distribution test JSONL, one {"prompt", "answer"} per line (greedy accuracy)"""
    ood_data: str = str(WORLD / "test_ood.jsonl")
    """out-of-distribution test JSONL, same format"""
    out: str = "runs/ppo"
    """run folder: metrics.jsonl, summary.json and the checkpoint model/"""
    steps: int = 20
    """rollout steps (each followed by epochs x minibatches optimizer steps)"""
    prompts_per_step: int = 64
    """prompts sampled per rollout step, over all processes"""
    group_size: int = 4
    """responses sampled per prompt"""
    minibatches: int = 2
    """optimizer steps per epoch over the rollout batch"""
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
    value_clip: float = 0.2
    """the new value is clipped to within this of the rollout's value in the value loss"""
    kl_coef: float = 0.05
    """beta: weight of the per-token KL penalty to the reference, folded into the reward"""
    gamma: float = 1.0
    """discount of GAE"""
    lam: float = 0.95
    """lambda of GAE"""
    lr: float = 1e-4
    """peak learning rate of the policy"""
    critic_lr: float = 1e-3
    """peak learning rate of the critic"""
    warmup_steps: int = 10
    """linear learning-rate warm-up, in optimizer steps"""
    weight_decay: float = 0.0
    """AdamW weight decay"""
    max_grad_norm: float = 1.0
    """clip the policy's and the critic's gradient norms to this, each"""
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

def gae(rewards, values, mask, gamma, lam):
    """Generalised advantage estimation over right-padded response tokens. rewards, values, mask:
    (B, T); the value after the last valid token is 0. Returns (advantages, returns), (B, T), zero on
    padding: delta_t = r_t + gamma V_{t+1} - V_t, A_t = delta_t + gamma lam A_{t+1}, returns = A + V."""
    advantages = torch.zeros_like(rewards)
    next_value = torch.zeros_like(rewards[:, 0])   # (B,)
    next_advantage = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(rewards.shape[1])):
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        advantages[:, t] = (delta + gamma * lam * next_advantage) * mask[:, t]
        next_value, next_advantage = values[:, t] * mask[:, t], advantages[:, t]
    return advantages, (advantages + values) * mask


def policy_loss(logp, rollout_logp, advantages, mask, clip_eps, n_tokens=None, weight=None):
    """The clipped surrogate (Eq. 7), as a loss. All inputs (B, T); mask 1 on valid tokens; `weight` (like mask;
    --tis-cap) multiplies each token's loss. Sum over valid tokens / n_tokens (default: this batch's valid-token
    count, i.e. the token mean)."""
    ratio = torch.exp((logp - rollout_logp) * mask)                        # (B, T)
    losses = torch.max(-advantages * ratio, -advantages * ratio.clamp(1 - clip_eps, 1 + clip_eps))
    return (losses * mask * (1 if weight is None else weight)).sum() / (mask.sum() if n_tokens is None else n_tokens)


def value_loss(values, old_values, returns, mask, clip, n_tokens=None):
    """0.5 * max((V - R)^2, (clip(V, V_old - c, V_old + c) - R)^2) summed over valid tokens / n_tokens
    (default: their count, the token mean). Inputs (B, T)."""
    clipped = old_values + (values - old_values).clamp(-clip, clip)            # (B, T)
    losses = torch.max((values - returns) ** 2, (clipped - returns) ** 2)
    return 0.5 * (losses * mask).sum() / (mask.sum() if n_tokens is None else n_tokens)


def token_rewards(scores, logp, ref_logp, mask, kl_coef):
    """r_t = -beta (log mu(y_t) - log pi_ref(y_t)), plus the sequence score at the last valid token.
    scores (B,); the others (B, T). Returns (B, T)."""
    rewards = -kl_coef * (logp - ref_logp) * mask
    last = mask.sum(-1).long() - 1                                             # (B,)
    rewards[torch.arange(len(scores)), last] += scores
    return rewards


def masked_mean_var(x, mask, d):
    """Mean and (biased) variance of x over the valid tokens of the global batch, all processes."""
    n = all_sum(mask.sum(), d)
    mean = (all_sum((x * mask).sum(), d) / n).to(x.dtype)
    var = (all_sum(((x - mean) ** 2 * mask).sum(), d) / n).to(x.dtype)
    return mean, var


def whiten(x, mask, d):
    """x shifted and scaled to mean 0, variance 1 over the valid tokens of the global batch; 0 on padding."""
    mean, var = masked_mean_var(x, mask, d)
    return (x - mean) * torch.rsqrt(var + 1e-8) * mask


def explained_variance(values, returns, mask, d):
    """1 - Var(returns - values) / Var(returns) over valid tokens: 1 for a perfect critic, 0 for a constant one."""
    return 1 - (masked_mean_var(returns - values, mask, d)[1] / masked_mean_var(returns, mask, d)[1]).item()


class Critic(nn.Module):
    """V(s_t) at every response position: a causal-LM trunk with a scalar head on its hidden states.
    `lm` is the trunk (the decoder), so shard_model shards its layers as it does the policy's."""

    def __init__(self, trunk):
        super().__init__()
        self.lm = trunk
        self.head = nn.Linear(trunk.config.hidden_size, 1)
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)

    def forward(self, input_ids, attention_mask, prompt_width):
        """(B, T) ids and mask -> (B, R) values of the states that predict the response tokens."""
        position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
        with autocast(input_ids.device):
            h = self.lm(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids).last_hidden_state
            return self.head(h[:, prompt_width - 1:-1]).squeeze(-1).float()


def critic_values(critic, batch):
    """(B, R) values of the batch's response positions (zero on padding)."""
    return critic(batch["input_ids"], batch["attention_mask"], batch["prompt_width"]) * batch["response_mask"]


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
    critic = shard_model(add_lora(Critic(load_model(args.model, d).lm.get_decoder()), args), d,
                         args.gradient_checkpointing)
    reference = load_reference(args, d, model)
    optimizer = torch.optim.AdamW([{"params": model.parameters()},
                                   {"params": critic.parameters(), "lr": args.critic_lr}],
                                  lr=args.lr, weight_decay=args.weight_decay)
    scheduler = warmup_schedule(optimizer, args.warmup_steps)
    ckpt = Checkpointer(args, d, tokenizer, model, optimizer, scheduler, critic=critic)
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
        ref_logp, old_values = [], []
        with torch.no_grad():
            for mb in micro_batches(list(range(len(mine))), args.micro_batch_size):
                ref_logp.append(logprobs(reference, select_rows(rollout, mb)))
                old_values.append(critic_values(critic, select_rows(rollout, mb)))
        ref_logp, old_values = torch.cat(ref_logp), torch.cat(old_values)
        advantages, returns = gae(token_rewards(scores, rollout_logp, ref_logp, mask, args.kl_coef),
                                  old_values, mask, args.gamma, args.lam)
        advantages = whiten(advantages, mask, d)

        # several epochs of minibatch updates, one optimizer step per minibatch
        update_sums = torch.zeros(4, dtype=torch.float64)  # policy loss, value loss, policy and critic grad norms
        token_sums = torch.zeros(4, dtype=torch.float64)   # ratio clipped, k3, entropy, value clipped
        for _ in range(args.epochs):
            for j in torch.randperm(args.minibatches).tolist():
                minibatch = list(range(j, len(mine), args.minibatches))
                # per-process share of the minibatch's token count: the gradient all-reduce averages over processes
                n_tokens = all_sum(mask[minibatch].sum(), d).item() / d.world
                losses = torch.zeros(2, dtype=torch.float64)
                for mb in micro_batches(minibatch, args.micro_batch_size):
                    b = select_rows(rollout, mb)
                    out = model(b["input_ids"], b["attention_mask"], b["prompt_width"], entropy=True)
                    new_values = critic_values(critic, b)
                    m, adv = b["response_mask"], advantages[mb]
                    pg = policy_loss(out["logp"], rollout_logp[mb], adv, m, args.clip_eps, n_tokens,
                                     None if tis is None else tis[mb])
                    vf = value_loss(new_values, old_values[mb], returns[mb], m, args.value_clip, n_tokens)
                    (pg + vf).backward()
                    with torch.no_grad():
                        log_ratio = (out["logp"] - rollout_logp[mb]) * m
                        ratio = log_ratio.exp()
                        losses += torch.stack([pg, vf]).double().cpu()
                        clipped = (ratio > 1 + args.clip_eps) & (adv > 0) | (ratio < 1 - args.clip_eps) & (adv < 0)
                        token_sums += torch.stack([clipped * m, (ratio - 1 - log_ratio) * m,
                                                   out["entropy"] * m,
                                                   ((new_values - old_values[mb]).abs() > args.value_clip) * m]
                                                  ).sum((1, 2)).double().cpu()
                losses = all_sum(losses, d).cpu() / d.world
                check_finite(losses.sum().item(), step, args.out)
                grad_norms = [clip_grad(model, args.max_grad_norm), clip_grad(critic, args.max_grad_norm)]
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                update_sums += torch.cat([losses, torch.tensor(grad_norms, dtype=torch.float64)])
        loss, critic_loss, grad_norm, critic_grad_norm = (update_sums / (args.epochs * args.minibatches)).tolist()
        rollout_tokens = all_sum(mask.sum(), d).item()
        clipfrac, approx_kl, entropy, value_clipfrac = (
            all_sum(token_sums, d) / (args.epochs * rollout_tokens)).tolist()
        n_responses = args.prompts_per_step * args.group_size
        evals = None
        if args.eval_every and step % args.eval_every == 0:  # greedy ID and OOD accuracy, each process its share
            evals = evaluate_splits(model, tokenizer, args, d)
        log.log(step, {"train/loss": loss, "critic/loss": critic_loss, "policy/clipfrac": clipfrac,
                       "policy/approx_kl": approx_kl, "policy/entropy": entropy, "critic/clipfrac": value_clipfrac,
                       "critic/explained_variance": explained_variance(old_values, returns, mask, d),
                       "rollout/reward_mean": all_sum(scores.sum(), d).item() / n_responses,
                       "rollout/response_length": rollout_tokens / n_responses,
                       "rollout/truncated": all_sum(rollout["truncated"].sum(), d).item() / n_responses,
                       "rollout/kl_ref": all_sum(((rollout_logp - ref_logp) * mask).sum(), d).item()
                       / rollout_tokens,
                       "train/grad_norm": grad_norm, "critic/grad_norm": critic_grad_norm,
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
    log.summary(method="ppo", steps=args.steps, seconds=round(seconds, 1), before=before, after=after,
                peak_mem_gb=round(peak_mem_gb(d.device), 3))


if __name__ == "__main__":
    run(main)
