"""Hostile input, seeded: every case ends normally or with one `error:` line and exit status 1, never
a stack trace, and a run refused at start-up writes nothing into --out (which start-up creates). Parsing, reading and
validation are fuzzed in-process (hundreds of cases, fast); a handful of whole-script runs cover
what main() adds (the one-line report, the context fit on a real run, a step that trains nothing)."""

import dataclasses
import importlib
import json
import math
import os
import random
from types import SimpleNamespace

import pytest
from transformers import AutoConfig

import common
from test_scripts import WORLD, ok, one_line_error, run, summary
from world.build import make_tokenizer

SCRIPTS = ["sft", "dpo", "ppo", "grpo", "dppo", "dypo", "opd", "opd_plus", "tropd", "bench"]
ARGS = {name: importlib.import_module(name).Args for name in SCRIPTS}

# what each method file reads from --data: (fields, optional fields, fields cut to the context, reserve)
READS = {
    "sft": (("prompt", "completion"), (), ("completion",), 0),
    "dpo": (("prompt", "chosen", "rejected"), (), ("chosen", "rejected"), 0),
    "ppo": (("prompt", "answer"), (), (), 0),
    "dypo": (("prompt", "answer"), ("teacher_responses",), ("teacher_responses",), 0),
    "tropd": (("prompt", "answer"), ("teacher_responses",), ("teacher_responses",), 9),
}


def one_line(e):
    """A UserError's message, checked to be the kind a user can act on."""
    message = str(e)
    assert message and "Traceback" not in message
    return message


def numeric_fields(cls):
    return [f for f in dataclasses.fields(cls) if type(f.default) in (int, float)]


# ----------------------------------------------------------------------------- argument ranges

@pytest.mark.parametrize("script", SCRIPTS)
def test_every_numeric_flag_has_a_range_its_default_meets(script):
    cls = ARGS[script]
    table = {**common.RANGES, **getattr(cls, "ranges", {})}
    assert [f.name for f in numeric_fields(cls) if f.name not in table] == []
    assert set(getattr(cls, "ranges", {})) <= {f.name for f in numeric_fields(cls)}  # no stale override
    for f in numeric_fields(cls):
        assert common.in_range(f.default, table[f.name]), (f.name, f.default)


def test_every_range_is_used():
    used = {f.name for cls in ARGS.values() for f in numeric_fields(cls)}
    assert set(common.RANGES) <= used


def test_common_knows_only_shared_flags():
    """common.RANGES is plumbing: each of its flags is a field of two method files or more, and no flag
    that only one method file has is named in common.py or state.py (each file declares its own ranges)."""
    methods = [cls for name, cls in ARGS.items() if name != "bench"]
    fields = [{f.name for f in dataclasses.fields(cls)} for cls in methods]
    assert [k for k in common.RANGES if sum(k in f for f in fields) < 2] == []
    own = {name for f in fields for name in f if sum(name in g for g in fields) == 1}
    source = open(common.__file__).read() + open(common.__file__.replace("common.py", "state.py")).read()
    assert sorted(name for name in own if f'"{name}"' in source or f"args.{name}" in source) == []


def test_in_range():
    assert common.in_range(1, ">= 1") and not common.in_range(0, ">= 1")
    assert common.in_range(1e-9, "> 0") and not common.in_range(0.0, "> 0") and not common.in_range(-1e-4, "> 0")
    assert common.in_range(0.0, "<= 0") and not common.in_range(0.5, "<= 0")
    assert common.in_range(0, "[0, 1]") and common.in_range(1, "[0, 1]") and not common.in_range(1.01, "[0, 1]")
    assert common.in_range(0.5, "(0, 1)") and not common.in_range(1, "[0, 1)") and not common.in_range(0, "(0, 1]")
    assert not any(common.in_range(x, ">= 0") for x in (math.nan, math.inf, -math.inf))
    assert common.in_range(10 ** 400, ">= 1") and not common.in_range(10 ** 400, "[0, 4294967295]")


def boundary_cases(spec, kind):
    """(flag value, inside the range?) at and around the bounds of a range."""
    step = 1 if kind is int else 1e-6
    op, _, bound = spec.partition(" ")
    if op in (">=", ">", "<=", "<"):
        b = kind(float(bound))
        return [(b, op in (">=", "<=")), (b + step, op in (">=", ">")), (b - step, op in ("<=", "<"))]
    lo, hi = (kind(float(x)) for x in spec[1:-1].split(","))
    return [(lo, spec[0] == "["), (hi, spec[-1] == "]"), (lo - step, False), (hi + step, False)]


HOSTILE = ["nan", "inf", "-inf", "1e999", "", "abc", "0x10", "1e3", "9" * 40, "-" + "9" * 40, " 3 ", "\u0663", "\x7f",
           "--", "½", "1_0", "-0", "0.0"]


def flag_cases(seed=0):
    """(script, field, argv value, expected: True inside / False outside / None either), seeded."""
    rng = random.Random(seed)
    cases = []
    for script, cls in ARGS.items():
        spec = common.flag_ranges(cls)
        for f in numeric_fields(cls):
            kind = type(f.default)
            cases += [(script, f.name, repr(v) if kind is float else str(v), inside)
                      for v, inside in boundary_cases(spec[f.name], kind)]
            cases += [(script, f.name, v, None) for v in rng.sample(HOSTILE, 3)]
            cases.append((script, f.name, str(rng.choice([-1, 1]) * 10 ** rng.uniform(-12, 12)), None))
    return cases


FLAG_CASES = flag_cases()


def test_flag_fuzz(tmp_path):
    """Every numeric flag at and beyond its bounds, and garbage: parse_args returns values inside
    the ranges, or raises one UserError naming the flag; it never writes into --out."""
    assert len(FLAG_CASES) >= 400
    out = tmp_path / "out"
    refused = 0
    for script, name, value, inside in FLAG_CASES:
        flag = "--" + name.replace("_", "-")
        argv = [f"{flag}={value}"] + (["--out", str(out)] if script != "bench" else [])
        try:
            args = common.parse_args(ARGS[script], argv)
        except common.UserError as e:
            assert flag in one_line(e), (script, value, str(e))
            assert inside is not True, (script, name, value, str(e))
            refused += 1
        else:
            assert inside is not False, (script, name, value)
            assert common.in_range(getattr(args, name), common.flag_ranges(ARGS[script])[name])
        assert empty(out)
    assert refused > len(FLAG_CASES) / 3


@pytest.mark.parametrize("argv,needle", [
    (["--steps"], "expected one argument"),
    (["--lr", "-1e-4"], "expected one argument"),  # (the README's advice: --lr=-1e-4)
    (["--steps", "1", "2"], "unrecognized arguments"),
    (["--gradient-checkpointing=yes"], "ignored explicit argument"),
    (["--seed=-1"], "--seed must be in [0, 4294967295], got -1"),
    (["--beta=nan"], "--beta must be > 0, got nan"),
])
def test_argparse_errors_are_one_line(argv, needle):
    with pytest.raises(common.UserError) as e:
        common.parse_args(ARGS["dpo"], argv)
    assert needle in one_line(e.value)


# ----------------------------------------------------------------------------- paths

def path_cases(tmp):
    """(script, argv, needle of the error or None where the run may go on)."""
    a_file = tmp / "a_file"
    a_file.write_text("x")
    empty = tmp / "empty.jsonl"
    empty.write_text("\n \n")
    binary = tmp / "binary.jsonl"
    binary.write_bytes(bytes(random.Random(1).randrange(256) for _ in range(500)))
    locked = tmp / "locked.jsonl"
    locked.write_text('{"prompt": "1+1=", "answer": 2}\n')
    locked.chmod(0)
    no_weights = tmp / "no_weights"
    no_weights.mkdir()
    (no_weights / "config.json").write_text((WORLD / "teacher_large" / "config.json").read_text())
    read_only = tmp / "read_only"
    read_only.mkdir()
    read_only.chmod(0o555)
    return [
        ("sft", ["--data", str(tmp / "missing.jsonl")], "does not exist"),
        ("dpo", ["--data", str(tmp)], "is a folder"),
        ("ppo", ["--eval-data", str(tmp / "missing.jsonl")], "does not exist"),
        ("ppo", ["--ood-data", str(empty)], "has no records"),
        ("opd", ["--eval-data", str(binary)], "binary.jsonl line 1"),
        ("dypo", ["--data", str(locked)], None if os.access(locked, os.R_OK) else "cannot be read"),  # root reads it
        ("sft", ["--model", str(a_file)], "is a file"),
        ("opd", ["--teacher", str(a_file)], "is a file"),
        ("tropd", ["--teacher", str(no_weights)], "holds no weights"),
        ("opd_plus", ["--teacher", str(tmp / "no_such_teacher")], None),  # a hub id, maybe: load_model decides
        ("dppo", ["--out", str(a_file)], "is a file"),
        ("sft", ["--out", str(a_file / "run")], "cannot be created"),
        ("dpo", ["--out", str(read_only / "run")], None if os.access(read_only, os.W_OK) else "no write permission"),
        ("ppo", ["--out", str(tmp / ("x" * 300))], "not a usable path"),
        ("dypo", ["--data", str(tmp / ("x" * 300) / "d.jsonl")], "not a usable path"),
        ("bench", ["--model", str(a_file)], "is a file"),
    ]


def test_path_fuzz(tmp_path):
    for script, argv, needle in path_cases(tmp_path):
        out = tmp_path / "never"
        extra = ["--out", str(out)] if script != "bench" and "--out" not in argv else []
        try:
            common.parse_args(ARGS[script], argv + extra)
        except common.UserError as e:
            assert needle is not None and needle in one_line(e), (script, argv, str(e))
        else:
            assert needle is None, (script, argv)
        assert empty(out)


# ----------------------------------------------------------------------------- records

def _text(x):
    return isinstance(x, str) and not any(0xD800 <= ord(c) <= 0xDFFF for c in x)


def _messages(x):
    return isinstance(x, list) and all(isinstance(m, dict) and _text(m.get("role")) and _text(m.get("content"))
                                       for m in x)


def well_typed(field, v):
    """The record types of the README, written out again: what read_jsonl must accept."""
    if field == "prompt":
        return _text(v) and v != "" or _messages(v) and v != []
    if field == "answer":
        return _text(v) and v.strip() != "" or type(v) is int or type(v) is float and math.isfinite(v)
    if field == "teacher_responses":
        return isinstance(v, list) and all(_text(x) or _messages(x) for x in v)
    return _text(v) or _messages(v)


CHAT = [{"role": "user", "content": "12+30="}]
GOOD = {"prompt": ["1+1=", "37+58=", "5-60=" * 9, CHAT, " "], "completion": ["2", "", "95" * 40, CHAT],
        "chosen": ["2", "1" * 70], "rejected": ["3", [{"role": "assistant", "content": "4"}]],
        "answer": ["2", 2, -28, 2.5, "ninety"], "teacher_responses": [["2", "3"], [], ["9" * 80], [CHAT]]}
BAD = [None, 0, 5, -1.5, 10 ** 30, math.nan, math.inf, True, False, "", " ", "\ud800", "\u0661+\u0661=", "🙂" * 3,
       "\x00\x1b[2J", "a" * 3000, [], [{}], [{"role": "user"}], [{"role": 1, "content": "x"}], ["1+1="], [[]],
       [{"role": "user", "content": None}], [{"role": "user", "content": "\udfff"}], {}, {"content": "x"}, [1, 2]]
GARBAGE = ['{"prompt": "1+1=", "answer": ', "[1, 2]", '"just a string"', "[" * 100000, '{"answer": ' + "1" * 5000 + "}",
           "\ufeff" + json.dumps({"prompt": "1+1=", "answer": "2", "completion": "2", "chosen": "2", "rejected": "3"}),
           "NaN", "{'prompt': '1+1='}", "{}", '{"prompt": "1+1=", "prompt": 5, "answer": "2"}']


def random_record(rng, hostility):
    row = {}
    for field in GOOD:
        if rng.random() < 1 - hostility / 5:
            if field == "teacher_responses" and rng.random() < hostility:
                row[field] = [rng.choice(BAD + GOOD["completion"]) for _ in range(rng.randint(1, 3))]
            else:
                row[field] = rng.choice(BAD) if rng.random() < hostility else rng.choice(GOOD[field])
    if rng.random() < 0.2:
        row[rng.choice(["extra", "", "\u00e9", "prompt "])] = rng.choice(BAD)
    return row


def random_file(rng, path):
    """1-4 lines of records, their fields good or (by the file's hostility) bad, now and then a
    line of garbage or binary bytes."""
    hostility = rng.choice([0.0, 0.1, 0.3, 0.6])
    lines = []
    for _ in range(rng.randint(1, 4)):
        roll = rng.random()
        if roll < hostility / 4:
            lines.append(rng.choice(GARBAGE).encode("utf-8"))
        elif roll < hostility / 3:
            lines.append(bytes(rng.randrange(256) for _ in range(rng.randint(1, 60))).replace(b"\n", b""))
        else:
            lines.append(json.dumps(random_record(rng, hostility)).encode("utf-8"))
        if rng.random() < 0.1:
            lines.append(rng.choice([b"", b"   ", b"\r"]))
    path.write_bytes(b"\n".join(lines) + rng.choice([b"\n", b"", b"\r\n"]))


@pytest.fixture(scope="module")
def gpt2_dir(tmp_path_factory):
    """A GPT-2-family model folder (absolute positions: n_positions 32) with the world's character
    tokenizer and a chat template, no weights (load_model starts it from random)."""
    from transformers import AutoTokenizer, GPT2Config
    folder = tmp_path_factory.mktemp("gpt2")
    vocab_size = make_tokenizer(folder)
    tok = AutoTokenizer.from_pretrained(folder)
    tok.chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    tok.save_pretrained(folder)
    GPT2Config(vocab_size=vocab_size, n_embd=32, n_layer=2, n_head=2, n_positions=32, bos_token_id=1, eos_token_id=2,
               pad_token_id=0).save_pretrained(folder)
    return folder


def test_record_fuzz(tmp_path, gpt2_dir):
    """Random files of good, mistyped and garbage records through what a script does with --data:
    read_jsonl, fit_context, and the encoding and reward of every field. Accepted records are well
    typed (by a second, independent statement of the types) and encode without error; refused ones
    name the file and the line, and for a type error the field, which is indeed ill-typed."""
    rng = random.Random(0)
    tokenizers = {WORLD / "student": common.load_tokenizer(WORLD / "student"), gpt2_dir: common.load_tokenizer(gpt2_dir)}
    outcomes = {"ok": 0, "refused": 0}
    for case in range(240):
        script = list(READS)[case % len(READS)]
        fields, optional, cut, reserve = READS[script]
        model = rng.choice(list(tokenizers))
        tok = tokenizers[model]
        path = tmp_path / f"case{case}.jsonl"
        random_file(rng, path)
        try:
            rows = common.read_jsonl(path, fields, optional)
        except common.UserError as e:
            message = one_line(e)
            assert str(path) in message, message
            if "' must be " in message:  # a type error: the field named is ill-typed on the line named
                line = int(message.split(" line ")[1].split(":")[0])
                field = message.split(": '")[1].split("'")[0]
                assert not well_typed(field, json.loads(path.read_bytes().split(b"\n")[line - 1])[field])
            outcomes["refused"] += 1
            continue
        for row in rows:
            for k in (*fields, *(k for k in optional if k in row)):
                assert well_typed(k, row[k]), (k, row[k])
        args = SimpleNamespace(model=model, data=path, max_new_tokens=8, max_prompt_length=rng.choice([0, 0, 6]))
        try:
            rows = common.fit_context(rows, tok, args, cut=cut, reserve=reserve)
        except common.UserError as e:
            assert str(path) in one_line(e), str(e)
            outcomes["refused"] += 1
            continue
        context = common.context_length(AutoConfig.from_pretrained(model))
        for row in rows:
            prompt = common.prompt_ids(tok, row["prompt"])
            assert 1 <= len(prompt) <= min(context - 8 - reserve, args.max_prompt_length or context)
            for k in cut:
                for response in (row.get(k, []) if k in common.RESPONSE_LISTS else [row[k]]):
                    assert len(prompt) + len(common.response_ids(tok, response)) + reserve <= context
            if "answer" in row:
                assert common.reward("12", row["answer"]) in (0.0, 1.0)
        outcomes["ok"] += 1
    assert min(outcomes.values()) >= 40, outcomes  # both outcomes well represented


def test_fit_context_drops_cuts_and_counts(gpt2_dir, tmp_path, capsys):
    """n_positions 32, --max-new-tokens 8: prompts of up to 24 tokens stay; a completion that would
    overflow is cut from the right to the room left, without EOS; the counts print once."""
    tok = common.load_tokenizer(gpt2_dir)
    rows = [{"prompt": "1+1=" * 8, "completion": "2"},                        # 33 tokens: dropped
            {"prompt": [{"role": "user", "content": "1+1=" * 5}], "completion": "2" * 30},  # 20 + 31: cut to 12
            {"prompt": "1+1=", "completion": "2"}]                            # 5 + 2: as it is
    args = SimpleNamespace(model=gpt2_dir, data="d.jsonl", max_new_tokens=8, max_prompt_length=0)
    kept = common.fit_context([dict(r) for r in rows], tok, args, cut=("completion",))
    assert [r["completion"] for r in kept] == [tuple([tok.convert_tokens_to_ids("2")] * 12), "2"]
    assert common.response_ids(tok, kept[0]["completion"]) == list(kept[0]["completion"])  # no EOS: it was cut
    printed = capsys.readouterr().out
    assert "1 of the 3 prompts of d.jsonl are dropped: longer than 24 tokens" in printed
    assert "1 response(s) of d.jsonl are cut from the right" in printed
    common.fit_context([dict(r) for r in rows], tok, args, cut=("completion",))
    assert capsys.readouterr().out == ""  # printed once
    args.max_prompt_length = 4
    with pytest.raises(common.UserError, match="no prompt of d.jsonl fits: all 3 are longer than 4 tokens"):
        common.fit_context([dict(r) for r in rows], tok, args)
    args.max_prompt_length, args.max_new_tokens = 0, 32
    with pytest.raises(common.UserError, match="context of 32 tokens leaves no room"):
        common.fit_context([dict(r) for r in rows], tok, args)


def test_context_length_by_family():
    from transformers import GPT2Config, LlamaConfig, PretrainedConfig
    assert common.context_length(GPT2Config(n_positions=128)) == 128
    assert common.context_length(LlamaConfig(max_position_embeddings=4096)) == 4096
    assert common.context_length(PretrainedConfig(seq_length=2048)) == 2048
    assert common.context_length(PretrainedConfig()) is None


# ----------------------------------------------------------------------------- whole scripts

SMALL = ["--steps", 1, "--prompts-per-step", 4]


@pytest.fixture(scope="module")
def small_eval(tmp_path_factory):
    folder = tmp_path_factory.mktemp("eval")
    for split in ("test_id", "test_ood"):
        lines = (WORLD / f"{split}.jsonl").read_text().splitlines()[:16]
        (folder / f"{split}.jsonl").write_text("\n".join(lines) + "\n")
    return ["--eval-data", folder / "test_id.jsonl", "--ood-data", folder / "test_ood.jsonl"]


@pytest.mark.parametrize("script,make_argv,needle", [
    ("dpo.py", lambda t: ["--data", _write(t / "d.jsonl", '{"prompt": 5, "chosen": "2", "rejected": "3"}\n')],
     "line 1: 'prompt' must be"),
    ("ppo.py", lambda t: ["--data", _write(t / "d.jsonl", '{"prompt": "1+1=", "answer": null}\n')], "'answer' must be"),
    ("sft.py", lambda t: ["--out", _write(t / "a_file", "")], "is a file"),
    ("dypo.py", lambda t: ["--group-size", 1], "--group-size must be >= 2, got 1"),
    ("opd.py", lambda t: ["--lr=-1e-4"], "--lr must be > 0, got -0.0001"),
    ("tropd.py", lambda t: ["--max-prompt-length", 1], "no prompt of"),
    ("dppo.py", lambda t: ["--steps", "many"], "invalid int value: 'many'"),
])
def test_refused_runs_write_nothing(script, make_argv, needle, tmp_path):
    argv = make_argv(tmp_path)
    out = tmp_path / "run"
    proc = run(script, *argv, *(["--out", out] if "--out" not in argv else []))
    assert proc.returncode == 1
    one_line_error(proc, needle)
    assert empty(out)


def empty(folder):
    """Nothing written into `folder`: start-up may create it (and does once the arguments are good)."""
    return not folder.exists() or not any(folder.iterdir())


def _write(path, text):
    path.write_text(text)
    return path


def test_sft_fits_a_small_context(gpt2_dir, small_eval, tmp_path):
    """A GPT-2-style model (n_positions 32) and chat prompts, some too long for it: the run drops
    and cuts, says so once, and trains."""
    data = tmp_path / "chat.jsonl"
    rows = [{"prompt": [{"role": "user", "content": "1+1=" * n}], "completion": c}
            for n in (1, 4, 7) for c in ("2", "2" * 20)]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    proc = ok(run("sft.py", "--model", gpt2_dir, "--data", data, *small_eval, "--steps", 2, "--batch-size", 4, "--max-new-tokens", 8,
                  "--out", tmp_path / "run"))
    assert proc.stdout.count("2 of the 6 prompts of") == 1 and proc.stdout.count("response(s) of") == 1
    assert "Traceback" not in proc.stderr and summary(tmp_path / "run")["steps"] == 2


def test_dypo_step_that_trains_nothing_is_quiet(small_eval, tmp_path):
    """Answers no sample can match and no teacher responses: every prompt is Hard and untrainable,
    no step updates the model, and torch has nothing to warn about (lr_scheduler before optimizer)."""
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"{i}+{i}=", "answer": "x", "teacher_responses": []}) + "\n"
                            for i in range(8)))
    proc = ok(run("dypo.py", "--data", data, *small_eval, *SMALL, "--group-size", 2, "--micro-batch-size", 4,
                  "--out", tmp_path / "run"))
    assert "Warning" not in proc.stderr and "lr_scheduler" not in proc.stderr, proc.stderr[-2000:]
