"""Benchmark: the time and memory of one training step of every method, side by side with TRL.

  python bench.py                                      # tiny world's student, CPU: a few minutes on 2 cores
  python bench.py --model qwen2-0.5b --device cuda     # a Qwen2-0.5B-shaped model with random weights
  python bench.py --model path/to/model --methods dpo,opd --batch-size 8 --prompt-len 512 --response-len 512
  /path/to/venv-with-trl/bin/python bench.py ...       # the same, plus TRL's nearest trainer per method

What it measures, per method (each in a fresh process, so peak memory is that method's own):
  gen s     generation: sample() of the rollout (RL and distillation methods; SFT and DPO have none)
  score s   scoring: the no-grad forwards a step needs before its update (reference, teacher, critic)
  update s  the update: forward with gradient, the method's own loss function, backward, clip, AdamW
  step s    the sum of the three; each is the median over --repeats steps run after --warmup steps
  tok/s     batch_size * (prompt_len + response_len) / step s
  peak GB   GPU: torch.cuda.max_memory_allocated over the run; CPU: the process's peak resident set
            (ru_maxrss) minus its resident set just before the models were loaded, with the libraries
            already imported, so the Python, torch and TRL footprint is not counted (the runtime's
            own first-step buffers, about 0.1 GB on CPU, are)
  MFU       GPU only: 6 * trained params * update tokens / update s / (--peak-tflops * 1e12); the
            parameters of every model trained in the update (PPO: policy and critic), tied embeddings
            once; attention's own FLOPs are not counted
  TRL       with `trl` importable (it is not a dependency of this project): TRL's nearest trainer on the
            same model weights, batch and lengths, its step timed from on_step_begin to on_step_end
            (median over the same repeats after the same warm-up), and ours/TRL = step s / TRL step s

Every step uses random token ids: prompts of exactly --prompt-len tokens and responses of exactly
--response-len (generation ignores EOS on both sides: ours by sampling with no EOS id, TRL's with
min_new_tokens), so a step holds batch_size * (prompt_len + response_len) tokens on both sides. The
models see a synthetic word-level tokenizer ("t0 t1 ...", one word per id of the model's vocabulary,
pad = id 0, EOS = the last id) so that TRL, which takes text, tokenizes exactly the ids we feed;
--model's own tokenizer is not used. Rewards are fixed 0/1 values (ours: half of each group right;
TRL: random draws).

Named models: `tiny` is world/student (its teacher for distillation: world/teacher_large);
`qwen2-0.5b` is the Qwen2-0.5B shape (hidden 896, 24 layers, 14 heads, 2 KV heads, intermediate
4864, vocab 151936, tied embeddings) with random weights, written once to a temporary folder (so
TRL can build its reference model from the same path) and used as its own teacher; `qwen2-32k` is
a small Qwen2 with a 32k vocabulary (hidden 256, 4 layers, 4 heads, 2 KV heads, intermediate 1024),
the same way. A folder is loaded as is, and is its own teacher.

--lora-rank R puts LoRA adapters (alpha 16, every linear layer of the decoder layers) on the trained
models (PPO: the critic's trunk too) and makes the reference the policy with its adapters off, as the
scripts do; TRL's columns stay full fine-tuning.

Each method's step is a recipe built from common.py plumbing and the method file's own loss
functions; a method whose file or functions do not exist yet is skipped with a note. Simplifications
against the method files (the same on every run, so the figures compare): one update per rollout
(PPO: 1 epoch, 1 minibatch; GRPO, DPPO: 1 minibatch), one micro-batch per step, DYPO with every group
Mid (GRPO + GAL on all responses, no SFT rows), DPPO with the binary TV divergence (delta 0.15),
OPD+ with JSD, TrOPD without its guided (teacher-prefix) sample, outliers by top-64 forward KL.

TRL counterparts and how they differ (TRL's defaults otherwise, but no gradient checkpointing, no
logging, evaluation or saving, AdamW "adamw_torch", constant lr, bf16 mixed precision on GPU and
fp32 on CPU, like ours):
  sft       SFTTrainer on prompt/completion rows (completion-only loss); it also computes its
            entropy and token-accuracy metrics every step
  dpo       DPOTrainer (sigmoid loss): a reference copy of the model scores each batch (ours: the
            policy scores it before the update, which is what dpo.py precomputes)
  grpo      GRPOTrainer, beta 0.04, loss_type "grpo" (each response's token mean, then the mean), as ours
  dppo      GRPOTrainer, beta 0 (no reference), loss "dapo" (token mean); no divergence mask
  dypo      GRPOTrainer, beta 0.04 (a reference model scores the rollout, as pi_ref does for GAL)
  opd, opd_plus, tropd
            DistillationTrainer, on-policy, beta 1 (reverse KL) over the full vocabulary, the same
            teacher, one sample for each of batch_size prompts (ours: group_size samples for each of
            batch_size / group_size prompts, the same token count); ours uses only the sampled
            tokens' log-probs
  ppo       none (TRL 1.x has no PPO trainer)
On GPU, TRL's GRPO reference (dypo) is an fp32 copy run under autocast; ours loads in bf16.

The log-prob memory table: the peak memory of per-token log-probs, forward and backward, for
B x T tokens over a 151,936-token vocabulary (a one-layer, 64-wide Qwen2 with that head), ours
(common.LogprobModel, a chunked head) against the naive `log_softmax(logits).gather(...)`, each in a
fresh process; --logprob-tokens sets the B x T values ("" skips it).

The generation table: sample() alone, on 1 process and on N (--generation-processes; on CPU gloo
processes of one thread each, so each process has a core as the single one does), each process
decoding the same work: 16 prompts of --prompt-len tokens and 64 new tokens on CPU (GPU: 64 prompts,
--response-len new tokens), EOS ignored; total tok/s = new tokens of all processes / wall time,
median of 3 after 1 warm-up. Beside it, the same with FSDP's gather per forward (the weights
all-gathered for every decoded token, as before common.gathered) and, on 1 process, Hugging Face's
`model.generate` (sampling, min_new_tokens = max_new_tokens). Its model on CPU is a Qwen2 shape of
hidden 256, 4 layers and a 32k vocabulary with random weights (the tiny student decodes too little to
measure); on GPU, --model.
"""

import contextlib
import importlib.util
import os
import platform
import queue
import resource
import statistics
import tempfile
import time
import traceback
import warnings
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path
from types import SimpleNamespace

import torch

import common
from common import (WORLD, Dist, LogprobModel, UserError, add_lora, clip_grad, load_model, load_reference, logprobs,
                    pad_batch, parse_args, quiet_libraries, run, sample, shard_model)

METHODS = ["sft", "dpo", "ppo", "grpo", "dppo", "dypo", "opd", "opd_plus", "tropd"]
QWEN2_05B = dict(hidden_size=896, num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2,
                 intermediate_size=4864, vocab_size=151936, tie_word_embeddings=True, max_position_embeddings=32768)
LOGPROB_VOCAB = 151936
GEN_CPU = dict(hidden_size=256, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
               intermediate_size=1024, vocab_size=32000, tie_word_embeddings=True, max_position_embeddings=4096)


@dataclass
class Args:
    ranges = {"batch_size": ">= 0", "prompt_len": ">= 0", "response_len": ">= 0",  # 0: the device's default
              "warmup": ">= 0", "repeats": ">= 1", "peak_tflops": "> 0"}  # (lora_rank: common.RANGES)  # (flags common.RANGES does not know)
    model: str = ""
    """`tiny` (world/student), `qwen2-0.5b` or `qwen2-32k` (those shapes, random weights) or a model folder;
    default: tiny on CPU, qwen2-0.5b on GPU"""
    methods: str = ",".join(METHODS)
    """comma-separated methods to time"""
    device: str = ""
    """cpu or cuda (default: cuda when available)"""
    batch_size: int = 0
    """sequences per step (DPO: half chosen, half rejected; RL: batch_size / group_size prompts);
    default 32 on CPU, 16 on GPU"""
    prompt_len: int = 0
    """prompt tokens per sequence (default 16 on CPU, 256 on GPU)"""
    response_len: int = 0
    """response tokens per sequence, generated or given (default 16 on CPU, 256 on GPU)"""
    group_size: int = 4
    """responses per prompt for the group-advantage and distillation methods"""
    warmup: int = 2
    """steps run before timing"""
    repeats: int = 5
    """timed steps; the table shows their median"""
    peak_tflops: float = 989.0
    """peak dense bf16 TFLOP/s of the GPU, for MFU (989: H100 SXM)"""
    logprob_tokens: str = "512,2048"
    """B x T token counts of the log-prob memory table (empty: skip it)"""
    generation_processes: str = "1,2"
    """process counts of the generation table (empty: skip it)"""
    lora_rank: int = 0
    """LoRA adapters of this rank (alpha 16) on every trained model, the reference being the policy with
    its adapters off, as the scripts' --lora-rank (0: full fine-tuning)"""


# ----------------------------------------------------------------------------- models and data

def synthetic_tokenizer(vocab_size):
    """A word-level tokenizer with one word "t<i>" per id, pad = id 0 and EOS = the last id: text made
    of these words tokenizes back to exactly the same ids (TRL's trainers take text)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    tok = Tokenizer(models.WordLevel({f"t{i}": i for i in range(vocab_size)}, unk_token="t0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="t0", eos_token=f"t{vocab_size - 1}")


def model_folders(name, workdir):
    """(model folder, teacher folder) for a named model or a folder. A named config gets random
    weights saved into `workdir`, so every process (and TRL's reference) loads the same model."""
    if name == "tiny":
        return WORLD / "student", WORLD / "teacher_large"
    if name in ("qwen2-0.5b", "qwen2-32k"):
        folder = random_qwen2(Path(workdir) / name, QWEN2_05B if name == "qwen2-0.5b" else GEN_CPU)
        return folder, folder
    if not (Path(name) / "config.json").is_file():
        raise UserError(f"--model '{name}' is neither tiny, qwen2-0.5b, qwen2-32k nor a folder with a config.json")
    return Path(name), Path(name)


def random_qwen2(folder, shape):
    from transformers import AutoModelForCausalLM, Qwen2Config
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(Qwen2Config(**shape)).save_pretrained(folder)
    return folder


class Setup:
    """What a recipe builds its step from: the models, random batches, rollouts and the optimizer step."""

    def __init__(self, args, d, folder, teacher_folder):
        from transformers import AutoConfig
        self.d, self.folder, self.teacher_folder = d, folder, teacher_folder
        self.B, self.P, self.R, self.G = args.batch_size, args.prompt_len, args.response_len, args.group_size
        self.vocab = AutoConfig.from_pretrained(folder).vocab_size
        self.eos = self.vocab - 1
        self.no_eos = SimpleNamespace(pad_token_id=0, eos_token_id=-1)  # sample() then always draws R tokens
        self.g = torch.Generator().manual_seed(0)
        self.lora = SimpleNamespace(lora_rank=args.lora_rank, lora_alpha=16.0, lora_targets="", model=folder)

    def policy(self):
        return add_lora(load_model(self.folder, self.d), self.lora)

    def critic(self):
        import ppo
        return add_lora(ppo.Critic(load_model(self.folder, self.d).lm.get_decoder()), self.lora)

    def reference(self, policy):
        return load_reference(self.lora, self.d, policy)

    def frozen(self, folder=None):
        return load_model(folder or self.folder, self.d, trainable=False)

    def optimizer(self, *models):
        return torch.optim.AdamW([p for m in models for p in m.parameters()], lr=1e-6)

    def prompts(self, n):
        """n random prompts of P ids each (never pad or EOS)."""
        return torch.randint(1, self.eos, (n, self.P), generator=self.g).tolist()

    def responses(self, n):
        """n random responses of R ids, the last one EOS (as response_ids appends it)."""
        ids = torch.randint(1, self.eos, (n, self.R), generator=self.g)
        ids[:, -1] = self.eos
        return ids.tolist()

    def batch(self, prompts, responses):
        return pad_batch(prompts, responses, 0, self.d.device)

    def rollout(self, model):
        """B sampled responses of exactly R tokens, G per prompt, with their log-probs."""
        prompts = [p for p in self.prompts(self.B // self.G) for _ in range(self.G)]
        return sample(model, self.no_eos, prompts, self.d, self.R)

    def rewards(self):
        """(B/G, G) fixed 0/1 rewards, half right in every group (every group has contrast)."""
        r = torch.zeros(self.B // self.G, self.G, device=self.d.device)
        r[:, : self.G // 2] = 1.0
        return r

    def step(self, loss, optimizer, *models):
        loss.backward()
        for m in models:
            clip_grad(m, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)


# ----------------------------------------------------------------------------- step recipes
# Each recipe takes a Setup and returns ({phase: fn(state)}, trained models). The phases run in the
# order generation, scoring, update, sharing the dict `state`.

def sft_recipe(s):
    import sft
    model = s.policy()
    optimizer = s.optimizer(model)
    batch = s.batch(s.prompts(s.B), s.responses(s.B))

    def update(state):
        mask = batch["response_mask"]
        s.step(sft.sft_loss(logprobs(model, batch), mask, mask.sum()), optimizer, model)
    return {"update": update}, [model]


def dpo_recipe(s):
    import dpo
    model = s.policy()
    optimizer = s.optimizer(model)
    prompts = s.prompts(s.B // 2)
    batch = s.batch(prompts + prompts, s.responses(s.B))  # chosen rows, then rejected rows

    def score(state):
        with torch.no_grad():
            state["ref"] = dpo.concatenated_logps(model, batch)

    def update(state):
        chosen, rejected = dpo.concatenated_logps(model, batch)
        losses, _, _ = dpo.dpo_loss(chosen, rejected, *state["ref"], beta=0.1)
        s.step(losses.mean(), optimizer, model)
    return {"scoring": score, "update": update}, [model]


def ppo_recipe(s):
    import ppo
    model, critic = s.policy(), s.critic()
    reference = s.reference(model)
    optimizer = s.optimizer(model, critic)

    def generate(state):
        state["rollout"] = s.rollout(model)

    def score(state):
        r = state["rollout"]
        mask = r["response_mask"]
        with torch.no_grad():
            ref = logprobs(reference, r)
            state["values"] = ppo.critic_values(critic, r)
        rewards = ppo.token_rewards(s.rewards().view(-1), r["logp"], ref, mask, 0.05)
        advantages, state["returns"] = ppo.gae(rewards, state["values"], mask, 1.0, 0.95)
        state["advantages"] = ppo.whiten(advantages, mask, s.d)

    def update(state):
        r = state["rollout"]
        mask = r["response_mask"]
        out = model(r["input_ids"], r["attention_mask"], r["prompt_width"], entropy=True)
        loss = (ppo.policy_loss(out["logp"], r["logp"], state["advantages"], mask, 0.2)
                + ppo.value_loss(ppo.critic_values(critic, r), state["values"], state["returns"], mask, 0.2))
        s.step(loss, optimizer, model, critic)
    return {"generation": generate, "scoring": score, "update": update}, [model, critic]


def grpo_recipe(s):
    import grpo
    model = s.policy()
    reference = s.reference(model)
    optimizer = s.optimizer(model)

    def generate(state):
        state["rollout"] = s.rollout(model)

    def score(state):
        with torch.no_grad():
            state["ref"] = logprobs(reference, state["rollout"])
        state["advantages"] = grpo.grpo_advantages(s.rewards()).view(-1)

    def update(state):
        r = state["rollout"]
        logp = model(r["input_ids"], r["attention_mask"], r["prompt_width"], entropy=True)["logp"]
        s.step(grpo.grpo_loss(logp, r["logp"], state["ref"], state["advantages"], r["response_mask"], 0.2, 0.04,
                              "sequence"), optimizer, model)
    return {"generation": generate, "scoring": score, "update": update}, [model]


def dppo_recipe(s):
    import dppo
    model = s.policy()
    optimizer = s.optimizer(model)

    def generate(state):
        state["rollout"] = s.rollout(model)

    def score(state):  # no model to run: the anchor mu is the rollout's own log-probs
        mask = state["rollout"]["response_mask"]
        state["advantages"] = dppo.group_advantages(s.rewards().view(-1), s.G)[:, None] * mask

    def update(state):
        r, advantages = state["rollout"], state["advantages"]
        logp = model(r["input_ids"], r["attention_mask"], r["prompt_width"], entropy=True)["logp"]
        trust = dppo.dppo_mask(logp, r["logp"], advantages, dppo.binary_divergence(logp, r["logp"], "tv"), 0.15)
        s.step(dppo.dppo_loss(logp, r["logp"], advantages, trust, r["response_mask"]), optimizer, model)
    return {"generation": generate, "scoring": score, "update": update}, [model]


def dypo_recipe(s):
    import dypo
    model = s.policy()
    reference = s.reference(model)
    optimizer = s.optimizer(model)

    def generate(state):
        state["rollout"] = s.rollout(model)

    def score(state):
        with torch.no_grad():
            state["ref"] = logprobs(reference, state["rollout"]).sum(-1).view(-1, s.G)    # (B/G, G)

    def update(state):
        r, shape = state["rollout"], (s.B // s.G, s.G, -1)
        logp = logprobs(model, r)
        loss, _ = dypo.dypo_loss(logp.view(shape), r["logp"].view(shape), r["response_mask"].view(shape),
                                 state["ref"], s.rewards(), logp[:0], r["response_mask"][:0],
                                 alpha=0.5, beta_gal=1.0, sft_weight=1.0, clip_eps=0.2)
        s.step(loss / len(state["ref"]), optimizer, model)
    return {"generation": generate, "scoring": score, "update": update}, [model]


def opd_recipe(s):
    import opd
    model, teacher = s.policy(), s.frozen(s.teacher_folder)
    optimizer = s.optimizer(model)

    def generate(state):
        state["rollout"] = s.rollout(model)

    def score(state):
        r = state["rollout"]
        with torch.no_grad():
            teacher_logp = logprobs(teacher, r)
        state["advantages"] = opd.opd_advantage(r["logp"], teacher_logp) * r["response_mask"]

    def update(state):
        r = state["rollout"]
        loss = opd.opd_loss(logprobs(model, r), r["logp"], state["advantages"], r["response_mask"])
        s.step(loss, optimizer, model)
    return {"generation": generate, "scoring": score, "update": update}, [model]


def opd_plus_recipe(s):
    import opd_plus
    model, teacher = s.policy(), s.frozen(s.teacher_folder)
    optimizer = s.optimizer(model)

    def generate(state):
        state["rollout"] = s.rollout(model)

    def score(state):
        r = state["rollout"]
        with torch.no_grad():
            log_u = (logprobs(teacher, r) - r["logp"]).clamp(-6.0, 6.0)
        state["advantages"] = opd_plus.f_advantage(log_u, "jsd") * r["response_mask"]

    def update(state):
        r = state["rollout"]
        loss = opd_plus.opd_loss(logprobs(model, r), r["logp"], state["advantages"], r["response_mask"])
        s.step(loss, optimizer, model)
    return {"generation": generate, "scoring": score, "update": update}, [model]


def tropd_recipe(s):
    import tropd
    model, teacher = s.policy(), s.frozen(s.teacher_folder)
    optimizer = s.optimizer(model)
    top_k = min(64, s.vocab)

    def generate(state):
        state["rollout"] = s.rollout(model)

    def score(state):
        r = state["rollout"]
        with torch.no_grad():
            state["teacher"] = teacher(r["input_ids"], r["attention_mask"], r["prompt_width"], topk=top_k)
        state["trusted"] = tropd.trust_mask(state["teacher"]["logp"], r["logp"], generator=s.g) * r["response_mask"]

    def update(state):
        r, t, mask = state["rollout"], state["teacher"], state["rollout"]["response_mask"]
        student = model(r["input_ids"], r["attention_mask"], r["prompt_width"], gather=t["topk_ids"])
        kl = tropd.topk_forward_kl(t["topk_logp"], student["gather_logp"]) * (1 - state["trusted"]) * mask
        advantages = tropd.tropd_advantage(t["logp"], r["logp"], state["trusted"], kl, "fkl", -2.0) * mask
        loss = tropd.tropd_loss(student["logp"], r["logp"], advantages, mask, torch.zeros_like(mask), 0.001, None, kl)
        s.step(loss, optimizer, model)
    return {"generation": generate, "scoring": score, "update": update}, [model]


# method -> (recipe, the method module's functions it needs, TRL counterpart)
RECIPES = {
    "sft": (sft_recipe, ["sft_loss"], "SFTTrainer"),
    "dpo": (dpo_recipe, ["dpo_loss", "concatenated_logps"], "DPOTrainer"),
    "ppo": (ppo_recipe, ["policy_loss", "value_loss", "gae", "token_rewards", "whiten", "Critic", "critic_values"],
            None),
    "grpo": (grpo_recipe, ["grpo_advantages", "grpo_loss"], "GRPOTrainer"),
    "dppo": (dppo_recipe, ["group_advantages", "binary_divergence", "dppo_mask", "dppo_loss"], "GRPOTrainer"),
    "dypo": (dypo_recipe, ["dypo_loss"], "GRPOTrainer"),
    "opd": (opd_recipe, ["opd_loss", "opd_advantage"], "DistillationTrainer"),
    "opd_plus": (opd_plus_recipe, ["f_advantage", "opd_loss"], "DistillationTrainer"),
    "tropd": (tropd_recipe, ["trust_mask", "topk_forward_kl", "tropd_advantage", "tropd_loss"], "DistillationTrainer"),
}
PHASES = ("generation", "scoring", "update")


def missing(method):
    """Why `method` cannot be timed yet (no file, no recipe, a loss function not there), or None."""
    if method not in RECIPES:
        return f"{method}.py has no recipe in bench.py yet" if (Path(__file__).parent / f"{method}.py").exists() \
            else f"{method}.py does not exist yet"
    import importlib
    try:
        module = importlib.import_module(method)
    except ImportError as e:
        return f"{method}.py cannot be imported ({e})"
    absent = [f for f in RECIPES[method][1] if not hasattr(module, f)]
    return f"{method}.py has no {', '.join(absent)} yet" if absent else None


# ----------------------------------------------------------------------------- measuring

def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def rss_gb():
    """Current resident set of this process (Linux)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**30


def memory_mark(device):
    """The baseline peak memory is measured from."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return torch.cuda.memory_allocated(device) / 2**30
    return rss_gb()


def memory_peak(device, mark):
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30 - mark
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20 - mark  # Linux reports KiB


def in_fresh_process(fn, *args):
    """Run fn(*args) in a new Python process (spawned: its peak memory is its own) and return its result."""
    with ProcessPoolExecutor(1, mp_context=get_context("spawn")) as pool:
        return pool.submit(fn, *args).result()


def import_libraries(*modules, folder):
    """Import what a measurement uses (and the model's class) before the memory baseline, so the
    libraries' own footprint is not counted as the method's."""
    import importlib
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING
    for m in modules:
        importlib.import_module(m)
    MODEL_FOR_CAUSAL_LM_MAPPING[type(AutoConfig.from_pretrained(folder))]


def time_ours(method, args, folder, teacher_folder):
    """Median phase times, tokens/s, peak memory and MFU of `method`'s step (run in its own process)."""
    quiet_libraries()
    d = Dist(0, 1, torch.device(args.device))
    try:
        import_libraries(method, folder=folder)
        mark = memory_mark(d.device)
        s = Setup(args, d, folder, teacher_folder)
        phases, trained = RECIPES[method][0](s)
        times = {p: [] for p in PHASES}
        for rep in range(args.warmup + args.repeats):
            state = {}
            for p in PHASES:
                if p in phases:
                    sync(d.device)
                    start = time.perf_counter()
                    phases[p](state)
                    sync(d.device)
                    if rep >= args.warmup:
                        times[p].append(time.perf_counter() - start)
        row = {p: statistics.median(t) if t else None for p, t in times.items()}
        steps = [sum(t[i] for t in times.values() if t) for i in range(args.repeats)]
        row["step"] = statistics.median(steps)
        tokens = args.batch_size * (args.prompt_len + args.response_len)
        row["tok/s"] = tokens / row["step"]
        row["peak GB"] = memory_peak(d.device, mark)
        if d.device.type == "cuda":
            params = sum(p.numel() for m in trained for p in m.parameters())
            row["MFU"] = 6 * params * tokens / row["update"] / (args.peak_tflops * 1e12)
        return row
    except Exception as e:
        traceback.print_exc()
        return {"note": f"failed: {type(e).__name__}: {e}"}


def time_trl(method, args, folder, teacher_folder):
    """TRL's nearest trainer on the same model, batch and lengths: median step time and peak memory."""
    quiet_libraries()
    import trl
    from datasets import Dataset, disable_progress_bars
    from transformers import PrinterCallback, TrainerCallback
    disable_progress_bars()

    class StepTimer(TrainerCallback):
        """Wall time of each optimizer step, from on_step_begin to on_step_end."""

        def __init__(self, device):
            self.device, self.times = device, []

        def on_step_begin(self, *args, **kwargs):
            sync(self.device)
            self.start = time.perf_counter()

        def on_step_end(self, *args, **kwargs):
            sync(self.device)
            self.times.append(time.perf_counter() - self.start)

    d = Dist(0, 1, torch.device(args.device))
    trainer_name = RECIPES[method][2]
    try:
        Trainer, Config = getattr(trl, trainer_name), getattr(trl, trainer_name.replace("Trainer", "Config"))
        import_libraries(folder=folder)
        mark = memory_mark(d.device)
        s = Setup(args, d, folder, teacher_folder)
        tok = synthetic_tokenizer(s.vocab)
        text = lambda ids: " ".join(f"t{i}" for i in ids)  # noqa: E731
        steps = args.warmup + args.repeats
        config = dict(output_dir=tempfile.mkdtemp(prefix="bench-trl-"), max_steps=steps, learning_rate=1e-6,
                      lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0, max_grad_norm=1.0,
                      optim="adamw_torch", bf16=d.device.type == "cuda", use_cpu=d.device.type == "cpu",
                      gradient_checkpointing=False, report_to="none", save_strategy="no", eval_strategy="no",
                      logging_strategy="no", disable_tqdm=True, dataloader_num_workers=0, seed=0)
        generation = dict(max_completion_length=s.R, generation_kwargs={"min_new_tokens": s.R}, temperature=1.0)
        n = s.B * steps  # rows enough for every step
        model = s.policy().lm
        model.config.eos_token_id = model.generation_config.eos_token_id = tok.eos_token_id  # the only EOS
        if trainer_name == "SFTTrainer":
            rows = [{"prompt": text(p), "completion": " " + text(r)} for p, r in zip(s.prompts(n), s.responses(n))]
            trainer = Trainer(model=model, processing_class=tok, train_dataset=Dataset.from_list(rows),
                              args=Config(**config, per_device_train_batch_size=s.B, max_length=s.P + s.R))
        elif trainer_name == "DPOTrainer":
            rows = [{"prompt": text(p), "chosen": " " + text(c), "rejected": " " + text(r)}
                    for p, c, r in zip(s.prompts(n), s.responses(n), s.responses(n))]
            trainer = Trainer(model=model, processing_class=tok, train_dataset=Dataset.from_list(rows),
                              args=Config(**config, per_device_train_batch_size=s.B // 2, beta=0.1,
                                          max_length=s.P + s.R))
        elif trainer_name == "GRPOTrainer":
            draws = torch.Generator().manual_seed(0)

            def random_reward(completions, **kwargs):
                return torch.randint(0, 2, (len(completions),), generator=draws).float().tolist()
            trainer = Trainer(model=model, reward_funcs=random_reward, processing_class=tok,
                              train_dataset=Dataset.from_list([{"prompt": text(p)} for p in s.prompts(n)]),
                              args=Config(**config, **generation, per_device_train_batch_size=s.B,
                                          num_generations=s.G, beta=0.0 if method == "dppo" else 0.04,
                                          **({"loss_type": "grpo"} if method == "grpo" else {})))
        else:  # DistillationTrainer
            trainer = Trainer(model=model, teacher_model=s.frozen(s.teacher_folder).lm, processing_class=tok,
                              train_dataset=Dataset.from_list([{"prompt": text(p)} for p in s.prompts(n)]),
                              args=Config(**config, **generation, per_device_train_batch_size=s.B, beta=1.0))
        timer = StepTimer(d.device)
        trainer.add_callback(timer)
        trainer.remove_callback(PrinterCallback)
        trainer.train()
        return {"TRL step": statistics.median(timer.times[args.warmup:]), "TRL GB": memory_peak(d.device, mark)}
    except Exception as e:
        traceback.print_exc()
        return {"note": f"TRL {trainer_name} failed: {type(e).__name__}: {e}"}


def logprob_memory(n_tokens, naive, device):
    """Peak memory (GB) of the per-token log-probs of n_tokens response tokens, forward and backward,
    over a 151,936-token vocabulary: ours (LogprobModel's chunked head) or naive (full logits)."""
    from transformers import AutoModelForCausalLM, Qwen2Config
    quiet_libraries()
    device = torch.device(device)
    torch.manual_seed(0)
    lm = AutoModelForCausalLM.from_config(Qwen2Config(vocab_size=LOGPROB_VOCAB, hidden_size=64, intermediate_size=128,
                                                      num_hidden_layers=1, num_attention_heads=2,
                                                      num_key_value_heads=2, tie_word_embeddings=True))
    model = LogprobModel(lm).to(device)
    rows = 4
    ids = torch.randint(0, LOGPROB_VOCAB, (rows, n_tokens // rows + 1), device=device)  # 1 prompt token per row
    mask = torch.ones_like(ids)
    mark = memory_mark(device)
    if naive:
        logits = lm(input_ids=ids, attention_mask=mask).logits[:, :-1]                     # (B, T, V)
        logp = torch.log_softmax(logits.float(), -1).gather(-1, ids[:, 1:, None]).squeeze(-1)
        del logits
    else:
        logp = model(ids, mask, 1)                                                          # (B, T)
    logp.sum().backward()
    return memory_peak(device, mark)


def generation_rate(rank, world, port, device, folder, work, per_token_gather, results):
    """Total sampling tok/s of `world` processes (this is one of them), each decoding `work` = (prompts,
    prompt tokens, new tokens); with per_token_gather, FSDP gathers the weights for every forward
    (common.gathered switched off); rank 0 puts {"sample", "generate"} tok/s into `results`."""
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    if device == "cpu":
        os.environ["OMP_NUM_THREADS"] = "1"
        torch.set_num_threads(1)
    quiet_libraries()
    d = common.init_distributed(world)
    if per_token_gather:
        common.gathered = lambda model: contextlib.nullcontext()
    B, P, R = work
    model = shard_model(load_model(folder, d), d)
    vocab = model.lm.config.vocab_size
    prompts = torch.randint(1, vocab - 1, (B, P), generator=torch.Generator().manual_seed(rank)).tolist()
    no_eos = SimpleNamespace(pad_token_id=0, eos_token_id=-1)

    def rate(decode, repeats=3):
        times = []
        for rep in range(1 + repeats):
            common.all_sum(0.0, d)  # (a barrier)
            sync(d.device)
            start = time.perf_counter()
            decode()
            sync(d.device)
            common.all_sum(0.0, d)
            times.append(time.perf_counter() - start)
        return world * B * R / statistics.median(times[1:])

    row = {"sample": rate(lambda: sample(model, no_eos, prompts, d, R))}
    if world == 1:
        ids = torch.tensor(prompts, device=d.device)
        with common.autocast(d.device):
            row["generate"] = rate(lambda: model.lm.generate(ids, attention_mask=torch.ones_like(ids), do_sample=True,
                                                             max_new_tokens=R, min_new_tokens=R, pad_token_id=0))
        if importlib.util.find_spec("vllm"):  # the engine --vllm samples with, on the same cores (README: vLLM)
            row["vllm"] = vllm_rate(folder, d, prompts, R, rate)
    if d.main:
        results.put(row)
    if world > 1:
        torch.distributed.destroy_process_group()


def vllm_rate(folder, d, prompts, R, rate):
    """vLLM's tok/s on the same work (EOS ignored), in this process: on CPU bound to one core, as sample()."""
    os.environ.update(VLLM_ENABLE_V1_MULTIPROCESSING="0", VLLM_LOGGING_LEVEL="WARNING")
    if d.device.type == "cpu":
        os.environ.update(VLLM_CPU_OMP_THREADS_BIND="0", VLLM_CPU_KVCACHE_SPACE="1")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from vllm import LLM, SamplingParams
        llm = LLM(model=str(folder), skip_tokenizer_init=True, gpu_memory_utilization=0.3, seed=0,
                  dtype="bfloat16" if d.device.type == "cuda" else "float32")
    params = SamplingParams(max_tokens=R, ignore_eos=True, logprobs=0, detokenize=False)
    return rate(lambda: llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False))


def generation_table(counts, device, folder, work):
    """The generation table's rows: processes, sample() tok/s in total (with one gather per generation and
    with one per token), model.generate tok/s (1 process)."""
    ctx, lines = get_context("spawn"), []
    for world in counts:
        row = {}
        for per_token in ((False, True) if world > 1 else (False,)):
            port, results = common.free_port(), ctx.Queue()
            procs = [ctx.Process(target=generation_rate,
                                 args=(r, world, port, device, folder, work, per_token, results)) for r in range(world)]
            for p in procs:
                p.start()
            while True:  # (a process that fails puts nothing: stop the others rather than wait for ever)
                try:
                    out = results.get(timeout=1)
                    break
                except queue.Empty:
                    if any(p.exitcode not in (None, 0) for p in procs):
                        for p in procs:
                            p.terminate()
                        raise RuntimeError(f"a generation process failed on {world} process(es)") from None
            for p in procs:
                p.join()
            row.update({"per token": out["sample"]} if per_token else out)
        lines.append([str(world), f"{row['sample']:.0f}", f"{row['sample'] / world:.0f}",
                      fmt(row.get("per token"), ".0f"), fmt(row.get("generate"), ".0f"), fmt(row.get("vllm"), ".0f")])
        print(f"# generation on {world} process(es) done", flush=True)
    return lines


# ----------------------------------------------------------------------------- the report

def machine(device):
    if device.type == "cuda":
        return f"GPU {torch.cuda.get_device_name(device)}"
    name = platform.processor() or platform.machine()
    try:
        name = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    threads = os.environ.get("OMP_NUM_THREADS", "unset")
    return f"CPU {name}, {torch.get_num_threads()} threads (OMP_NUM_THREADS={threads})"


def fmt(x, spec):
    return "-" if x is None else format(x, spec)


def table(header, rows):
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def trl_version():
    try:
        import trl
        return trl.__version__
    except ImportError:
        return None


def main():
    args = parse_args(Args)
    cuda = torch.cuda.is_available()
    args.device = args.device or ("cuda" if cuda else "cpu")
    if args.device not in ("cpu", "cuda"):
        raise UserError(f"--device must be cpu or cuda, not '{args.device}'")
    if args.device == "cuda" and not cuda:
        raise UserError("--device cuda, but no CUDA device is visible")
    gpu = args.device == "cuda"
    args.model = args.model or ("qwen2-0.5b" if gpu else "tiny")
    args.batch_size = args.batch_size or (16 if gpu else 32)
    args.prompt_len = args.prompt_len or (256 if gpu else 16)
    args.response_len = args.response_len or (256 if gpu else 16)
    methods = [m for m in args.methods.split(",") if m]
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise UserError(f"unknown method '{unknown[0]}' (known: {', '.join(METHODS)})")
    if args.batch_size % args.group_size or args.batch_size % 2:
        raise UserError(f"--batch-size {args.batch_size} must be even and divide by --group-size {args.group_size}")
    try:
        token_counts = [int(x) for x in args.logprob_tokens.split(",") if x]
    except ValueError:
        raise UserError(f"--logprob-tokens must be comma-separated integers, not '{args.logprob_tokens}'") from None
    try:
        gen_counts = [int(x) for x in args.generation_processes.split(",") if x]
    except ValueError:
        gen_counts = [0]
    if any(n < 1 for n in gen_counts) or gpu and max(gen_counts, default=1) > torch.cuda.device_count():
        raise UserError(f"--generation-processes must be comma-separated process counts of at least 1"
                        f"{' and at most the visible GPUs' if gpu else ''}, not '{args.generation_processes}'")
    trl = trl_version()

    with tempfile.TemporaryDirectory(prefix="bench-") as workdir:
        folder, teacher_folder = model_folders(args.model, workdir)
        from transformers import AutoConfig
        config = AutoConfig.from_pretrained(folder)
        if args.prompt_len + args.response_len > config.max_position_embeddings:
            raise UserError(f"--prompt-len + --response-len = {args.prompt_len + args.response_len} exceeds the "
                            f"model's {config.max_position_embeddings} positions")
        device = torch.device(args.device)
        print(f"# bench: {args.model} ({config.num_hidden_layers} layers, hidden {config.hidden_size}, vocab "
              f"{config.vocab_size}); batch {args.batch_size} sequences x ({args.prompt_len} prompt + "
              f"{args.response_len} response) tokens, group {args.group_size}; median of {args.repeats} step(s) "
              f"after {args.warmup} warm-up", flush=True)
        print(f"# machine: {machine(device)}; torch {torch.__version__}; "
              f"trl {trl or 'not importable (no TRL columns)'}", flush=True)

        rows, notes = [], []
        for method in methods:
            why = missing(method)
            if why:
                notes.append(f"{method}: skipped, {why}")
                print(f"# {notes[-1]}", flush=True)
                continue
            row = in_fresh_process(time_ours, method, args, folder, teacher_folder)
            if trl and "note" not in row:
                row.update(in_fresh_process(time_trl, method, args, folder, teacher_folder) if RECIPES[method][2]
                           else {"note": "TRL has no counterpart"})
            if "note" in row:
                notes.append(f"{method}: {row['note']}")
            rows.append((method, row))
            print(f"# {method} done", flush=True)

        header = ["method", "gen s", "score s", "update s", "step s", "tok/s", "peak GB"] + (["MFU"] if gpu else [])
        if trl:
            header += ["TRL trainer", "TRL step s", "TRL peak GB", "ours/TRL"]
        lines = []
        for method, r in rows:
            rate = r.get("tok/s")
            line = [method, fmt(r.get("generation"), ".3f"), fmt(r.get("scoring"), ".3f"), fmt(r.get("update"), ".3f"),
                    fmt(r.get("step"), ".3f"), fmt(rate, ".0f" if rate and rate >= 10 else ".2g"),
                    fmt(r.get("peak GB"), ".2f")]
            if gpu:
                line.append(fmt(r.get("MFU") and 100 * r["MFU"], ".1f") + ("%" if r.get("MFU") else ""))
            if trl:
                ratio = r["step"] / r["TRL step"] if "step" in r and "TRL step" in r else None
                line += [RECIPES[method][2] or "-", fmt(r.get("TRL step"), ".3f"), fmt(r.get("TRL GB"), ".2f"),
                         fmt(ratio, ".2f")]
            lines.append(line)
        print()
        print(table(header, lines))
        for note in notes:
            print(f"- {note}")

        if token_counts:
            print(f"\n# log-prob memory: forward + backward over a {LOGPROB_VOCAB}-token vocabulary "
                  f"(peak above the memory before the call)")
            lines = []
            for n in token_counts:
                naive = in_fresh_process(logprob_memory, n, True, args.device)
                ours = in_fresh_process(logprob_memory, n, False, args.device)
                lines.append([str(n), f"{n * LOGPROB_VOCAB * 4 / 2**30:.2f}", f"{naive:.2f}", f"{ours:.2f}"])
            print(table(["B x T", "one fp32 (BxT, V) GB", "naive peak GB", "ours peak GB"], lines))

        if gen_counts:
            gen_folder = folder if gpu else random_qwen2(Path(workdir) / "generation", GEN_CPU)
            work = (64, args.prompt_len, args.response_len) if gpu else (16, args.prompt_len, 64)
            print(f"\n# generation: sample() alone, each process {work[0]} prompts x ({work[1]} prompt + {work[2]} "
                  f"new) tokens{'' if gpu else ', one thread per process'}; tok/s = new tokens of all processes / "
                  f"wall time", flush=True)
            print(table(["processes", "sample() tok/s", "per process", "gather per token tok/s",
                         "model.generate tok/s", "vLLM tok/s"], generation_table(gen_counts, args.device, gen_folder, work)))


if __name__ == "__main__":
    run(main)
