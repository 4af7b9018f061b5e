"""Long runs: a run killed (SIGKILL) or stopped by SIGTERM and then resumed with --resume ends with
the weights of a run never interrupted, and metrics.jsonl lists each step once; bad resumes fail
with one line."""

import importlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file

import common
from test_scripts import ROOT, metrics, ok, one_line_error, run, summary, with_slices

STEPS = 6
DPO = ["dpo.py", "--steps", STEPS, "--batch-size", 8, "--micro-batch-size", 4, "--lr", 1e-3]
DYPO = ["dypo.py", "--steps", STEPS, "--prompts-per-step", 8, "--group-size", 4, "--micro-batch-size", 2,
        "--lr", 1e-3]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, small_eval):
    """One uninterrupted run per command, made once: {(script, processes): its run folder}."""
    runs = {}

    def get(command, gpus=1):
        key = (command[0], gpus)
        if key not in runs:
            runs[key] = tmp_path_factory.mktemp("uninterrupted") / "run"
            ok(run(*command, *small_eval, "--gpus", gpus, "--out", runs[key]))
        return runs[key]
    return get


def start(command, out, log):
    """Start a run on the world's slices (with_slices) as its own process group (so that a kill
    reaches every process it spawns)."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env.pop("RANK", None)
    args = with_slices(command[0], command[1:])
    with open(log, "w") as f:
        return subprocess.Popen([sys.executable, str(ROOT / command[0]), *map(str, args), "--out", str(out)],
                                stdout=f, stderr=subprocess.STDOUT, env=env, cwd=ROOT, start_new_session=True)


def state_step(out):
    latest = out / "state" / "latest"
    return int(latest.read_text().split("-")[1]) if latest.exists() else 0


def last_logged_step(out):
    """The last complete line's step in a running run's metrics.jsonl (0 if none)."""
    lines = (out / "metrics.jsonl").read_text().splitlines(keepends=True)
    complete = [line for line in lines if line.endswith("\n")]
    return json.loads(complete[-1])["step"] if complete else 0


def wait_until(proc, condition, timeout=300):
    deadline = time.time() + timeout
    while not condition():
        assert proc.poll() is None, f"the run ended (status {proc.returncode}) before it could be interrupted"
        assert time.time() < deadline
        time.sleep(0.02)


def weights(out):
    return load_file(out / "model" / "model.safetensors")


def assert_same_run(out, reference):
    """The resumed run ends with the reference run's weights (CPU fp32: within 1e-6), its metrics list
    each step once with the same losses, its summary has the same accuracies and completions.jsonl the
    same greedy responses (before and after training, each once)."""
    a, b = weights(out), weights(reference)
    assert a.keys() == b.keys()
    diff = max((a[k] - b[k]).abs().max().item() for k in a)
    assert diff <= 1e-6, diff
    m, ref = metrics(out), metrics(reference)
    assert [x["step"] for x in m] == list(range(1, STEPS + 1))
    assert [x["train/loss"] for x in m] == pytest.approx([x["train/loss"] for x in ref], abs=1e-6)
    keys = ("accuracy_before", "accuracy_after", "ood_accuracy_before", "ood_accuracy_after")
    assert {k: summary(out)[k] for k in keys} == {k: summary(reference)[k] for k in keys}
    assert (out / "completions.jsonl").read_text() == (reference / "completions.jsonl").read_text()


# (one process: DYPO's loop, the longest; DPO's one process is left out for CI time, its resume is
# checked by test_longer_steps_continue_to_the_longer_run and its kill and SIGTERM with 2 processes)
@pytest.mark.parametrize("command,gpus", [(DYPO, 1), (DPO, 2)], ids=["dypo", "dpo-2-processes"])
def test_sigkill_then_sigterm_then_resume_gives_the_uninterrupted_run(command, gpus, uninterrupted, small_eval,
                                                                       tmp_path):
    """A run killed with SIGKILL after its second checkpoint, resumed, stopped by SIGTERM, and resumed
    again ends as the uninterrupted run. The resumed legs have no --save-every (which may change), so
    the SIGTERM alone writes the state; with 2 processes it goes to the --gpus launcher, which passes it on."""
    out, args = tmp_path / "run", [*command, *small_eval, "--gpus", gpus]

    proc = start([*args, "--save-every", 1], out, tmp_path / "killed.log")
    wait_until(proc, lambda: state_step(out) >= 2)
    os.killpg(proc.pid, signal.SIGKILL)  # a lost node: every process at once, no clean-up
    proc.wait()
    killed = state_step(out)
    assert 2 <= killed < STEPS - 1 and not (out / "summary.json").exists()
    assert (out / "state" / f"step-{killed:08d}" / "state.json").exists()

    proc = start([*args, "--resume"], out, tmp_path / "stopped.log")
    log = tmp_path / "stopped.log"
    wait_until(proc, lambda: f"resumed from {out / 'state'}" in log.read_text()
               and last_logged_step(out) > killed)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=300) == 143
    stopped = state_step(out)
    assert killed < stopped < STEPS and not (out / "summary.json").exists()
    assert [x["step"] for x in metrics(out)] == list(range(1, stopped + 1))
    text = log.read_text()
    assert f"stopped by SIGTERM after step {stopped}" in text and "--resume" in text and "Traceback" not in text

    ok(run(*args, "--resume", "--out", out))
    assert_same_run(out, uninterrupted(command, gpus))


def test_longer_steps_continue_to_the_longer_run(saved, uninterrupted, small_eval, tmp_path):
    """A finished run resumed with a larger --steps ends where a run that long from the start ends."""
    out = tmp_path / "run"
    shutil.copytree(saved, out)
    ok(run(*DPO, *small_eval, "--resume", "--out", out))
    assert_same_run(out, uninterrupted(DPO))


# ----------------------------------------------------------------------------- bad resumes

@pytest.fixture(scope="module")
def saved(tmp_path_factory, small_eval):
    """A finished one-step dpo run, with its state after step 1."""
    out = tmp_path_factory.mktemp("saved") / "run"
    ok(run(*DPO, *small_eval, "--steps", 1, "--save-every", 1, "--out", out))
    return out


def in_process(script, *args, monkeypatch, capsys):
    """Run `script` in this process, as common.run would from the command line (cheaper than a
    subprocess for a run that stops at start-up); returns its exit status and stderr."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # (so init_distributed leaves this process's threads alone)
    monkeypatch.setattr(sys, "argv", [script, *map(str, with_slices(script, args))])
    with pytest.raises(SystemExit) as exit:
        common.run(importlib.import_module(script[:-3]).main)
    return SimpleNamespace(returncode=exit.value.code, stderr=capsys.readouterr().err)


def test_resume_without_a_state(tmp_path, monkeypatch, capsys):
    proc = in_process(*DPO, "--resume", "--out", tmp_path / "empty", monkeypatch=monkeypatch, capsys=capsys)
    one_line_error(proc, "--resume", "no training state", str(tmp_path / "empty"))


def test_resume_another_method(saved, small_eval, monkeypatch, capsys):
    proc = in_process("sft.py", *small_eval, "--resume", "--out", saved, monkeypatch=monkeypatch, capsys=capsys)
    one_line_error(proc, "written by dpo.py, not sft.py")


@pytest.mark.parametrize("option,value", [("--batch-size", 16), ("--model", common.WORLD / "teacher_small")])
def test_resume_a_different_command(saved, small_eval, option, value, monkeypatch, capsys):
    proc = in_process(*DPO, *small_eval, option, value, "--resume", "--out", saved, monkeypatch=monkeypatch,
                      capsys=capsys)
    one_line_error(proc, "different command", option, str(value))


def test_resume_on_another_process_count(saved, small_eval):
    one_line_error(run(*DPO, *small_eval, "--gpus", 2, "--resume", "--out", saved),
                   "written by 1 process(es)", "--gpus 1", "not on 2")


def test_state_loads_without_unpickling(saved):
    """Every file of the state is safetensors, JSON, or a torch file that loads with weights_only=True."""
    folder = saved / "state" / (saved / "state" / "latest").read_text()
    for path in folder.rglob("*"):
        if path.suffix == ".pt":
            torch.load(path, weights_only=True)
        elif path.is_file():
            assert path.suffix in (".safetensors", ".json"), path
