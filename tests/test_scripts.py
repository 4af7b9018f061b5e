"""End-to-end runs of the scripts on the tiny world: smoke, learning, equivalences, bad input."""

import atexit
import importlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch

import common

ROOT = Path(__file__).resolve().parent.parent
WORLD = ROOT / "world"


SLICES = Path(tempfile.mkdtemp(prefix="world_slices_"))
atexit.register(shutil.rmtree, SLICES, ignore_errors=True)


def head(path, n):
    """A file of the first n lines of a world file (written once, in SLICES)."""
    out = SLICES / f"{n}_{Path(path).name}"
    if not out.exists():
        out.write_text("".join(Path(path).read_text().splitlines(keepends=True)[:n]))
    return out


# For the tests that learn: the first 100 problems of each split, where a 10-point lift is 10 problems.
EVAL100 = ["--eval-data", head(WORLD / "test_id.jsonl", 100), "--ood-data", head(WORLD / "test_ood.jsonl", 100)]


def with_slices(script, args):
    """`args`, plus the slices of the world a test runs on where they name none of their own: the first
    16 problems of each test split as --eval-data and --ood-data (greedy worked solutions for all
    2 x 500 cost about 10 s per evaluation; the tests that learn ask for EVAL100) and, for a method file,
    the first 2,000 records of its default --data (tokenizing all 20,000 or 40,000 at start-up costs
    about 2 s per run)."""
    if script == "bench.py":
        return args
    named = {str(a) for a in args}
    data = getattr(getattr(importlib.import_module(script[:-3]), "Args", None), "data", None)
    return (*args, *([] if "--eval-data" in named else ["--eval-data", head(WORLD / "test_id.jsonl", 16)]),
            *([] if "--ood-data" in named else ["--ood-data", head(WORLD / "test_ood.jsonl", 16)]),
            *([] if "--data" in named or data is None else ["--data", head(data, 2000)]))


def run(script, *args, timeout=600, env=None):
    """Run a script as a user would (with `env` added to the environment) on the world's slices
    (with_slices); returns the CompletedProcess (stdout/stderr as text)."""
    env = dict(os.environ, PYTHONUNBUFFERED="1", **(env or {}))
    env.pop("RANK", None)
    args = with_slices(script, args)
    return subprocess.run([sys.executable, str(ROOT / script), *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, env=env, cwd=ROOT)


def ok(proc):
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def metrics(out):
    return [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]


def summary(out):
    return json.loads((Path(out) / "summary.json").read_text())


def one_line_error(proc, *needles):
    """The failure a user should see: non-zero exit, exactly one `error:` line naming the problem,
    and no stack trace."""
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, proc.stderr[-3000:]
    for needle in needles:
        assert needle in errors[0], errors[0]
    return errors[0]


SUMMARY_FIELDS = {"method", "steps", "seconds", "accuracy_before", "accuracy_after", "ood_accuracy_before",
                  "ood_accuracy_after", "peak_mem_gb"}


@pytest.mark.parametrize("script", ["sft.py", "dpo.py"])
def test_smoke(script, tmp_path):
    out = tmp_path / "run"
    proc = ok(run(script, "--steps", 2, "--batch-size", 8, "--micro-batch-size", 4, "--out", out))
    s = summary(out)
    assert SUMMARY_FIELDS <= set(s) and s["steps"] == 2 and s["method"] == script[:-3]
    assert json.loads(proc.stdout[proc.stdout.index("{"):]) == s  # the summary is also printed
    assert [m["step"] for m in metrics(out)] == [1, 2]
    assert (out / "model" / "model.safetensors").is_file() and (out / "model" / "tokenizer.json").is_file()


def test_eval_every(tmp_path):
    """--eval-every 2 over 4 steps: greedy ID and OOD accuracy in the lines of steps 2 and 4 only, the
    last equal to the accuracy after training; every evaluation's first 4 responses per split in
    completions.jsonl (the last step's once), scored as common.reward scores them, and two printed
    before and after training."""
    out = tmp_path / "run"
    proc = ok(run("sft.py", "--steps", 4, "--batch-size", 8, "--eval-every", 2, "--out", out))
    shown = [json.loads(line) for line in (out / "completions.jsonl").read_text().splitlines()]
    assert [(c["step"], c["split"]) for c in shown] == [(s, split) for s in (0, 2, 4) for split in ("id", "ood")
                                                         for _ in range(4)]
    answers = {json.loads(line)["prompt"]: json.loads(line)["answer"]
               for split in ("test_id", "test_ood") for line in (WORLD / f"{split}.jsonl").read_text().splitlines()}
    assert all(c["reward"] == common.reward(c["response"], answers[c["prompt"]]) for c in shown)
    for c in shown[:2] + shown[-8:-6]:  # the first two ID problems, before and after training
        assert f"  {c['prompt']} -> {c['response']}  (" in proc.stdout
    m = metrics(out)
    assert [x["step"] for x in m if "eval/accuracy" in x] == [2, 4]
    assert [x["step"] for x in m if "eval/ood_accuracy" in x] == [2, 4]
    s = summary(out)
    assert (m[-1]["eval/accuracy"], m[-1]["eval/ood_accuracy"]) == (s["accuracy_after"], s["ood_accuracy_after"])
    assert "step 2: accuracy" in proc.stdout


@pytest.mark.parametrize("script", ["sft", "dpo", "ppo", "grpo", "dppo", "dypo", "opd", "opd_plus", "tropd"])
def test_the_loop_shows_its_steps(script):
    """Evaluation every --eval-every steps and the stop after a SIGTERM are lines of each main() loop
    (as in nanoGPT's), not hidden in the logger or the checkpointer."""
    import inspect
    loop = inspect.getsource(importlib.import_module(script).main).split("for step, ")[1]
    for line in ("if args.eval_every and step % args.eval_every == 0:", "evaluate_splits(model, tokenizer, args, d)",
                 "stop = ckpt.sigterm()", "ckpt.save(step)", "ckpt.exit(step)"):
        assert line in loop, line


def test_dpo_learns(tmp_path):
    """The issue's bar: DPO on all its data raises ID accuracy by >= 10 points on the tiny world, in a
    third of the default run at about three times its rate (50 steps at lr 1e-4: 0.34 -> 0.49 on the
    100-problem slice, 35 s, seed 1; the default, 150 steps at 3e-5, is in the README: 0.346 -> 0.546 +- 0.030
    over 3 seeds)."""
    out = tmp_path / "dpo"
    ok(run("dpo.py", "--data", WORLD / "prefs.jsonl", "--steps", 50, "--lr", 1e-4, *EVAL100, "--out", out))
    s = summary(out)
    assert s["accuracy_after"] >= s["accuracy_before"] + 0.10, s
    m = metrics(out)
    assert m[-1]["rewards/accuracy"] > 0.8 and m[-1]["rewards/margin"] > m[0]["rewards/margin"]


def losses(out):
    return [m["train/loss"] for m in metrics(out)]


def test_micro_batching_matches_one_batch(tmp_path):
    """Gradient accumulation over 4 micro-batches gives the same losses, step after step."""
    common = ["--steps", 3, "--batch-size", 16, "--lr", 1e-3]
    ok(run("dpo.py", *common, "--micro-batch-size", 16, "--out", tmp_path / "a"))
    ok(run("dpo.py", *common, "--micro-batch-size", 4, "--out", tmp_path / "b"))
    assert losses(tmp_path / "a") == pytest.approx(losses(tmp_path / "b"), abs=1e-5)


@pytest.mark.parametrize("script", ["sft.py", "dpo.py"])
def test_two_processes_match_one(script, tmp_path):
    """--gpus 2 on CPU (gloo, FSDP2) gives the same losses as 1 process on the same global batch:
    the same data split, loss normalisation and gradient averaging."""
    common = ["--steps", 3, "--batch-size", 16, "--micro-batch-size", 4, "--lr", 1e-3]
    ok(run(script, *common, "--gpus", 1, "--out", tmp_path / "one"))
    ok(run(script, *common, "--gpus", 2, "--out", tmp_path / "two"))
    assert losses(tmp_path / "one") == pytest.approx(losses(tmp_path / "two"), abs=1e-4)
    assert summary(tmp_path / "one")["accuracy_after"] == pytest.approx(summary(tmp_path / "two")["accuracy_after"],
                                                                       abs=0.01)
    # the checkpoint gathered from the shards equals the single-process one
    from safetensors.torch import load_file
    one, two = (load_file(tmp_path / r / "model" / "model.safetensors") for r in ("one", "two"))
    assert one.keys() <= two.keys()  # (the gathered state dict also lists the tied lm_head.weight)
    for k in one:
        assert torch.allclose(one[k], two[k], atol=1e-4), k


# ----------------------------------------------------------------------------- bad input

def test_missing_model(tmp_path):
    one_line_error(run("dpo.py", "--model", tmp_path / "no_such_model"), "no_such_model")


def test_missing_data_file(tmp_path):
    one_line_error(run("dpo.py", "--data", tmp_path / "nope.jsonl"), "nope.jsonl", "does not exist")


def test_malformed_jsonl_line(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "1+1=", "chosen": "2", "rejected": "3"}\n{"prompt": "2+2=", "chosen": \n')
    one_line_error(run("dpo.py", "--data", bad), "bad.jsonl", "line 2")


def test_missing_field(tmp_path):
    bad = tmp_path / "typo.jsonl"
    bad.write_text('{"prompt": "1+1=", "choosen": "2", "rejected": "3"}\n')
    one_line_error(run("dpo.py", "--data", bad), "typo.jsonl", "line 1", "'chosen'", "choosen")


def test_unknown_option():
    proc = run("dpo.py", "--betta", "0.2")
    assert proc.returncode != 0 and "Traceback" not in proc.stderr and "--betta" in proc.stderr


def test_batch_not_divisible_by_processes(tmp_path):
    one_line_error(run("sft.py", "--gpus", 2, "--batch-size", 7, "--out", tmp_path / "r"), "7", "2 processes")


def test_nan_loss_stops_and_keeps_last_checkpoint(tmp_path):
    """A learning rate of 1e30 (in range, if absurd) blows the weights up at step 1's update, so step
    2's loss is NaN: the run stops there, before step 2's periodic checkpoint (--save-every 2), and
    the checkpoint an earlier run left stays as it was, byte for byte."""
    out = tmp_path / "run"
    ok(run("dpo.py", "--steps", 1, "--batch-size", 8, "--micro-batch-size", 8, "--out", out))
    before = {p.name: p.read_bytes() for p in (out / "model").iterdir()}
    err = one_line_error(run("dpo.py", "--steps", 3, "--batch-size", 8, "--micro-batch-size", 8, "--save-every", 2,
                             "--lr=1e30", "--out", out), "nan", "step 2")
    assert str(out / "model") in err
    assert {p.name: p.read_bytes() for p in (out / "model").iterdir()} == before
    assert not [p for p in out.iterdir() if p.name.startswith(".") and p.name != ".lock"]  # no half-written
    # checkpoint left (.lock: the run folder's lock, README: Errors)
