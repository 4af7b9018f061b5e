"""On-policy distillation (Agarwal et al. 2023, GKD, arXiv 2306.13649; Gu et al., MiniLLM; the
Thinking Machines on-policy distillation recipe, 2025; Qwen3 report section 4.5).

Objective: minimise the per-token reverse KL from the student to the teacher on the student's own
samples. The student draws y ~ mu (itself, at sampling time), the teacher scores the same tokens,
and each token gets the K1 reward r_t = log pi_T(y_t|s_t) - log mu(y_t|s_t), detached, used as its
advantage in the importance-sampled REINFORCE loss
  L = -(1 / N) * sum over response tokens of exp(log pi_theta(y_t|s_t) - log mu(y_t|s_t)) * sg(r_t),
N the number of response tokens in the whole optimizer step (all micro-batches, all processes).

Run:
  python opd.py                                       # tiny world (world/teacher_large), CPU, a few minutes
  python opd.py --model Qwen/Qwen3-1.7B --teacher Qwen/Qwen3-8B --data prompts.jsonl \
      --eval-data test.jsonl --ood-data ood.jsonl --max-new-tokens 1024 --offload-teacher
  python opd.py --gpus 8 ...                          # or: torchrun --nproc-per-node 8 opd.py ...

Implementation details:
  1. Data: JSONL with `prompt` and `answer`. The answer is used only to log the accuracy of the
     samples (rollout/reward_mean); the loss sees nothing but the teacher's log-probs.
  2. Rollouts: `group_size` samples per prompt (4, the recipe's), at temperature 1 from the current
     student, whose log-probs log mu are recorded as each token is drawn. One optimizer step per
     rollout batch, so exp(log pi_theta - log mu) is 1 in value (up to numerics) and the loss's
     gradient is the REINFORCE gradient sum_t r_t grad log pi_theta(y_t|s_t). Sampling is at
     temperature 1 only: the reward and the importance ratio take the sampler to be the student itself.
  3. The teacher scores the sampled tokens in one no-grad forward (micro-batch by micro-batch). It
     never trains: frozen, bf16 on GPU, not sharded (each process holds a whole copy), and with
     --offload-teacher it waits on the CPU between uses. Teacher and student must share the
     tokenizer (vocabulary and special ids): the run refuses a teacher whose tokenizer differs.
  4. Each token's advantage is its own K1 reward (discount 0, the recipe's default): no sum over the later
     tokens, no baseline, no normalisation. The loss is the step's token mean (each micro-batch divides by
     the step's token count), the same for any micro-batch size and process count. The recipe's Tinker loss
     (importance_sampling) is a SUM over the batch's tokens: the same direction, a step larger by the count.
  5. Logged: distill/reverse_kl (the K1 estimate of the per-token reverse KL, the mean of
     log mu - log pi_T over response tokens; train/loss equals it while the ratio is 1),
     rollout/reward_mean (accuracy of the samples), rollout/response_length. The teacher's greedy
     accuracy is printed once at start-up, for reference, and written to summary.json.
  6. Tiny-world choices: lr 1e-4, picked on the tiny world (higher rates destabilise it); real models
     want smaller rates. 80 steps of 64 prompts x 4, within minutes on 2 cores, by when the samples'
     accuracy had levelled.
"""

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
    out: str = "runs/opd"
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

def opd_advantage(rollout_logp, teacher_logp):
    """Per-token K1 reverse-KL reward, used as the advantage: log pi_T - log mu. Both (B, R); (B, R)."""
    return teacher_logp - rollout_logp


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
        advantages = opd_advantage(rollout_logp, teacher_logp) * mask       # (B, R)
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
                                    torch.tensor(sum(rewards), device=mask.device)]), d)
        evals = None
        if args.eval_every and step % args.eval_every == 0:  # greedy ID and OOD accuracy, each process its share
            evals = evaluate_splits(model, tokenizer, args, d)
        log.log(step, {"train/loss": loss, "distill/reverse_kl": sums[0].item() / (n_tokens * d.world),
                       "rollout/reward_mean": sums[1].item() / n_seqs,
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
    log.summary(method="opd", steps=args.steps, seconds=round(seconds, 1), before=before, after=after,
                peak_mem_gb=round(peak_mem_gb(d.device), 3), teacher_accuracy=teacher_acc)


if __name__ == "__main__":
    run(main)
