"""The accidents of real machines: damaged model and state files, a full disk, two runs on one --out,
an --out that cannot be created; and a console that shows our lines only. Each ends with one
`error:` line (or one `warning:` and a run that goes on), never a stack trace, and leaves the last
complete model and state as they were."""

import os
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import common
from test_resume import start, weights
from test_scripts import ROOT, ok, one_line_error, run

SFT = ["sft.py", "--batch-size", 8, "--micro-batch-size", 4, "--lr", 1e-3]


def sft(steps, out, *extra, eval_args=(), limit=None):
    """Run sft.py for `steps`; with `limit`, no file it writes may grow past `limit` bytes (the kernel
    refuses the write with EFBIG, as a full disk refuses it with ENOSPC)."""
    def cap():
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env.pop("RANK", None)
    return subprocess.run([sys.executable, str(ROOT / SFT[0]), *map(str, SFT[1:] + ["--steps", steps, "--out", out]),
                           *map(str, eval_args), *map(str, extra)], capture_output=True, text=True, env=env,
                          cwd=ROOT, timeout=600, preexec_fn=cap if limit else None)


def cut(path):
    """Cut a file to half its length, as an interrupted copy or a full disk leaves it."""
    os.truncate(path, path.stat().st_size // 2)


def same_weights(a, b):
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=0, atol=1e-6)


# ----------------------------------------------------------------------------- damaged inputs

@pytest.mark.parametrize("damage,needle", [
    (lambda f: cut(f / "model.safetensors"), "'model.safetensors' is damaged"),
    (lambda f: cut(f / "tokenizer.json"), "'tokenizer.json' is damaged"),
    (lambda f: (f / "config.json").write_text('{"model_type": "qwen2", '), "'config.json' is damaged"),
])
@pytest.mark.parametrize("flag", ["--model", "--teacher"])
def test_damaged_model_files(damage, needle, flag, tmp_path):
    """A model or teacher folder with a file cut short or a broken config: one line naming the file."""
    import shutil
    folder = tmp_path / "model"
    shutil.copytree(common.WORLD / "student", folder)
    damage(folder)
    proc = run("opd.py", flag, folder, "--steps", 1, "--out", tmp_path / "run")
    assert needle in one_line_error(proc, str(folder))


# ----------------------------------------------------------------------------- damaged training state

def test_resume_falls_back_to_the_state_before(small_eval, tmp_path):
    """The newest state cut short: one warning, then the run resumes from the state before it, to the
    weights of an uninterrupted run; with every state damaged, one error. Two states are kept."""
    whole, out = tmp_path / "whole", tmp_path / "run"
    ok(sft(4, whole, eval_args=small_eval))
    ok(sft(3, out, "--save-every", 1, eval_args=small_eval))
    states = sorted((out / "state").glob("step-*"))
    assert [s.name for s in states] == ["step-00000002", "step-00000003"]  # this state and the one before
    shard = next((states[-1] / "sharded").glob("*.safetensors"))
    cut(shard)
    proc = ok(sft(4, out, "--save-every", 1, "--resume", eval_args=small_eval))
    warnings = [line for line in proc.stderr.splitlines() + proc.stdout.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and "step-00000003" in warnings[0] and "Traceback" not in proc.stderr
    assert "resumed from" in proc.stdout and "step-00000002 after step 2" in proc.stdout
    same_weights(out, whole)
    for s in sorted((out / "state").glob("step-*")):
        cut(next((s / "sharded").glob("*.safetensors")))
    one_line_error(sft(5, out, "--resume", eval_args=small_eval), "no training state", "can be read")


# ----------------------------------------------------------------------------- full disk

def test_full_disk_keeps_the_last_state_and_model(small_eval, tmp_path):
    """A state that cannot be written (files capped at 1 MB: the state's shard is about 10 MB, the model
    3.4 MB) stops the run with one line naming it; the last state and model stay; a later --resume
    with room continues to the uninterrupted run's weights. A final save that fails keeps no half model."""
    whole, out = tmp_path / "whole", tmp_path / "run"
    ok(sft(4, whole, eval_args=small_eval))
    ok(sft(2, out, "--save-every", 2, eval_args=small_eval))
    saved = weights(out)
    proc = sft(4, out, "--save-every", 2, "--resume", eval_args=small_eval, limit=2**20)
    one_line_error(proc, f"cannot write '{out / 'state' / 'step-00000004'}'", "File too large")
    assert [s.name for s in (out / "state").glob("step-*")] == ["step-00000002"]
    for k, v in weights(out).items():
        assert torch.equal(v, saved[k])
    ok(sft(4, out, "--save-every", 2, "--resume", eval_args=small_eval))
    same_weights(out, whole)

    final = tmp_path / "final"
    one_line_error(sft(1, final, eval_args=small_eval, limit=2**20), f"cannot write '{final / 'model'}'")
    assert not (final / "model").exists() and not list(final.glob(".model*"))  # no half-written model


def test_full_disk_on_two_processes(small_eval, tmp_path):
    """The same on 2 gloo processes: every process stops (none waits on the one that failed), one line."""
    out = tmp_path / "run"
    ok(sft(2, out, "--save-every", 2, "--gpus", 2, eval_args=small_eval))
    proc = sft(4, out, "--save-every", 2, "--resume", "--gpus", 2, eval_args=small_eval, limit=2**20)
    one_line_error(proc, f"cannot write '{out / 'state' / 'step-00000004'}'")
    assert [s.name for s in (out / "state").glob("step-*")] == ["step-00000002"]


@pytest.mark.parametrize("left", ["both", "old only"])
def test_save_after_a_save_killed_between_renames(left, model, tok, cpu, tmp_path):
    """A save killed after moving the model aside (<out>/.model.old) and before or after putting the new
    one in place: the next save still writes <out>/model (a stale .model.old once made it fail)."""
    path = tmp_path / "model"
    common.save_checkpoint(model, tok, path, cpu)
    path.rename(tmp_path / ".model.old")
    if left == "both":
        common.save_checkpoint(model, tok, path, cpu)
        common.save_checkpoint(model, tok, tmp_path / "other", cpu)
        (tmp_path / "other").rename(tmp_path / ".model.old")  # (killed just before removing the old one)
    with torch.no_grad():
        next(model.parameters()).add_(1.0)
    common.save_checkpoint(model, tok, path, cpu)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]
    saved = weights(tmp_path)
    for name, p in model.lm.state_dict().items():
        if name in saved:
            assert torch.equal(saved[name], p)


# ----------------------------------------------------------------------------- the run folder

def test_two_runs_one_out(small_eval, tmp_path):
    """A second run on a folder a live run writes stops at start-up naming its process; once that run
    is dead (SIGKILL: no clean-up), the folder is free."""
    out = tmp_path / "run"
    first = start([*SFT, "--steps", 100000, *small_eval], out, tmp_path / "first.log")
    try:
        lock = out / common.LOCK
        deadline = time.time() + 300
        while not (lock.exists() and lock.read_text()):
            assert first.poll() is None and time.time() < deadline, (tmp_path / "first.log").read_text()[-2000:]
            time.sleep(0.05)
        one_line_error(sft(1, out, eval_args=small_eval), "in use by another run", f"process {first.pid}")
    finally:
        os.killpg(first.pid, signal.SIGKILL)
        first.wait()
    ok(sft(1, out, eval_args=small_eval))


@pytest.mark.skipif(not Path("/proc/self").is_dir(), reason="needs Linux's /proc")
def test_out_that_cannot_be_created():
    """An --out under a pseudo-filesystem passes every permission check and still cannot be made: one
    line, before any model loads."""
    one_line_error(run("sft.py", "--out", "/proc/posttrain/run", "--model", "/nowhere"), "--out", "cannot be created")


# ----------------------------------------------------------------------------- the console

def test_a_quiet_console(small_eval, tmp_path):
    """A default run shows our lines only (the banner before the progress bar starts, the evaluations,
    the bar, the summary); POSTTRAIN_VERBOSE=1 shows the libraries' own bars again."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env.pop("RANK", None)
    for name in ("PYTHONWARNINGS", "HF_HUB_DISABLE_PROGRESS_BARS", "TRANSFORMERS_VERBOSITY"):
        env.pop(name, None)  # as a user runs it (the tests make deprecations errors; a run in this process
        # of the tests (common.run) quiets the libraries through the environment)
    command = [sys.executable, str(ROOT / "sft.py"), *map(str, SFT[1:] + ["--steps", 2, *small_eval])]
    quiet = subprocess.run(command + ["--out", str(tmp_path / "a")], stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT, text=True, env=env, cwd=ROOT, timeout=600)
    text = quiet.stdout.replace("\r", "\n")
    assert quiet.returncode == 0, text[-2000:]
    for noise in ("Loading weights", "Writing model shards", "Warning", "warn"):
        assert noise not in text, text
    assert text.index("global batch") < text.index("0%|")  # the banner whole, then the bar
    loud = subprocess.run(command + ["--out", str(tmp_path / "b")], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True, env={**env, common.VERBOSE: "1"}, cwd=ROOT, timeout=600)
    assert loud.returncode == 0 and "Loading weights" in loud.stdout
