"""Trust Region On-Policy Distillation, TrOPD (Xing, Wang, Gao, Li, Tang 2026, arXiv 2606.01249).

On-policy distillation (opd.py) with two changes. (1) A trust region per sampled token: the K1 reward
log(pi_T/pi_S) explodes where the teacher gives a student token almost no mass, so each token is trusted with
probability min(pi_T/pi_S, 1) (the speculative-decoding acceptance test); trusted tokens keep the OPD advantage,
untrusted ones ("outliers") get a bounded one. (2) Off-policy guidance: one extra sample per prompt starts from a
teacher response's prefix, shrinking on a cosine schedule to nothing. Objective (the paper's Eq. 13):
  J = - 1[y~pi_S] (1-M) sum_{v in TopK(pi_T)} p_T,v log(p_T,v / p_S,v)     (outliers, top-K forward KL)
      - 1[y~pi_S] M log(pi_S / pi_T)                                     (trusted: OPD)
      - beta 1[y~pi_T] log(pi_T / pi_S)                                  (teacher prefix tokens)
maximised with the importance-sampled REINFORCE loss of opd.py for the trusted tokens, and the direct
gradient of the outlier KL (through the student's top-K log-probs) and of the prefix term.

Run:
  python tropd.py                                     # tiny world (world/teacher_large), CPU, a few minutes
  python tropd.py --model Qwen/Qwen3-1.7B-Base --teacher Qwen/Qwen3-8B --data prompts.jsonl \
      --eval-data test.jsonl --ood-data ood.jsonl --max-new-tokens 1024 --lr 5e-6 --offload-teacher
  python tropd.py --gpus 8 ...                        # or: torchrun --nproc-per-node 8 tropd.py ...

Implementation details (as opd.py's, plus; most come from secondary write-ups, each an option):
  1. Data: as opd.py's, plus optional `teacher_responses`: the guided prefix comes from the first (in the tiny
     world, teacher_large's greedy response); prompts without one get a teacher sample at the step (temp. 1).
  2. Trust: M_t ~ Bernoulli(min(pi_T(y_t)/mu(y_t), 1)), mu recorded while sampling; one seeded uniform per token
     of the global batch (1 and N processes agree). Not the write-ups' deterministic test (pi_T >= pi_S).
  3. Outliers (`--outlier`): `fkl` (default) adds Eq. 13's forward KL from the teacher's top-K (K=64, --top-k;
     the tiny world's whole vocabulary) to the student, both renormalised over the K, with gradient through the
     student's K log-probs; `mask`: nothing; `clip`: the advantage max(log(pi_T/pi_S), --clip-tau); `fkl-advantage`:
     minus that KL, detached, as the advantage (the reading before issue 31: it only pushes the outlier down).
  4. Guidance: each prompt adds one sample whose first floor((1 + cos(pi t / T)) / 2 * L) tokens are the teacher
     response's (L with EOS; t the step from 0, T = --guide-steps): all of it at step 1, none after T steps.
  5. The prefix term, read from Eq. 13: the write-ups give it as an "advantage beta (log pi_S - log pi_T)", but
     the tokens are the teacher's, and the gradient of -beta log(pi_T/pi_S) for fixed y ~ pi_T is beta grad log
     pi_S(y_t); so prefix tokens get the direct loss -beta log pi_S(y_t), beta = 0.001, per token.
  6. One token mean over all the step's response tokens (on-policy and prefix) for all three terms, as the
     write-ups'. The teacher's forward also returns its top-K ids; the student's at them: its training forward.
  7. Logged: trust/trusted_fraction, trust/outlier_advantage and trust/outlier_kl (over outliers; the top-K KL
     whatever --outlier is), guide/prefix_fraction (of teacher tokens), opd.py's metrics on the student's samples.
  8. Tiny world: lr 1e-4 and 80 steps as opd.py, one budget side by side (--guide-steps 80); the paper uses 5e-6
     at scale, against OPD, EOPD and REOPOLD (only OPD is reproduced here).
"""

import math
import time
from dataclasses import dataclass
from typing import Literal

import torch

from common import (Logger, VLLM, WORLD, add_lora, all_max, all_sum, batches, check_divisible,
                    check_finite, check_same_tokenizer, clip_grad, decode_responses, evaluate, evaluate_splits,
                    fit_context, free_memory, init_distributed, load_model, load_tokenizer, pad_batch, parse_args,
                    peak_mem_gb, prompt_ids, rank_slice, read_jsonl, response_ids, reward, rollout_mismatch, run,
                    sample, save_checkpoint, seed_everything, select_rows, shard_model, warmup_schedule)
from state import Checkpointer


@dataclass
class Args:
    # the allowed values of this file's numeric flags (common.RANGES: those every script shares)
    ranges = {"top_k": ">= 1", "guide_steps": ">= 0", "prefix_beta": ">= 0", "clip_tau": "<= 0"}
    model: str = str(WORLD / "student")
    """student causal LM to train: a local folder or a Hugging Face hub id"""
    teacher: str = str(WORLD / "teacher_large")
    """teacher causal LM (frozen; must share the student's tokenizer)"""
    data: str = str(WORLD / "prompts.jsonl")
    """training JSONL, one {"prompt", "answer", "teacher_responses"?} per line (the answer only for the logged
    sample accuracy; the first teacher response, if any, is the guided sample's prefix)"""
    eval_data: str = str(WORLD / "test_id.jsonl")
    """in-distribution test JSONL, one {"prompt", "answer"} per line (greedy accuracy)"""
    ood_data: str = str(WORLD / "test_ood.jsonl")
    """out-of-distribution test JSONL, same format"""
    out: str = "runs/tropd"
    """run folder: metrics.jsonl, summary.json and the checkpoint model/"""
    steps: int = 80
    """optimizer steps (one rollout batch each)"""
    prompts_per_step: int = 64
    """prompts sampled per step, over all processes"""
    group_size: int = 4
    """on-policy responses sampled per prompt (plus one guided sample)"""
    micro_batch_size: int = 160
    """sequences per forward/backward on one process (gradient accumulation fills the rest)"""
    generation_batch_size: int = 0
    """sequences one generation call holds on one process, a bound on the KV cache (0: the whole rollout at
    once); the responses are the same"""
    vllm: bool = False
    """sample the rollouts with a vLLM engine in this process and on its GPU, the policy's weights pushed into
    it before each rollout (README: vLLM)"""
    vllm_memory: float = 0.3
    """the share of the GPU's memory the vLLM engine takes, for its weights and KV cache"""
    max_new_tokens: int = 48
    """longest sampled response (and at evaluation)"""
    max_prompt_length: int = 0
    """longest prompt kept from --data, in tokens (0: any that leaves --max-new-tokens in the model's context)"""
    lr: float = 1e-4
    """peak learning rate of AdamW"""
    warmup_steps: int = 10
    """linear learning-rate warm-up"""
    weight_decay: float = 0.0
    """AdamW weight decay"""
    max_grad_norm: float = 1.0
    """clip the global gradient norm to this"""
    outlier: Literal["fkl", "fkl-advantage", "mask", "clip"] = "fkl"
    """what untrusted tokens get: fkl (the top-K forward KL as a loss, Eq. 13), fkl-advantage (minus that KL,
    detached, as the sampled token's advantage: this file's reading before issue 31), mask (nothing) or clip (the
    advantage max(log u, clip_tau))"""
    top_k: int = 64
    """K of the teacher's top-K in the outlier forward KL"""
    clip_tau: float = -2.0
    """floor of log(pi_T/pi_S) for --outlier clip"""
    guide_steps: int = 80
    """T: steps over which the guided prefix shrinks from the whole teacher response to nothing"""
    prefix_beta: float = 0.001
    """beta: weight of the forward-KL (NLL) term on the teacher's prefix tokens"""
    offload_teacher: bool = False
    """keep the teacher on the CPU and move it to the GPU only to score the rollouts"""
    seed: int = 1
    """seed of prompt order, sampling and the trust draws"""
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

def opd_advantage(rollout_logp, teacher_logp):
    """Per-token K1 reverse-KL reward, used as the advantage: log pi_T - log mu. Both (B, R); (B, R)."""
    return teacher_logp - rollout_logp


def trust_mask(teacher_logp, rollout_logp, generator=None, uniform=None):
    """Bernoulli(min(pi_T / mu, 1)) per token, as float (B, R): 1 = trusted (mu: the student as it
    sampled, the paper's pi_S). The draws come from
    `generator`, or are the given `uniform` (B, R) in [0, 1) (the loop passes its share of the global
    batch's draws)."""
    p = torch.exp(teacher_logp - rollout_logp).clamp(max=1.0)
    if uniform is None:
        uniform = torch.rand(p.shape, generator=generator, device=p.device)
    return (uniform < p).float()


def prefix_length(step, total_steps, length):
    """Tokens of the teacher response that prefix the guided sample: cosine from `length` at step 0
    to 0 at `total_steps`, and 0 after."""
    if step >= total_steps:
        return 0
    return math.floor((1 + math.cos(math.pi * step / total_steps)) / 2 * length)


def topk_forward_kl(teacher_topk_logp, student_logp_at_teacher_topk):
    """Eq. 13's outlier term: KL(p_T || p_S) over the teacher's top-K ids, both renormalised over those K.
    Inputs (B, R, K), the student's with gradient; returns (B, R), >= 0, differentiable through the student's
    K log-probs (d KL / d student logit_v = p_S,v - p_T,v over the K)."""
    log_t = torch.log_softmax(teacher_topk_logp, -1)
    log_s = torch.log_softmax(student_logp_at_teacher_topk, -1)
    return (log_t.exp() * (log_t - log_s)).sum(-1)


def tropd_advantage(teacher_logp, rollout_logp, trusted, outlier, outlier_kind, clip_tau):
    """Trusted tokens: the OPD advantage. Outliers: 0 (fkl: the KL is a loss term, see tropd_loss; and mask),
    -sg(outlier) (fkl-advantage; `outlier` the (B, R) top-K forward KL), or the OPD advantage floored at
    clip_tau (clip). All (B, R)."""
    adv = opd_advantage(rollout_logp, teacher_logp)
    alt = {"fkl": torch.zeros_like(adv), "mask": torch.zeros_like(adv), "clip": adv.clamp(min=clip_tau),
           "fkl-advantage": -outlier.detach() if outlier is not None else None}[outlier_kind]
    return torch.where(trusted.bool(), adv, alt)


def tropd_loss(logp, rollout_logp, advantages, policy_mask, prefix_mask, beta, n_tokens=None, outlier_kl=None):
    """Minus Eq. 13, summed over the step's tokens / n_tokens (default: the count of both masks' tokens, the
    token mean). All (B, R). The student's own tokens: -exp(logp - rollout_logp) * sg(advantages) (importance-
    sampled REINFORCE of the OPD terms); the outliers (with --outlier fkl): + outlier_kl, the top-K forward KL
    with gradient, zero off the outlier tokens; the teacher's prefix tokens: -beta * logp (the last term)."""
    ratio = torch.exp(logp - rollout_logp)                                # (B, R)
    n_tokens = (policy_mask + prefix_mask).sum() if n_tokens is None else n_tokens
    kl = 0.0 if outlier_kl is None else outlier_kl.sum()
    return (kl - (ratio * advantages.detach() * policy_mask).sum() - beta * (logp * prefix_mask).sum()) / n_tokens


# ----------------------------------------------------------------------------- training

@torch.no_grad()
def teacher_logprobs(teacher, batch, micro_batch_size, d, offload, top_k):
    """log pi_T of the batch's response tokens (B, R), and the teacher's top-k ids and log-probs
    (B, R, k), micro-batch by micro-batch."""
    if offload:
        teacher.to(d.device)
    B = batch["input_ids"].shape[0]
    parts = []
    for i in range(0, B, micro_batch_size):
        mb = select_rows(batch, slice(i, i + micro_batch_size))
        parts.append(teacher(mb["input_ids"], mb["attention_mask"], mb["prompt_width"], topk=top_k))
    if offload:
        free_memory(teacher)
    return {k: torch.cat([p[k] for p in parts]) for k in ("logp", "topk_ids", "topk_logp")}


def guided_rows(rollout, prefixes, eos_id):
    """Assemble the training rows after sampling: row i is its prefix (a teacher-response prefix for
    guided samples, [] for on-policy ones), then the student's continuation (none if the prefix
    already ends the response). Returns per-row response ids, sampler log-probs (0 on prefix
    tokens) and prefix lengths."""
    W = rollout["prompt_width"]
    responses, rollout_logp = [], []
    for ids, m, lp, prefix in zip(rollout["input_ids"][:, W:], rollout["response_mask"], rollout["logp"], prefixes):
        n = int(m.sum())
        continuation, cont_logp = ids[:n].tolist(), lp[:n].tolist()
        if prefix and prefix[-1] == eos_id:
            continuation, cont_logp = [], []
        responses.append(prefix + continuation)
        rollout_logp.append([0.0] * len(prefix) + cont_logp)
    return responses, rollout_logp, [len(p) for p in prefixes]


def main():
    args = parse_args(Args)
    d = init_distributed(args.gpus)
    check_divisible(args.prompts_per_step, 1, d, "prompts_per_step")
    args.micro_batch_size = check_divisible(args.prompts_per_step * (args.group_size + 1), args.micro_batch_size, d)
    seed_everything(args.seed)
    tokenizer = load_tokenizer(args.model)
    check_same_tokenizer(tokenizer, load_tokenizer(args.teacher), args.teacher)
    # the guided sample continues a teacher prefix (from the data, or sampled: up to max_new_tokens + EOS)
    rows = fit_context(read_jsonl(args.data, ("prompt", "answer"), optional=("teacher_responses",)), tokenizer,
                       args, cut=("teacher_responses",), reserve=args.max_new_tokens + 1)
    model = shard_model(add_lora(load_model(args.model, d), args), d, args.gradient_checkpointing)
    engine = VLLM(args, d) if args.vllm else None  # --vllm: the rollouts' sampler
    teacher = load_model(args.teacher, d, trainable=False)
    top_k = min(args.top_k, model.lm.get_output_embeddings().weight.shape[0])
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    scheduler = warmup_schedule(optimizer, args.warmup_steps)
    trust_draws = torch.Generator(d.device).manual_seed(args.seed)  # same on every process: global batch
    ckpt = Checkpointer(args, d, tokenizer, model, optimizer, scheduler, trust_draws=trust_draws)
    log = Logger(args, d, ckpt)
    log.banner(args.prompts_per_step * (args.group_size + 1), args.micro_batch_size, "sequences")

    teacher_acc = ckpt.remember("teacher_acc", lambda: evaluate(teacher, tokenizer, args.eval_data, d,
                                                                 args.max_new_tokens)[0])
    if args.offload_teacher:
        free_memory(teacher)
    before = ckpt.remember("before", lambda: evaluate_splits(model, tokenizer, args, d))
    log.print(f"teacher accuracy {teacher_acc:.3f} (for reference)")
    log.evaluation("before training", before)

    plan = batches(len(rows), args.prompts_per_step, args.steps, args.seed)
    start_step, start, evals = ckpt.resume(log), time.time(), None
    for step, indices in enumerate(plan[start_step:], start_step + 1):
        mine = [rows[i] for i in rank_slice(indices, d)]
        prompts = [prompt_ids(tokenizer, r["prompt"]) for r in mine]
        # the guided samples' prefixes: the first teacher response, or one the teacher samples now
        responses = [(r.get("teacher_responses") or [None])[0] for r in mine]
        missing = [j for j, t in enumerate(responses) if t is None]
        if all_sum(len(missing), d).item():  # every process samples (a collective), some maybe a dummy row
            out = sample(teacher, tokenizer, [prompts[j] for j in missing] or prompts[:1], d, args.max_new_tokens)
            for j, text in zip(missing, decode_responses(tokenizer, out)):
                responses[j] = text
        teacher_ids = [response_ids(tokenizer, t) for t in responses]
        prefixes = [ids[:prefix_length(step - 1, args.guide_steps, len(ids))] for ids in teacher_ids]

        # per prompt: group_size on-policy samples, then the guided one (rows stay grouped by prompt,
        # so each process's rows are a contiguous block of the global batch)
        G = args.group_size + 1
        row_prompts = [p for p in prompts for _ in range(G)]
        row_prefixes = [prefix if i == G - 1 else [] for prefix in prefixes for i in range(G)]
        on_policy = [i % G < G - 1 for i in range(len(row_prompts))]
        rollout = sample(model, tokenizer, [p + prefix for p, prefix in zip(row_prompts, row_prefixes)], d,
                         args.max_new_tokens, micro_batch_size=args.generation_batch_size, engine=engine)
        rewards = [reward(text, mine[i // G]["answer"])
                   for i, text in enumerate(decode_responses(tokenizer, rollout)) if on_policy[i]]
        train_responses, train_logps, prefix_lens = guided_rows(rollout, row_prefixes, tokenizer.eos_token_id)
        batch = pad_batch(row_prompts, train_responses, tokenizer.pad_token_id, d.device)
        B, R = batch["response_mask"].shape
        rollout_logp = torch.tensor([lp + [0.0] * (R - len(lp)) for lp in train_logps], device=d.device)  # (B, R)
        prefix_mask = (torch.arange(R, device=d.device) < torch.tensor(prefix_lens, device=d.device)[:, None]).float()
        policy_mask = batch["response_mask"] - prefix_mask                   # the student's own tokens
        teacher_out = teacher_logprobs(teacher, batch, args.micro_batch_size, d, args.offload_teacher, top_k)
        teacher_logp = teacher_out["logp"] * batch["response_mask"]
        # trust draws: one uniform per token of the GLOBAL batch, this process's block
        R_max = int(all_max(R, d).item())
        uniform = torch.rand(d.world * B, R_max, generator=trust_draws, device=d.device)[d.rank * B:(d.rank + 1) * B, :R]
        trusted = trust_mask(teacher_logp, rollout_logp, uniform=uniform) * policy_mask
        # per-process share of the step's token count: the gradient all-reduce averages over processes
        n_tokens = all_sum(batch["response_mask"].sum(), d).item() / d.world
        outliers = (1 - trusted) * policy_mask                              # (B, R) the untrusted student tokens
        sums = torch.zeros(3, dtype=torch.float64)  # loss, outlier advantage sum, outlier KL sum
        for i in range(0, B, args.micro_batch_size):
            part = slice(i, i + args.micro_batch_size)
            mb = select_rows(batch, part)
            student = model(mb["input_ids"], mb["attention_mask"], mb["prompt_width"], gather=teacher_out["topk_ids"][part])
            kl = topk_forward_kl(teacher_out["topk_logp"][part], student["gather_logp"]) * outliers[part]  # (b, R)
            advantages = tropd_advantage(teacher_logp[part], rollout_logp[part], trusted[part], kl, args.outlier,
                                         args.clip_tau) * policy_mask[part]
            loss = tropd_loss(student["logp"], rollout_logp[part], advantages, policy_mask[part], prefix_mask[part],
                              args.prefix_beta, n_tokens, kl if args.outlier == "fkl" else None)
            loss.backward()
            sums += torch.tensor([loss.item(), (advantages * outliers[part]).sum().item(), kl.sum().item()],
                                 dtype=torch.float64)
        loss = all_sum(sums[0], d).item() / d.world
        check_finite(loss, step, args.out)
        grad_norm = clip_grad(model, args.max_grad_norm)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        n_seqs = args.prompts_per_step * args.group_size
        stats = all_sum(torch.stack([((rollout_logp - teacher_logp) * policy_mask).sum(), policy_mask.sum(),
                                     trusted.sum(), sums[1].to(d.device), sums[2].to(d.device), prefix_mask.sum(),
                                     torch.tensor(float(sum(map(len, teacher_ids))), device=d.device),
                                     torch.tensor(sum(rewards), device=d.device),
                                     batch["response_mask"][torch.tensor(on_policy, device=d.device)].sum(),
                                     rollout["truncated"][torch.tensor(on_policy, device=d.device)].sum().float()]), d).tolist()
        (rkl, n_policy_tokens, n_trusted, outlier_sum, outlier_kl, n_prefix, n_teacher, reward_sum, policy_length,
         truncated) = stats
        evals = None
        if args.eval_every and step % args.eval_every == 0:  # greedy ID and OOD accuracy, each process its share
            evals = evaluate_splits(model, tokenizer, args, d)
        log.log(step, {"train/loss": loss, "distill/reverse_kl": rkl / n_policy_tokens,
                       "trust/trusted_fraction": n_trusted / n_policy_tokens,
                       "trust/outlier_advantage": outlier_sum / max(n_policy_tokens - n_trusted, 1),
                       "trust/outlier_kl": outlier_kl / max(n_policy_tokens - n_trusted, 1),
                       "guide/prefix_fraction": n_prefix / n_teacher,
                       "rollout/reward_mean": reward_sum / n_seqs, "rollout/response_length": policy_length / n_seqs,
                       "rollout/truncated": truncated / n_seqs,
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
    log.summary(method="tropd", steps=args.steps, seconds=round(seconds, 1), before=before, after=after,
                peak_mem_gb=round(peak_mem_gb(d.device), 3), teacher_accuracy=teacher_acc)


if __name__ == "__main__":
    run(main)
