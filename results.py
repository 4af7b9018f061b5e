"""Every experiment of the README on the tiny world, over several seeds: tables and figures.

Run:
  python results.py                        # every experiment, seeds 1-3: 90 runs, about 4 h 40 min on a 2-core CPU
  python results.py --only dppo --only tropd
  python results.py --seeds 1 --steps 2    # a smoke test: every command 2 steps long

An experiment is a caption and a list of rows; a row is a label, the method-script commands of one
run (run in turn: SFT then RL is two), and optionally the label of the row it is compared with. Every
command gets `--seed <k>`, and `--out <run folder>` unless it names its own `--out` inside it
(`{out}` stands for the run folder, results/runs/<label>/seed<k>). A label is one run folder
wherever it appears, so the rows the experiments share run once.

A run is finished when its run.json (written last, after every command exited 0) holds the commands
asked for now: finished runs are skipped, so an interrupted results.py continues where it stopped,
and an unfinished run starts again from an empty folder. Each command's output goes to the run's
log.txt; a failed command prints its last lines and the rest go on.

Writes results/results.md: per experiment, per row, the mean +- sample sd over the seeds of the
greedy accuracy after training (ID and OOD), n, the difference to the row it is compared with, the
accuracy before, the wall seconds of a run, the peak memory, and the exact commands. A difference is
called one only where the two rows' mean +- sd intervals do not overlap. Then the mechanisms table: per
row of MECHANISMS, the metric that shows its method's mechanism at work (critic explained variance,
masked and clipped token shares, routing shares, trusted tokens and teacher prefix, accuracy at the
evaluation steps), early, late and over the whole run. With matplotlib installed (optional, used
only here) also the PNG figures of FIGURES; without it the tables are still written.
"""

import argparse
import json
import re
import shlex
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

ROOT = Path(__file__).resolve().parent
EVAL = "--eval-every 20"  # greedy ID and OOD accuracy every 20 steps, for the accuracy-over-steps figure

# ----------------------------------------------------------------------------- the experiments

# Rows that more than one experiment shows
DPPO = ("DPPO", [f"dppo.py {EVAL}"])
DYPO = ("DYPO", [f"dypo.py {EVAL}"])
OPD = ("OPD", [f"opd.py {EVAL}"])
OPD_PLUS_JSD = ("OPD+ jsd", [f"opd_plus.py {EVAL}"])
TROPD = ("TrOPD", [f"tropd.py {EVAL}"])

# Regimes where a trust region should matter (40 steps each): stale updates (32 updates per rollout
# instead of 4, the probe of issue 14), a 6x learning rate, and a sampler that differs from the learner
# (rollouts drawn from the policy's weights rounded to bf16, as a bf16 inference engine's copy is).
STRESS = {"stale": "--epochs 4 --minibatches 8 --micro-batch-size 32 --lr 1e-4 --steps 40",
          "lr 3e-4": "--lr 3e-4 --steps 40",
          "bf16 sampler": "--rollout-precision bf16 --steps 40"}

EXPERIMENTS = {
    "main": ("Every method against the base student, default flags", [
        ("SFT", [f"sft.py {EVAL}"]),
        ("DPO", [f"dpo.py {EVAL}"]),
        ("PPO", [f"ppo.py {EVAL}"]),
        ("GRPO", [f"grpo.py {EVAL}"]),
        DPPO, DYPO, OPD, OPD_PLUS_JSD, TROPD]),
    "dypo": ("DYPO against SFT then RL and against GRPO alone, on the same budget (100 steps of 32 prompts), "
             "DYPO without its GAL or its SFT term, and with GRPO's per-response token mean (the earlier reading)", [
        DYPO,
        ("SFT then RL", ["sft.py --data world/teacher_sft.jsonl --steps 50 --batch-size 32 --micro-batch-size 32 "
                         "--lr 5e-5 --warmup-steps 5 --out {out}/sft",
                         "dypo.py --model {out}/sft/model --alpha 1 --sft-weight 0 --steps 50"], "DYPO"),
        ("GRPO alone", ["dypo.py --alpha 1 --sft-weight 0"], "DYPO"),
        ("DYPO without GAL", ["dypo.py --alpha 1"], "DYPO"),
        ("DYPO without SFT", ["dypo.py --sft-weight 0"], "DYPO"),
        ("DYPO GRPO token mean", ["dypo.py --grpo-agg mean"], "DYPO")]),
    "dppo": ("DPPO against its ratio-clip baseline: default flags, then three stress regimes", [
        DPPO, ("clip", ["dppo.py --trust-region clip"], "DPPO"),
        *[row for regime, flags in STRESS.items() for row in
          ((f"DPPO {regime}", [f"dppo.py {flags}"]),
           (f"clip {regime}", [f"dppo.py --trust-region clip {flags}"], f"DPPO {regime}"))]]),
    "opd_plus": ("OPD+ for three f-divergences, its unbiased advantage against --stop-gradient", [
        row for div in ("rkl", "fkl", "jsd") for row in
        ((f"OPD+ {div}", [f"opd_plus.py --divergence {div}"]) if div != "jsd" else OPD_PLUS_JSD,
         (f"OPD+ {div} stop-grad", [f"opd_plus.py --divergence {div} --stop-gradient"], f"OPD+ {div}"))]),
    "tropd": ("TrOPD (top-K forward KL loss on outliers, teacher-prefix guidance) against OPD, its ablations, and "
              "the KL used as a detached advantage (the earlier reading)", [
        OPD, (*TROPD, "OPD"),
        ("TrOPD outliers mask", ["tropd.py --outlier mask"], "TrOPD"),
        ("TrOPD outliers clip", ["tropd.py --outlier clip"], "TrOPD"),
        ("TrOPD no guidance", ["tropd.py --guide-steps 0"], "TrOPD"),
        ("TrOPD fkl as advantage", ["tropd.py --outlier fkl-advantage"], "TrOPD")]),
}

# Figures: file -> (title, panels); a panel is (title, y-axis label, lines); a line is (legend, row
# label, metric key), drawn as the mean over the seeds with a band from the lowest to the highest seed.
MAIN_LABELS = [row[0] for row in EXPERIMENTS["main"][1]]
FIGURES = {
    "accuracy.png": ("Greedy accuracy over training, every method (step 0: the base student)", [
        ("in distribution", "accuracy (share of 500 right)", [(m, m, "eval/accuracy") for m in MAIN_LABELS]),
        ("out of distribution", "accuracy (share of 500 right)", [(m, m, "eval/ood_accuracy") for m in MAIN_LABELS])]),
    "dypo_routes.png": ("DYPO: how the prompts of each step are routed (the paper's Figure 4)", [
        ("routes", "share of the step's prompts", [
            ("Hard (no sample right: SFT)", "DYPO", "route/hard"), ("Mid (some right: GRPO + GAL)", "DYPO", "route/mid"),
            ("Easy (all right: dropped)", "DYPO", "route/easy")])]),
    "opd_plus_kl.png": ("OPD+: reverse KL to the teacher, unbiased advantage vs --stop-gradient", [
        (div, "reverse KL (nats per token)", [("unbiased", f"OPD+ {div}", "distill/reverse_kl"),
                                              ("--stop-gradient", f"OPD+ {div} stop-grad", "distill/reverse_kl")])
        for div in ("rkl", "fkl", "jsd")]),
    "dppo_stress.png": ("DPPO vs ratio clip under stress (40 rollout steps each)", [
        (f"{regime}: {what}", unit, [(name, f"{name} {regime}", key) for name in ("DPPO", "clip")])
        for regime in STRESS for what, unit, key in (
            ("reward", "sampled accuracy (share right)", "rollout/reward_mean"),
            ("masked", "share of tokens DPPO's mask zeroes", "policy/masked_frac"),
            ("clipped", "share of tokens the clip cuts", "policy/clipfrac"))]),
    "tropd.png": ("TrOPD: trust region and teacher-prefix guidance", [
        (what, unit, [(row[0], row[0], key) for row in EXPERIMENTS["tropd"][1][1:]])
        for what, unit, key in (("trusted tokens", "share of sampled tokens", "trust/trusted_fraction"),
                                ("teacher prefix", "prefix / teacher response tokens", "guide/prefix_fraction"))]),
}

# Mechanisms: (row label, what it shows, metric key), the metric that shows the row's method at work.
# OPD and GRPO: accuracy at the evaluation steps, a dense teacher signal against a sparse reward per step.
MASKED = ("share of tokens DPPO's mask zeroes", "policy/masked_frac")
CLIPPED = ("share of tokens the ratio clip would cut", "policy/clipfrac")
MECHANISMS = [
    ("PPO", "critic explained variance", "critic/explained_variance"),
    *[(f"DPPO{r}", what, key) for r in ("", *(f" {r}" for r in STRESS)) for what, key in (MASKED, CLIPPED)],
    *[(f"clip{r}", *CLIPPED) for r in ("", *(f" {r}" for r in STRESS))],
    *[("DYPO", f"share of prompts routed {route}", f"route/{route}") for route in ("hard", "mid", "easy")],
    ("TrOPD", "share of sampled tokens trusted", "trust/trusted_fraction"),
    ("TrOPD", "teacher prefix / teacher response tokens", "guide/prefix_fraction"),
    *[(label, "greedy ID accuracy at the evaluation steps", "eval/accuracy") for label in ("OPD", "GRPO")],
]


# ----------------------------------------------------------------------------- runs

def folder_name(label):
    return re.sub(r"[^a-z0-9]+", "-", label.lower().replace("+", " plus")).strip("-")


@dataclass
class Run:
    label: str
    seed: int
    folder: Path
    commands: list  # without the leading `python`

    def finished(self):
        path = self.folder / "run.json"
        return path.is_file() and json.loads(path.read_text())["commands"] == self.commands

    def summaries(self):
        """The summary.json of each command, in order."""
        return [json.loads((out_of(c) / "summary.json").read_text()) for c in self.commands]

    def metrics(self):
        """The last command's metrics.jsonl."""
        return [json.loads(line) for line in (out_of(self.commands[-1]) / "metrics.jsonl").read_text().splitlines()]

    def seconds(self):
        return json.loads((self.folder / "run.json").read_text())["seconds"]

    def go(self):
        """Run the commands in turn from an empty folder; True when all exit 0."""
        shutil.rmtree(self.folder, ignore_errors=True)
        self.folder.mkdir(parents=True)
        start = time.time()
        for command in self.commands:
            tqdm.write(f"$ python {command}")
            with open(self.folder / "log.txt", "a") as log:
                status = subprocess.run([sys.executable, *shlex.split(command)], cwd=ROOT, stdout=log,
                                        stderr=subprocess.STDOUT).returncode
            if status != 0:
                tail = [line for line in re.split(r"[\r\n]", (self.folder / "log.txt").read_text()) if line.strip()]
                tqdm.write(f"FAILED (exit status {status}), last lines of {self.folder / 'log.txt'}:\n  "
                           + "\n  ".join(tail[-8:]))
                return False
        (self.folder / "run.json").write_text(json.dumps({"commands": self.commands,
                                                          "seconds": round(time.time() - start, 1)}))
        return True


def out_of(command):
    words = shlex.split(command)
    return ROOT / words[words.index("--out") + 1]


def make_run(label, commands, seed, runs_dir, extra):
    folder = runs_dir / folder_name(label) / f"seed{seed}"
    out = str(folder.relative_to(ROOT)) if folder.is_relative_to(ROOT) else str(folder)
    filled = [c.format(out=out) + f" --seed {seed}" + ("" if "--out" in c.split() else f" --out {out}") + extra
              for c in commands]
    return Run(label, seed, folder, filled)


# ----------------------------------------------------------------------------- tables

def mean_sd(values):
    """(mean, sample sd); the sd is None for one value, the whole None for none."""
    return (statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else None) if values else None


def shown(stat, spec=".3f"):
    """'mean +- sd' in the format spec ('.3g' keeps a share of 0.0004 from showing as 0.000); '-' for None."""
    if stat is None:
        return "-"
    return f"{stat[0]:{spec}}" + ("" if stat[1] is None else f" +- {stat[1]:{spec}}")


def difference(a, b):
    """'+0.050 (beyond sd)': the difference of two (mean, sd), called one only where the intervals
    mean +- sd do not overlap."""
    if a is None or b is None:
        return "-"
    if a[1] is None or b[1] is None:
        return f"{a[0] - b[0]:+.3f} (one seed: not judged)"
    beyond = abs(a[0] - b[0]) > a[1] + b[1]
    return f"{a[0] - b[0]:+.3f} ({'beyond' if beyond else 'within'} sd)"


def table(rows, done_runs, commands_of):
    """The markdown lines of one experiment; done_runs(label) lists its finished runs, commands_of(label)
    gives its commands as run, the seed shown as <k>."""
    stats = {}
    for label, *_ in rows:
        done = done_runs(label)
        summaries = [r.summaries() for r in done]
        stats[label] = {"id": mean_sd([s[-1]["accuracy_after"] for s in summaries]),
                        "ood": mean_sd([s[-1]["ood_accuracy_after"] for s in summaries]),
                        "before": mean_sd([s[0]["accuracy_before"] for s in summaries]),
                        "seconds": mean_sd([r.seconds() for r in done]), "n": len(done),
                        "peak": max((c["peak_mem_gb"] for s in summaries for c in s), default=None)}
    lines = ["| run | n | ID after | OOD after | vs | ID difference | OOD difference | ID before | s / run | peak GB "
             "| command |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for label, _, *versus in rows:
        s, v = stats[label], stats[versus[0]] if versus else None
        command = " then ".join(f"`python {c}`" for c in commands_of(label))
        peak = "-" if s["peak"] is None else f"{s['peak']:.2f}"
        lines.append(f"| {label} | {s['n']} | {shown(s['id'])} | {shown(s['ood'])} | {versus[0] if versus else ''} "
                     f"| {difference(s['id'], v['id']) if v else ''} | {difference(s['ood'], v['ood']) if v else ''} "
                     f"| {shown(s['before'])} | {shown(s['seconds'], '.0f')} "
                     f"| {peak} | {command} |")
    return lines


def mechanisms(done_runs):
    """The markdown lines of the mechanisms table ([] when no row of MECHANISMS has a finished run).
    Per seed, the mean of the metric over the lines of its last command's metrics.jsonl that have it:
    its first 20% (at least one line), its last 20% (at least one line), all of them; each cell is the
    mean +- sample sd of that over the seeds that logged the metric (n), to 3 significant digits."""
    lines = []
    for label, what, key in MECHANISMS:
        done = done_runs(label)
        if not done:
            continue
        seeds = [v for v in ([m[key] for m in r.metrics() if key in m] for r in done) if v]
        k = [max(1, len(v) // 5) for v in seeds]
        early, late, whole = (mean_sd([statistics.fmean(part) for part in parts]) for parts in (
            [v[:n] for v, n in zip(seeds, k)], [v[-n:] for v, n in zip(seeds, k)], seeds))
        cells = " | ".join(shown(stat, ".3g") for stat in (early, late, whole))
        lines.append(f"| {label} | `{key}` | {what} | {len(seeds)} | {cells} |")
    return ["| run | metric | what it shows | n | early (first 20% of steps) | late (last 20%) | whole run mean |",
            "|---|---|---|---|---|---|---|", *lines] if lines else []


# ----------------------------------------------------------------------------- figures

def series(run, key):
    """{step: value} of one metric; eval/* also gets step 0 (before training) and the last step."""
    points = {m["step"]: m[key] for m in run.metrics() if key in m}
    if key.startswith("eval/"):
        name = key.split("/")[1]
        summaries = run.summaries()
        first, last = summaries[0], summaries[-1]
        points.update({0: first[f"{name}_before"], last["steps"]: last[f"{name}_after"]})
    return points


def figures(out, done_runs):
    """Draw the FIGURES that have data; returns the files written."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    written = []
    for file, (title, panels) in FIGURES.items():
        cols = min(len(panels), 3)
        nrows = -(-len(panels) // cols)
        fig, axes = plt.subplots(nrows, cols, figsize=(max(5 * cols, 7), 3.4 * nrows + 0.8), squeeze=False)
        drawn = 0
        for ax, (panel, ylabel, lines) in zip(axes.flat, panels):
            for legend, label, key in lines:
                seeds = [p for p in (series(r, key) for r in done_runs(label)) if p]
                if not seeds:
                    continue
                steps = sorted(set.intersection(*(set(p) for p in seeds)))
                values = [[p[s] for p in seeds] for s in steps]
                line, = ax.plot(steps, [statistics.fmean(v) for v in values], label=f"{legend} (n={len(seeds)})")
                ax.fill_between(steps, [min(v) for v in values], [max(v) for v in values], color=line.get_color(),
                                alpha=0.2, linewidth=0)
                drawn += 1
            ax.set(title=panel, xlabel="training step", ylabel=ylabel)
            ax.grid(alpha=0.3)
            if ax.lines:
                ax.legend(fontsize=7)
        for ax in list(axes.flat)[len(panels):]:
            ax.axis("off")
        if drawn:
            fig.suptitle(f"{title}\nline: mean over seeds; band: lowest to highest seed", fontsize=11)
            fig.tight_layout()
            fig.savefig(out / file, dpi=100)
            written.append(file)
        plt.close(fig)
    return written


# ----------------------------------------------------------------------------- main

def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, default=3, help="run seeds 1..N (default 3)")
    parser.add_argument("--only", action="append", choices=list(EXPERIMENTS),
                        help="run only this experiment (repeat for several)")
    parser.add_argument("--out", default="results", help="folder for results.md, the figures and runs/")
    parser.add_argument("--steps", type=int, help="append --steps N to every command (quick checks)")
    args = parser.parse_args(argv)
    if args.seeds < 1:
        parser.error("--seeds must be >= 1")
    out = Path(args.out).resolve()
    names = args.only or list(EXPERIMENTS)
    extra = f" --steps {args.steps}" if args.steps else ""
    rows = {row[0]: row[1] for name in names for row in EXPERIMENTS[name][1]}  # a shared row once
    runs = [make_run(label, commands, seed, out / "runs", extra) for label, commands in rows.items()
            for seed in range(1, args.seeds + 1)]
    todo = [r for r in runs if not r.finished()]
    print(f"{len(runs)} runs: {len(runs) - len(todo)} finished already (skipped), {len(todo)} to do")

    start, failed = time.time(), {}
    for run in tqdm(todo, unit="run", dynamic_ncols=True):
        if not run.go():
            failed[run.label] = failed.get(run.label, 0) + 1

    def done_runs(label):
        return [r for r in runs if r.label == label and r.finished()]

    finished = [r for r in runs if r.finished()]
    text = ["# Results on the tiny world", "",
            f"`python results.py` ({args.seeds} seeds{', every command --steps ' + str(args.steps) if args.steps else ''})."
            " Accuracy: greedy, share of 500 held-out problems right, in distribution (ID) and out of distribution"
            " (OOD). Each cell: mean +- sample sd over the n seeds (1, 2, ...). A difference to the row named in"
            " `vs` is called one (beyond sd) only where the two mean +- sd intervals do not overlap. s / run: wall"
            " seconds of the whole run (loading, every evaluation, saving); peak GB: the highest peak memory of any seed; all on the machine that ran them.", ""]
    for name in names:
        caption, experiment_rows = EXPERIMENTS[name]
        text += [f"## {name}", "", caption + ".", "",
                 *table(experiment_rows, done_runs, lambda label: make_run(label, rows[label], "<k>", out / "runs",
                                                                            extra).commands), ""]
    if mechanism_lines := mechanisms(done_runs):
        text += ["## mechanisms", "", "Per run, the metric that shows its method's mechanism at work, from the"
                 " last command's metrics.jsonl: per seed the mean over the first 20% of the lines that log it"
                 " (early), the last 20% (late) and all of them, then mean +- sample sd over the n seeds that"
                 " logged it. OPD against GRPO: greedy ID accuracy at the --eval-every steps, a dense teacher"
                 " signal against a sparse reward.", "", *mechanism_lines, ""]
    text += [f"{len(finished)} runs finished, {sum(r.seconds() for r in finished) / 60:.1f} min of runs in all"
             + (f"; {sum(failed.values())} failed: {', '.join(failed)}" if failed else "") + ".", ""]
    out.mkdir(parents=True, exist_ok=True)
    try:
        import matplotlib  # noqa: F401  (optional: only the figures need it)
    except ImportError:
        hint = "No figures: matplotlib is not installed (`pip install matplotlib`, then run this again: finished runs are skipped)."
        print(hint)
        text.append(hint)
    else:
        text += [f"![{file}]({file})" for file in figures(out, done_runs)]
    (out / "results.md").write_text("\n".join(text) + "\n")
    print(f"wrote {out / 'results.md'} in {(time.time() - start) / 60:.1f} min"
          + (f"; {sum(failed.values())} run(s) failed" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
