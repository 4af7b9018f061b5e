"""results.py: its experiments are valid commands; a one-experiment, one-seed, two-step call writes
results.md (and a figure where matplotlib is installed) and skips the finished runs when called again."""

import importlib
import importlib.util
import json
import shlex

import pytest

import common
import results
from common import WORLD


def test_every_command_parses(monkeypatch):
    """Every command of every experiment names a script and flags its Args accept, and a label names
    one command list wherever it appears (it is one run folder)."""
    # paths are checked when the run starts (the SFT model of "SFT then RL" is made by then)
    monkeypatch.setattr(common, "check_paths", lambda args: None)
    seen = {}
    for _, rows in results.EXPERIMENTS.values():
        for label, commands, *versus in rows:
            assert seen.setdefault(label, commands) == commands, label
            for command in commands:
                script, *flags = shlex.split(command.format(out="runs/x"))
                module = importlib.import_module(script.removesuffix(".py"))
                common.parse_args(module.Args, flags)  # raises on an unknown flag or a value out of range
    for _, rows in results.EXPERIMENTS.values():
        for label, commands, *versus in rows:
            assert all(v in seen for v in versus), (label, versus)


def test_difference_is_called_one_beyond_the_spread():
    assert results.difference((0.60, 0.01), (0.50, 0.02)) == "+0.100 (beyond sd)"
    assert results.difference((0.50, 0.06), (0.60, 0.05)) == "-0.100 (within sd)"
    assert results.difference((0.60, None), (0.50, 0.02)) == "+0.100 (one seed: not judged)"
    assert results.mean_sd([0.5, 0.7]) == pytest.approx((0.6, 0.1414213))
    assert results.shown(results.mean_sd([0.5])) == "0.500"


def test_one_experiment_one_seed_two_steps(tmp_path, monkeypatch, capsys):
    """Two rows of a made-up experiment, one compared with the other: results.md has both rows with
    n = 1 and the commands; a second call runs nothing."""
    folder = tmp_path / "eval"
    folder.mkdir()
    for split in ("test_id", "test_ood"):
        (folder / f"{split}.jsonl").write_text("".join((WORLD / f"{split}.jsonl").read_text()
                                                       .splitlines(keepends=True)[:16]))
    small = f"--batch-size 8 --eval-every 1 --eval-data {folder}/test_id.jsonl --ood-data {folder}/test_ood.jsonl"
    monkeypatch.setattr(results, "EXPERIMENTS", {"tiny": ("Two quick rows", [
        ("SFT", [f"sft.py {small}"]), ("DPO", [f"dpo.py {small}"], "SFT")])})
    out = tmp_path / "results"
    assert results.main(["--only", "tiny", "--seeds", "1", "--steps", "2", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "2 runs: 0 finished already (skipped), 2 to do" in printed
    assert "$ python sft.py" in printed and "--seed 1" in printed
    md = (out / "results.md").read_text()
    sft_row = next(line for line in md.splitlines() if line.startswith("| SFT | 1 |"))
    dpo_row = next(line for line in md.splitlines() if line.startswith("| DPO | 1 |"))
    assert "`python sft.py" in sft_row and "--steps 2" in sft_row
    assert "| SFT | " in dpo_row and "(one seed: not judged)" in dpo_row  # compared with SFT
    if importlib.util.find_spec("matplotlib"):
        assert (out / "accuracy.png").stat().st_size > 1000 and "![accuracy.png](accuracy.png)" in md
    else:
        assert "pip install matplotlib" in md

    stamp = (out / "runs" / "sft" / "seed1" / "run.json").stat().st_mtime_ns
    assert results.main(["--only", "tiny", "--seeds", "1", "--steps", "2", "--out", str(out)]) == 0
    assert "2 runs: 2 finished already (skipped), 0 to do" in capsys.readouterr().out
    assert (out / "runs" / "sft" / "seed1" / "run.json").stat().st_mtime_ns == stamp
    assert (out / "results.md").read_text() == md


def test_mechanisms_table_early_late_whole(tmp_path):
    """Two finished PPO seeds and one DPPO seed with made-up metrics.jsonl: early, late and whole-run
    means per seed (first and last 20% of the lines that have the key), then mean +- sd over seeds."""
    labels = {row[0] for _, rows in results.EXPERIMENTS.values() for row in rows}
    assert {label for label, _, _ in results.MECHANISMS} <= labels
    ppo = {1: [0.1 * i for i in range(10)], 2: [0.2, 0.4, 0.6, 0.8, 1.0]}  # 20%: 2 lines, then 1 line
    runs = {}
    for label, seeds in (("PPO", ppo), ("DPPO", {1: [3e-4, 1e-4, 2e-4]})):
        for seed, values in seeds.items():
            run = results.make_run(label, ["ppo.py"], seed, tmp_path, "")
            run.folder.mkdir(parents=True)
            key = "critic/explained_variance" if label == "PPO" else "policy/masked_frac"
            lines = [{"step": i + 1, key: v} for i, v in enumerate(values)] + [{"step": 99, "eval/accuracy": 0.5}]
            (run.folder / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in lines))
            (run.folder / "run.json").write_text(json.dumps({"commands": run.commands, "seconds": 1}))
            runs.setdefault(label, []).append(run)
    lines = results.mechanisms(lambda label: [r for r in runs.get(label, []) if r.finished()])
    assert lines[1] == "|---|---|---|---|---|---|---|" and len(lines) == 2 + 1 + 2  # PPO, DPPO's two keys
    # PPO: seed 1 early (0 + 0.1) / 2, late (0.8 + 0.9) / 2, whole 0.45; seed 2: 0.2, 1.0, 0.6;
    # every pair of seeds differs by 0.15: sample sd 0.15 / sqrt(2) = 0.106
    assert lines[2] == ("| PPO | `critic/explained_variance` | critic explained variance | 2 "
                        "| 0.125 +- 0.106 | 0.925 +- 0.106 | 0.525 +- 0.106 |")
    # DPPO, one seed of 3 lines: early and late are one line each, a share of 0.0002 is not shown as 0.000;
    # clipfrac was never logged
    assert lines[3].startswith("| DPPO | `policy/masked_frac` |") and lines[3].endswith("| 1 | 0.0003 | 0.0002 | 0.0002 |")
    assert lines[4].startswith("| DPPO | `policy/clipfrac` |") and lines[4].endswith("| 0 | - | - | - |")
    assert results.mechanisms(lambda label: []) == []
