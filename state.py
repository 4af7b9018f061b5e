"""The training state, for --save-every, --resume and SIGTERM: what a method file gets from here is Checkpointer.

A method's loop makes five calls to it (remember, resume, save, sigterm, exit). How a killed run then continues to
the weights an uninterrupted one reaches is this module's subject, apart from common.py's plumbing of the maths."""

import dataclasses
import json
import os
import random
import shutil
import signal
import sys
import time
import warnings
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn
from tqdm import tqdm

from common import UserError, first_line, all_max, lock_out, save_checkpoint, writing

# Arguments a resumed run may change: its length and saving (the data order and schedule do not depend on
# --steps), the run folder, settings of memory, not maths (the process count is compared on its own).
RESUME_MAY_DIFFER = ("steps", "save_every", "eval_every", "resume", "out", "gpus", "gradient_checkpointing",
                     "offload_teacher", "generation_batch_size", "report_to")


class Checkpointer:
    """The full training state, so that a killed run continues to the weights it would have reached: with
    --save-every N (and on SIGTERM) <out>/state/step-<S>/ holds sharded/*.safetensors (weights and optimizer
    tensors, torch.distributed.checkpoint), rng-<rank>.pt (RNGs, the loop's generators and buffers) and,
    written last, state.json (step, command, remembered values, optimizer groups, scheduler). Nothing unpickled."""

    def __init__(self, args, d, tokenizer, model, optimizer, scheduler, **carried):
        """`carried`: what else the loop needs to continue exactly, by name: a trained module (PPO's critic), a
        torch.Generator it draws from, a tensor it updates in place. Without --resume, earlier state goes."""
        self.args, self.d, self.tokenizer, self.model = args, d, tokenizer, model
        self.optimizer, self.scheduler = optimizer, scheduler
        # one module tree over everything trained, so that the optimizer's parameters have names
        self.modules = nn.ModuleDict({"model": model, **{k: v for k, v in carried.items() if isinstance(v, nn.Module)}})
        self.carried = {k: v for k, v in carried.items() if not isinstance(v, nn.Module)}
        self.root = Path(args.out) / "state"
        self.identity = {"method": Path(sys.modules[type(args).__module__].__file__).stem, "processes": d.world,
                         "args": {k: v for k, v in dataclasses.asdict(args).items() if k not in RESUME_MAY_DIFFER}}
        self.values, self.state, self.stop_at = {}, None, None
        if d.main:
            lock_out(args.out)
        if args.resume:
            self.state = self._read_state()
            self.values = dict(self.state["values"])
        elif d.main:
            shutil.rmtree(self.root, ignore_errors=True)
        signal.signal(signal.SIGTERM, self._on_sigterm)

    def _read_state(self):
        """state.json of the newest state in --out that reads (a warning for each newer one), if this command's."""
        out, damage = self.args.out, None
        for done in sorted(self.root.glob("step-*/state.json"), reverse=True):
            folder = done.parent
            try:
                state = json.loads(done.read_text())
                shards = sorted((folder / "sharded").glob("*.safetensors"))
                if not shards:
                    raise FileNotFoundError(f"no weight shards in {folder / 'sharded'}")
                for f in shards:
                    safe_open(f, "pt")  # (it reads the header, which covers the file, as a cut copy's does not)
                for rank in range(state["processes"]):
                    torch.load(folder / f"rng-{rank}.pt", weights_only=True)
                break
            except Exception as e:  # anything a damaged file raises, from OSError to safetensors' own
                damage = f"{folder} cannot be read ({type(e).__name__}: {first_line(e)})"
                if self.d.main:
                    tqdm.write(f"warning: --resume: the state {damage}; trying the one before")
        else:
            raise UserError(f"--resume: no training state in {out} can be read (the newest: {damage})" if damage
                            else f"--resume: no training state in {out} (one is written every --save-every steps "
                                 f"and on SIGTERM)")
        mine = self.identity
        if state["method"] != mine["method"]:
            raise UserError(f"--resume: the state in {out} was written by {state['method']}.py, "
                            f"not {mine['method']}.py")
        if state["processes"] != mine["processes"]:
            raise UserError(f"--resume: the state in {out} was written by {state['processes']} process(es) and "
                            f"resumes on as many (--gpus {state['processes']}), not on {mine['processes']}")
        for k in sorted(set(state["args"]) | set(mine["args"])):
            if state["args"].get(k) != mine["args"].get(k):
                may_differ = ", ".join("--" + a.replace("_", "-") for a in RESUME_MAY_DIFFER
                                       if hasattr(self.args, a) and a not in ("resume", "out"))
                raise UserError(f"--resume: the state in {out} comes from a different command: "
                                f"--{k.replace('_', '-')} was {state['args'].get(k)}, is now {mine['args'].get(k)} "
                                f"(a resumed run may change only {may_differ})")
        if state["step"] > self.args.steps:
            raise UserError(f"--resume: the state in {out} is at step {state['step']}, past --steps {self.args.steps}")
        return {**state, "folder": folder}

    def remember(self, name, compute):
        """compute() in a fresh run; in a resumed one the value it gave then (the accuracy before training)."""
        if name not in self.values:
            self.values[name] = compute()
        return self.values[name]

    def _tensors(self, with_optimizer):
        """(tensors to save or load in place, model state dict, optimizer state dict or None), as
        torch.distributed.checkpoint takes them: FSDP shards as shards, tied weights once. (The optimizer has
        tensors once it has stepped; asked before, it would take a zero step.)"""
        from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict
        tied = ({n for n, _ in self.modules.named_parameters(remove_duplicate=False)}
                - {n for n, _ in self.modules.named_parameters()})
        model_state = get_model_state_dict(self.modules)
        tensors = {"model": {k: v for k, v in model_state.items() if k not in tied}}
        optim_state = None
        if with_optimizer:
            optim_state = get_optimizer_state_dict(self.modules, self.optimizer)
            tensors["optimizer"] = optim_state["state"]
        return tensors, model_state, optim_state

    def save(self, step):
        """Every process: the state after step `step` (the one before kept, older ones removed), then <out>/model."""
        from torch.distributed.checkpoint import HuggingFaceStorageWriter, save
        name = f"step-{step:08d}"
        folder = self.root / name
        # three blocks, each ending with the processes' agreement that it was written (a collective)
        clean = lambda: shutil.rmtree(folder, ignore_errors=True)  # noqa: E731
        with writing(folder, self.d, cleanup=clean):
            if self.d.main:
                clean()  # left by a save that was killed
                folder.mkdir(parents=True)
        with writing(folder, self.d, cleanup=clean):
            tensors = self._tensors(with_optimizer=bool(self.optimizer.state))[0]
            with warnings.catch_warnings():  # torch.distributed.checkpoint warns when it runs on one process
                warnings.filterwarnings("ignore", "torch.distributed is disabled")
                save(tensors, storage_writer=HuggingFaceStorageWriter(str(folder / "sharded"), save_distributed=True),
                     no_dist=self.d.world == 1)
            rng = {"torch": torch.get_rng_state(), "python": random.getstate()}
            if self.d.device.type == "cuda":
                rng["cuda"] = torch.cuda.get_rng_state(self.d.device)
            carried = {k: v.get_state() if isinstance(v, torch.Generator) else v.detach().cpu().clone()
                       for k, v in self.carried.items()}
            torch.save({"rng": rng, "carried": carried}, folder / f"rng-{self.d.rank}.pt")
        with writing(folder, self.d, cleanup=clean):
            if self.d.main:
                groups = [{k: v for k, v in g.items() if k != "params"} for g in self.optimizer.param_groups]
                state = {"step": step, **self.identity, "values": self.values, "param_groups": groups,
                         "optimizer_stepped": "optimizer" in tensors, "scheduler": self.scheduler.state_dict()}
                # each file complete before its rename: the state, then the pointer to it
                for path, text in ((folder / "state.json", json.dumps(state, indent=1)), (self.root / "latest", name)):
                    path.with_suffix(".tmp").write_text(text)
                    os.replace(path.with_suffix(".tmp"), path)
        if self.d.main:  # keep this state and the newest complete one before it
            before = max((f.parent for f in self.root.glob("step-*/state.json") if f.parent.name < name), default=None)
            for old in self.root.glob("step-*"):
                if old not in (folder, before):
                    shutil.rmtree(old, ignore_errors=True)
        save_checkpoint(self.model, self.tokenizer, Path(self.args.out) / "model", self.d)

    def resume(self, log):
        """Load the state read at start-up and return its step (0 in a fresh run); just before the loop,
        after anything that needs the initial weights (DPO's reference log-probs)."""
        if self.state is None:
            log.start()
            return 0
        from torch.distributed.checkpoint import HuggingFaceStorageReader, load
        from torch.distributed.checkpoint.api import CheckpointException
        from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict
        folder, step = self.state["folder"], self.state["step"]
        for group, saved in zip(self.optimizer.param_groups, self.state["param_groups"]):
            group.update(saved)
        self.scheduler.load_state_dict(self.state["scheduler"])
        tensors, model_state, optim_state = self._tensors(self.state["optimizer_stepped"])
        try:
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", "torch.distributed is disabled")
                load(tensors, storage_reader=HuggingFaceStorageReader(str(folder / "sharded")),
                     no_dist=self.d.world == 1)
        except (Exception, CheckpointException) as e:  # damage the start-up checks cannot see (bytes, not lengths)
            raise UserError(f"--resume: the state {folder} cannot be loaded ({type(e).__name__}: {first_line(e)})")
        set_model_state_dict(self.modules, model_state)  # (the tied entries share the loaded tensors)
        if optim_state is not None:
            set_optimizer_state_dict(self.modules, self.optimizer, optim_state)
        saved = torch.load(folder / f"rng-{self.d.rank}.pt", weights_only=True)
        torch.set_rng_state(saved["rng"]["torch"])
        random.setstate(saved["rng"]["python"])
        if "cuda" in saved["rng"]:
            torch.cuda.set_rng_state(saved["rng"]["cuda"], self.d.device)
        for k, v in self.carried.items():
            if isinstance(v, torch.Generator):
                v.set_state(saved["carried"][k])
            else:
                v.copy_(saved["carried"][k])
        log.print(f"resumed from {folder} after step {step}")
        log.start()
        return step

    def sigterm(self):
        """Whether a SIGTERM has reached any process (then every process stops after the same step)."""
        return all_max(float(self.stop_at is not None), self.d).item() > 0

    def exit(self, step):
        """After the state of step `step` is saved on a SIGTERM: say how to continue, exit with 143."""
        if self.d.main:
            tqdm.write(f"stopped by SIGTERM after step {step}, state saved in {self.root}: "
                       f"run the same command with --resume to continue")
        sys.exit(143)

    def _on_sigterm(self, signum, frame):
        """The first SIGTERM asks to stop after this step; another over a second later stops at once (one within
        a second is the same request, from a scheduler and from the --gpus launcher passing it on)."""
        if self.stop_at is None:
            self.stop_at = time.monotonic()
        elif time.monotonic() - self.stop_at > 1:
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            os.kill(os.getpid(), signal.SIGTERM)
