"""OPD+: on-policy distillation with an f-divergence and its unbiased advantage (Zhao, Chen, Lin,
Winata, Yao, Tang 2026, "OPD+: Rethinking the Advantage Design for On-Policy Distillation",
arXiv 2606.01039). The descendant of opd.py: `diff opd.py opd_plus.py` is the paper's change.

Objective: minimise, on the student's own samples, the per-token f-divergence
  D_f(pi_T || pi_theta)(s_t) = E_{y_t ~ pi_theta}[ f(u_t) ],  u_t = pi_T(y_t|s_t) / pi_theta(y_t|s_t),
for a convex f with f(1) = 0. Its gradient is -E[ w_f(u) grad log pi_theta ] with the corrected
advantage w_f(u) = -f(u) + u f'(u): the u f'(u) term comes from u's own dependence on pi_theta,
which the stop-gradient advantage -f(u) of OPD drops. The loss is opd.py's importance-sampled
REINFORCE with w_f in place of the K1 reward:
  L = -(1 / N) * sum over response tokens of exp(log pi_theta - log mu) * sg(w_f(u_t)).

  --divergence   f(u)                                  w_f(u) (OPD+)      -f(u) (--stop-gradient)
  rkl            -ln u             (reverse KL)        ln u - 1           ln u  (= opd.py)
  fkl            u ln u            (forward KL)        u                  -u ln u
  jsd            1/2[u ln u - (1+u) ln((1+u)/2)]       1/2 ln((1+u)/2)    -f(u)
  tv             1/2 |u - 1|       (total variation)   1/2 sign(u - 1)    -f(u)
  chi2           (u - 1)^2         (Pearson chi^2)     u^2 - 1            -f(u)

Run:
  python opd_plus.py                                  # tiny world, jsd, CPU, a few minutes
  python opd_plus.py --divergence fkl --stop-gradient # the paper's biased baseline for the same f
  python opd_plus.py --model Qwen/Qwen3-1.7B --teacher Qwen/Qwen3-8B --data prompts.jsonl \
      --eval-data test.jsonl --ood-data ood.jsonl --max-new-tokens 1024 --offload-teacher
  python opd_plus.py --gpus 8 ...                     # or: torchrun --nproc-per-node 8 opd_plus.py ...

Implementation details (as opd.py's: data, rollouts, teacher, token mean over the step; plus):
  1. u takes the log-probs log mu recorded while sampling (mu is pi_theta then). Each token's advantage is its
     own w_f(u_t) (discount 0), no baseline, no normalisation (the paper does not state its aggregation).
  2. Logged: distill/reverse_kl (K1, as opd.py, comparable across divergences), distill/f_divergence (the
     token mean of f(u): the estimate of the divergence trained on), and opd.py's other metrics.
  3. log u is clipped to [-6, 6] (--log-u-clip) before f and w_f: forward KL's advantage u is unbounded (the
     clip keeps it under e^6 = 403), and so is chi2's u^2. The clip is the one difference between
     `--divergence rkl --stop-gradient` and opd.py.
  4. rkl, fkl and jsd are the paper's; tv and chi2 are extensions (unverified as its own). The formulas are
     restated above in full; the paper's equation numbers are not cited, as only its abstract was available.
  5. Tiny-world choices: jsd and lr 1e-4 (as opd.py), picked on the first tiny world (answers of 2-4 tokens),
     where jsd gave the best ID accuracy and, with --stop-gradient, fkl and jsd collapsed, as the paper
     reports at scale; 80 steps as opd.py.
"""

import math
import time
from dataclasses import dataclass
from typing import Literal

import torch

from common import (Logger, VLLM, WORLD, add_lora, all_sum, batches, check_divisible, check_finite,
                    check_same_tokenizer, clip_grad, decode_responses, evaluate, evaluate_splits, fit_context,
                    free_memory, init_distributed, load_model, load_tokenizer, logprobs, parse_args, peak_mem_gb,
                    prompt_ids, rank_slice, read_jsonl, reward, rollout_mismatch, run, sample, save_checkpoint,
                    seed_everything, select_rows, shard_model, warmup_schedule)
from state import Checkpointer


@dataclass
class Args:
    # the allowed values of this file's numeric flags (common.RANGES: those every script shares)
    ranges = {"log_u_clip": "> 0"}
    model: str = str(WORLD / "student")
    """student causal LM to train: a local folder or a Hugging Face hub id"""
    teacher: str = str(WORLD / "teacher_large")
    """teacher causal LM (frozen; must share the student's tokenizer)"""
    data: str = str(WORLD / "prompts.jsonl")
    """training JSONL, one {"prompt", "answer"} per line (the answer only for the logged sample accuracy)"""
    eval_data: str = str(WORLD / "test_id.jsonl")
    """in-distribution test JSONL, one {"prompt", "answer"} per line (greedy accuracy)"""
    ood_data: str = str(WORLD / "test_ood.jsonl")
    """out-of-distribution test JSONL, same format"""
    out: str = "runs/opd_plus"
    """run folder: metrics.jsonl, summary.json and the checkpoint model/"""
    steps: int = 80
    """optimizer steps (one rollout batch each)"""
    prompts_per_step: int = 64
    """prompts sampled per step, over all processes"""
    group_size: int = 4
    """responses sampled per prompt"""
    micro_batch_size: int = 128
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
    divergence: Literal["rkl", "fkl", "jsd", "tv", "chi2"] = "jsd"
    """the f-divergence D_f(teacher || student) to minimise: rkl, fkl, jsd, tv or chi2"""
    stop_gradient: bool = False
    """use OPD's biased stop-gradient advantage -f(u) instead of OPD+'s w_f(u) = -f(u) + u f'(u)"""
    log_u_clip: float = 6.0
    """clip log u = log pi_T - log mu to [-this, this] before f and w_f"""
    offload_teacher: bool = False
    """keep the teacher on the CPU and move it to the GPU only to score the rollouts"""
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

# name: (f(u), w_f(u) = -f(u) + u f'(u)), each as a function of (log u, u)
DIVERGENCES = {
    "rkl": (lambda log_u, u: -log_u, lambda log_u, u: log_u - 1),
    "fkl": (lambda log_u, u: u * log_u, lambda log_u, u: u),
    "jsd": (lambda log_u, u: 0.5 * (u * log_u - (1 + u) * (torch.log1p(u) - math.log(2))),
            lambda log_u, u: 0.5 * (torch.log1p(u) - math.log(2))),
    "tv": (lambda log_u, u: 0.5 * (u - 1).abs(), lambda log_u, u: 0.5 * torch.sign(log_u)),
    "chi2": (lambda log_u, u: (u - 1) ** 2, lambda log_u, u: u ** 2 - 1),
}


def f_advantage(log_u, divergence, stop_gradient=False):
    """Per-token advantage from log u = log pi_T - log pi_theta, (B, R) -> (B, R): OPD+'s corrected
    w_f(u) = -f(u) + u f'(u), or with stop_gradient OPD's -f(u) (biased unless f = -ln u)."""
    f, w = DIVERGENCES[divergence]
    u = log_u.exp()
    return -f(log_u, u) if stop_gradient else w(log_u, u)


def opd_loss(logp, rollout_logp, advantages, mask, n_tokens=None):
    """Importance-sampled REINFORCE: -exp(logp - rollout_logp) * sg(advantages) summed over `mask`'s
    tokens / n_tokens (default: their count, the token mean). logp: (B, R) with gradient;
    rollout_logp, advantages, mask: (B, R). Returns a scalar."""
    ratio = torch.exp(logp - rollout_logp)                                # (B, R)
    return -(ratio * advantages.detach() * mask).sum() / (mask.sum() if n_tokens is None else n_tokens)


# ----------------------------------------------------------------------------- training

@torch.no_grad()
def teacher_logprobs(teacher, rollout, micro_batch_size, d, offload):
    """(B, R) log pi_T of the sampled response tokens (zero on padding), micro-batch by micro-batch."""
    if offload:
        teacher.to(d.device)
    B = rollout["input_ids"].shape[0]
    out = torch.cat([logprobs(teacher, select_rows(rollout, slice(i, i + micro_batch_size))).float()
                     for i in range(0, B, micro_batch_size)])
    if offload:
        free_memory(teacher)
    return out


def main():
    args = parse_args(Args)
    d = init_distributed(args.gpus)
    check_divisible(args.prompts_per_step, 1, d, "prompts_per_step")
    args.micro_batch_size = check_divisible(args.prompts_per_step * args.group_size, args.micro_batch_size, d)
    seed_everything(args.seed)
    tokenizer = load_tokenizer(args.model)
    check_same_tokenizer(tokenizer, load_tokenizer(args.teacher), args.teacher)
    rows = fit_context(read_jsonl(args.data, ("prompt", "answer")), tokenizer, args)
    model = shard_model(add_lora(load_model(args.model, d), args), d, args.gradient_checkpointing)
    engine = VLLM(args, d) if args.vllm else None  # --vllm: the rollouts' sampler
    teacher = load_model(args.teacher, d, trainable=False)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    scheduler = warmup_schedule(optimizer, args.warmup_steps)
    ckpt = Checkpointer(args, d, tokenizer, model, optimizer, scheduler)
    log = Logger(args, d, ckpt)
    log.banner(args.prompts_per_step * args.group_size, args.micro_batch_size, "sequences")

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
        mine = [rows[i] for i in rank_slice(indices, d) for _ in range(args.group_size)]
        rollout = sample(model, tokenizer, [prompt_ids(tokenizer, r["prompt"]) for r in mine], d, args.max_new_tokens,
                         micro_batch_size=args.generation_batch_size, engine=engine)
        rewards = [reward(text, r["answer"]) for text, r in zip(decode_responses(tokenizer, rollout), mine)]
        mask, rollout_logp = rollout["response_mask"], rollout["logp"]  # (B, R) each
        teacher_logp = teacher_logprobs(teacher, rollout, args.micro_batch_size, d, args.offload_teacher)
        log_u = (teacher_logp - rollout_logp).clamp(-args.log_u_clip, args.log_u_clip)  # (B, R)
        advantages = f_advantage(log_u, args.divergence, args.stop_gradient) * mask        # (B, R)
        # per-process share of the step's token count: the gradient all-reduce averages over processes
        n_tokens = all_sum(mask.sum(), d).item() / d.world
        loss_sum = 0.0
        for i in range(0, len(mine), args.micro_batch_size):
            mb = select_rows(rollout, slice(i, i + args.micro_batch_size))
            loss = opd_loss(logprobs(model, mb), mb["logp"], advantages[i:i + args.micro_batch_size],
                            mb["response_mask"], n_tokens)
            loss.backward()
            loss_sum += loss.item()
        loss = all_sum(loss_sum, d).item() / d.world
        check_finite(loss, step, args.out)
        grad_norm = clip_grad(model, args.max_grad_norm)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        n_seqs = args.prompts_per_step * args.group_size
        sums = all_sum(torch.stack([((rollout_logp - teacher_logp) * mask).sum(),
                                    -(f_advantage(log_u, args.divergence, stop_gradient=True) * mask).sum(),
                                    torch.tensor(sum(rewards), device=mask.device)]), d)
        evals = None
        if args.eval_every and step % args.eval_every == 0:  # greedy ID and OOD accuracy, each process its share
            evals = evaluate_splits(model, tokenizer, args, d)
        log.log(step, {"train/loss": loss, "distill/reverse_kl": sums[0].item() / (n_tokens * d.world),
                       "distill/f_divergence": sums[1].item() / (n_tokens * d.world),
                       "rollout/reward_mean": sums[2].item() / n_seqs,
                       "rollout/response_length": n_tokens * d.world / n_seqs,
                       "rollout/truncated": all_sum(rollout["truncated"].sum(), d).item() / n_seqs,
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
    log.summary(method="opd_plus", steps=args.steps, seconds=round(seconds, 1), before=before, after=after,
                peak_mem_gb=round(peak_mem_gb(d.device), 3), teacher_accuracy=teacher_acc,
                divergence=args.divergence, stop_gradient=args.stop_gradient)


if __name__ == "__main__":
    run(main)
