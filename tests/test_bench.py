"""bench.py: the synthetic tokenizer TRL sees, and a one-step smoke run that prints the tables."""

import re

from test_scripts import ok, one_line_error, run

import bench


def test_synthetic_tokenizer_round_trips_ids():
    """TRL takes text: the ids bench.py feeds must come back exactly from that text, with no BOS
    added and a completion appended after its prompt tokenized as the two parts."""
    tok = bench.synthetic_tokenizer(151936)
    ids = [5, 151934, 17, 1, 99999]
    text = " ".join(f"t{i}" for i in ids)
    assert tok(text).input_ids == ids
    assert tok(text + " " + text).input_ids == ids + ids
    assert (tok.pad_token_id, tok.eos_token_id) == (0, 151935)
    assert tok.decode(ids) == text


def table_rows(out, first_column):
    """The rows of the markdown table whose header starts with `first_column`, as lists of cells."""
    lines = out.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(f"| {first_column} |"))
    header = [c.strip() for c in lines[start].strip("|").split("|")]
    rows = []
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        rows.append(dict(zip(header, (c.strip() for c in line.strip("|").split("|")))))
    return header, rows


def test_smoke_one_step():
    proc = ok(run("bench.py", "--methods", "sft,dpo", "--repeats", 1, "--warmup", 0, "--batch-size", 8,
                  "--prompt-len", 4, "--response-len", 4, "--logprob-tokens", "", "--generation-processes", "",
                  timeout=120))
    header, rows = table_rows(proc.stdout, "method")
    assert header[:7] == ["method", "gen s", "score s", "update s", "step s", "tok/s", "peak GB"]
    assert [r["method"] for r in rows] == ["sft", "dpo"]
    for r in rows:
        assert float(r["update s"]) > 0 and float(r["step s"]) >= float(r["update s"])
        assert float(r["tok/s"]) > 0
        assert r["gen s"] == "-"                              # neither samples
    assert rows[0]["score s"] == "-" and float(rows[1]["score s"]) > 0  # DPO scores its reference log-probs
    r = rows[0]  # tok/s is the batch's tokens over the step time (10%: step s is rounded to 3 decimals)
    assert abs(float(r["tok/s"]) - 8 * 8 / float(r["step s"])) <= 0.1 * float(r["tok/s"])
    assert re.search(r"# machine: CPU .*torch", proc.stdout)
    assert "log-prob memory" not in proc.stdout  # --logprob-tokens "" skips that table
    assert "# generation" not in proc.stdout    # and --generation-processes "" the generation table


def test_generation_table(tiny_model_dir):
    """The generation table's measurement on 1 and 2 gloo processes: a row per process count, sample()'s
    total and per-process rates, the per-token-gather rate beside it on 2, model.generate on 1."""
    rows = bench.generation_table([1, 2], "cpu", tiny_model_dir, (2, 3, 4))
    assert [r[0] for r in rows] == ["1", "2"]
    one, two = rows
    assert float(one[1]) == float(one[2]) > 0 and one[3] == "-" and float(one[4]) > 0
    assert abs(float(two[1]) / 2 - float(two[2])) <= 1 and float(two[3]) > 0 and two[4] == "-"


def test_smoke_lora():
    """--lora-rank: the recipes run with adapters on the trained models and the adapters-off reference."""
    proc = ok(run("bench.py", "--methods", "ppo,grpo", "--repeats", 1, "--warmup", 0, "--batch-size", 8,
                  "--prompt-len", 4, "--response-len", 4, "--logprob-tokens", "", "--generation-processes", "",
                  "--lora-rank", 4, timeout=300))
    _, rows = table_rows(proc.stdout, "method")
    assert [r["method"] for r in rows] == ["ppo", "grpo"] and all(float(r["step s"]) > 0 for r in rows)


def test_logprob_memory_runs():
    """The log-prob memory measurement, in this process (its figure is only meaningful in a fresh
    process, as bench.py runs it): both paths run forward and backward and report a peak."""
    for naive in (True, False):
        assert bench.logprob_memory(64, naive, "cpu") >= 0


def test_bad_input():
    one_line_error(run("bench.py", "--methods", "sft,nope"), "unknown method 'nope'")
    one_line_error(run("bench.py", "--methods", "sft", "--batch-size", 6, "--group-size", 4), "--batch-size 6")
    one_line_error(run("bench.py", "--generation-processes", "1,x"), "--generation-processes must be")
