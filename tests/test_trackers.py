"""--report-to: each tracker, offline, holds what metrics.jsonl, args.json and completions.jsonl hold
(read back from the tracker's own files), a --resume continues the same tracked run, and a tracker
that is not installed stops the run with one line."""

import glob
import json
import sqlite3
import struct

import pytest

from test_scripts import metrics, ok, one_line_error, run, summary

SFT = ["sft.py", "--batch-size", 8, "--micro-batch-size", 8, "--eval-every", 2]


def wandb_records(path):
    """The protobuf Records of a wandb run file: a 7-byte header, then 32 KiB blocks of records, each with
    a 7-byte header (crc u32, length u16, type u8: 1 full, 2 first, 3 middle, 4 last piece of one record)."""
    from wandb.proto.wandb_internal_pb2 import Record
    data, pos, piece, records = open(path, "rb").read(), 7, b"", []
    while pos + 7 <= len(data):
        left = 32768 - pos % 32768
        _, n, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if left < 7 or kind == 0:  # a block's padding
            pos += left
            continue
        piece = (b"" if kind in (1, 2) else piece) + data[pos + 7:pos + 7 + n]
        pos += 7 + n
        if kind in (1, 4):
            records.append(Record.FromString(piece))
    return records


def read_back(kind, out, store):
    """What the tracker holds: ({step: {metric: value}}, config, {step: completion rows}, run ids)."""
    history, tables, config, runs = {}, {}, {}, set()
    if kind == "wandb":
        for folder in sorted(glob.glob(f"{out}/wandb/offline-run-*")):
            for r in wandb_records(glob.glob(f"{folder}/run-*.wandb")[0]):
                if r.WhichOneof("record_type") == "run":
                    runs.add(r.run.run_id)
                    config.update({i.key: json.loads(i.value_json) for i in r.run.config.update if i.key != "_wandb"})
                if r.WhichOneof("record_type") == "history":
                    items = {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in r.history.item}
                    step = items["_step"]
                    if "eval/completions/path" in items:
                        table = json.load(open(f"{folder}/files/{items['eval/completions/path']}"))
                        tables[step] = [dict(zip(table["columns"], row)) for row in table["data"]]
                    history.setdefault(step, {}).update({k: v for k, v in items.items()
                                                         if not k.startswith(("_", "eval/completions"))})
    elif kind == "trackio":
        db = sqlite3.connect(store / "post-training.db")
        for name, data in db.execute("SELECT run_name, config FROM configs"):
            runs.add(name)
            config.update({k: v for k, v in json.loads(data).items() if not k.startswith("_")})
        for step, data in db.execute("SELECT step, metrics FROM metrics ORDER BY id"):
            items = json.loads(data)
            if "eval/completions" in items:
                tables[step] = items.pop("eval/completions")["_value"]
            history.setdefault(step, {}).update(items)
    else:
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
        events = EventAccumulator(str(out / "tensorboard"), size_guidance={"scalars": 0, "tensors": 0})
        events.Reload()
        for tag in events.Tags()["scalars"]:
            for e in events.Scalars(tag):
                history.setdefault(e.step, {})[tag] = e.value
        def markdown(e):  # (the rows of a markdown table, as dicts)
            header, _, *rows = [line.split(" | ") for line in e.tensor_proto.string_val[0].decode().split("\n")]
            return [dict(zip(header, row)) for row in rows]
        for e in events.Tensors("eval/completions/text_summary"):
            tables[e.step] = markdown(e)
        config = {r["argument"]: r["value"] for r in markdown(events.Tensors("args/text_summary")[-1])}  # (the last launch)
        runs.add(str(out / "tensorboard"))
    return history, config, tables, runs


def expected(out):
    """What the run's own files say the tracker should hold: metrics.jsonl's lines by step, with the
    evaluation before training at step 0; args.json; completions.jsonl's rows by step."""
    history = {0: {"eval/accuracy": summary(out)["accuracy_before"],
                   "eval/ood_accuracy": summary(out)["ood_accuracy_before"]}}
    history.update({m.pop("step"): m for m in metrics(out)})
    tables = {}
    for line in (out / "completions.jsonl").read_text().splitlines():
        c = json.loads(line)
        tables.setdefault(c.pop("step"), []).append(c)
    return history, json.loads((out / "args.json").read_text()), tables


def check(kind, out, store):
    history, config, tables, runs = read_back(kind, out, store)
    want_history, want_config, want_tables = expected(out)
    assert len(runs) == 1, runs  # a resumed run continues the same one
    assert history.keys() == want_history.keys()
    for step, line in want_history.items():
        assert history[step].keys() == line.keys(), step
        for k, v in line.items():  # (TensorBoard keeps float32)
            assert history[step][k] == pytest.approx(v, rel=1e-6, abs=1e-9), (step, k)
    text = kind == "tensorboard"  # (its table is markdown: every cell a string)
    assert config == ({k: str(v) for k, v in want_config.items()} if text else want_config)
    assert tables.keys() == want_tables.keys() and len(tables) >= 2
    for step, rows in want_tables.items():
        assert tables[step] == ([{k: str(v) for k, v in r.items()} for r in rows] if text else rows), step


@pytest.fixture
def tracker_env(tmp_path):
    store = tmp_path / "trackio"
    return store, {"WANDB_MODE": "offline", "WANDB_SILENT": "true", "TRACKIO_DIR": str(store)}


@pytest.mark.parametrize("kind", ["wandb", "trackio", "tensorboard"])
def test_tracker_holds_the_metrics_args_and_completions(kind, tmp_path, tracker_env):
    pytest.importorskip(kind)
    store, env = tracker_env
    out = tmp_path / "run"
    ok(run(*SFT, "--steps", 4, "--report-to", kind, "--out", out, env=env))
    check(kind, out, store)


@pytest.mark.parametrize("kind", ["wandb", "trackio", "tensorboard"])
def test_resume_continues_the_tracked_run(kind, tmp_path, tracker_env):
    """Two steps with a state saved, then --resume to four: one run in the tracker with every step once."""
    pytest.importorskip(kind)
    store, env = tracker_env
    out = tmp_path / "run"
    ok(run(*SFT, "--steps", 2, "--save-every", 2, "--report-to", kind, "--out", out, env=env))
    ok(run(*SFT, "--steps", 4, "--resume", "--report-to", kind, "--out", out, env=env))
    assert [m["step"] for m in metrics(out)] == [1, 2, 3, 4]
    check(kind, out, store)


def test_a_missing_tracker_is_one_line(tmp_path):
    """A tracker that cannot be imported (here: hidden from the path) stops the run before anything loads."""
    hidden = tmp_path / "hidden"
    hidden.mkdir()
    (hidden / "sitecustomize.py").write_text("import sys\nsys.modules['wandb'] = None\n")  # (import fails)
    proc = run(*SFT, "--steps", 1, "--report-to", "wandb", "--out", tmp_path / "run",
               env={"PYTHONPATH": str(hidden)})
    one_line_error(proc, "--report-to wandb needs wandb", "pip install wandb")
    assert not (tmp_path / "run" / "model").exists()
