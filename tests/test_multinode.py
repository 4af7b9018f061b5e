"""Several nodes: dpo.py and grpo.py launched as 2 "nodes" of 1 CPU process each on localhost (two
torchrun launchers, --nnodes 2 --node-rank 0/1, as on a cluster: the same command on every node) give
the losses and the final weights of one process on the same global batch; and a 2-node run stopped by
a scheduler's SIGTERM to both launchers resumes (--resume on both) to the uninterrupted run's weights."""

import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

import common
from test_scripts import ROOT, metrics, ok, run, with_slices

DPO = ["dpo.py", "--steps", 3, "--batch-size", 8, "--micro-batch-size", 4, "--lr", 1e-3]
GRPO = ["grpo.py", "--steps", 4, "--prompts-per-step", 4, "--group-size", 4, "--micro-batch-size", 8, "--lr", 1e-3]
NODES = 2
TIMEOUT = 300  # seconds for one launch of the two nodes (a run here takes 20-40 s)


# Each worker runs under this wrapper, which records its exit status in <prefix><RANK> (torchrun does not
# report a worker's status when it is stopped by a signal itself). torchrun signals a worker's whole
# process group, so the script gets SIGTERM as it would without the wrapper; the wrapper waits on.
WRAPPER = ("import os, signal, subprocess, sys\n"
           "signal.signal(signal.SIGTERM, lambda *_: None)\n"
           "code = subprocess.call(sys.argv[2:])\n"
           "open(sys.argv[1] + os.environ['RANK'], 'w').write(str(code))\n"
           "sys.exit(code)\n")


def launch(command, out, logs, tag):
    """Start `command` as NODES nodes of one CPU process each: one torchrun launcher per node (static
    rendezvous on a free port of 127.0.0.1, node 0 holding rank 0), each in its own process group.
    Returns the launchers' Popen objects; their output goes to logs/<tag>-node<i>.log and each worker's
    exit status to logs/<tag>-rank<r>."""
    script, args = command[0], with_slices(command[0], command[1:])
    port = common.free_port()
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    procs = []
    for node in range(NODES):
        log = open(logs / f"{tag}-node{node}.log", "w")
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "torch.distributed.run", *map(str, [
                "--nnodes", NODES, "--nproc-per-node", 1, "--node-rank", node, "--master-addr", "127.0.0.1",
                "--master-port", port, "--no-python", sys.executable, "-c", WRAPPER, logs / f"{tag}-rank",
                sys.executable, ROOT / script, *args, "--out", out])],
            stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT, start_new_session=True))
        procs[-1].log, procs[-1].ranks = log, logs / f"{tag}-rank"
    return procs


def worker_codes(procs):
    """The workers' exit statuses by rank (None: not recorded, e.g. a worker killed by torchrun)."""
    files = [procs[0].ranks.with_name(procs[0].ranks.name + str(r)) for r in range(NODES)]
    return [int(f.read_text()) if f.exists() else None for f in files]


def tails(procs, n=3000):
    """The last n characters of each launcher's output, for a failure message."""
    text = ""
    for i, p in enumerate(procs):
        p.log.flush()
        text += f"\n----- node {i} (exit status {p.poll()}) -----\n" + open(p.log.name).read()[-n:]
    return text + f"\n----- workers' exit statuses by rank: {worker_codes(procs)}"


def wait(procs, timeout=TIMEOUT):
    """Each launcher's exit status, once all have ended (within `timeout` seconds, else a failure)."""
    deadline = time.time() + timeout
    for p in procs:
        try:
            p.wait(timeout=max(1, deadline - time.time()))
        except subprocess.TimeoutExpired:
            pytest.fail(f"the nodes did not end within {timeout} s" + tails(procs))
    return [p.returncode for p in procs]


def descendants(pid):
    """The ids of the processes below `pid` (torchrun starts each worker in a session of its own, so a
    kill of the launcher's process group does not reach them)."""
    children = {}
    for stat in os.listdir("/proc"):
        try:
            fields = open(f"/proc/{stat}/stat").read().rsplit(")", 1)[1].split()
            children.setdefault(int(fields[1]), []).append(int(stat))
        except (OSError, ValueError, IndexError):
            pass
    found, todo = [], [pid]
    while todo:
        below = children.get(todo.pop(), [])
        found += below
        todo += below
    return found


def kill(procs):
    """SIGKILL whatever is left of the launchers and of their workers."""
    for p in procs:
        if p.poll() is None:
            for pid in [p.pid, *descendants(p.pid)]:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            p.wait(timeout=30)
        p.log.close()


@pytest.fixture
def nodes(tmp_path):
    """launch(command, out, tag) -> the launchers, all killed when the test ends, however it ends."""
    started = []

    def start(command, out, tag):
        started.extend(launch(command, out, tmp_path, tag))
        return started[-NODES:]
    yield start
    kill(started)


def run_nodes(nodes, command, out, tag):
    procs = nodes(command, out, tag)
    codes = wait(procs)
    assert codes == [0] * NODES and worker_codes(procs) == [0] * NODES, tails(procs)
    return procs


def weights(out):
    return load_file(out / "model" / "model.safetensors")


def assert_same_weights(a, b, atol):
    a, b = weights(a), weights(b)
    assert a.keys() <= b.keys() or b.keys() <= a.keys()  # (a gathered state dict also lists the tied lm_head)
    for k in a.keys() & b.keys():
        assert torch.allclose(a[k], b[k], atol=atol), (k, (a[k] - b[k]).abs().max().item())


@pytest.mark.parametrize("command", [DPO, GRPO], ids=["dpo", "grpo"])
def test_two_nodes_match_one_process(command, nodes, tmp_path):
    """2 nodes x 1 process = 1 process on the same global batch: the losses step by step and the final
    weights, within test_scripts.test_two_processes_match_one's tolerances (1e-4)."""
    one, two = tmp_path / "one", tmp_path / "two"
    ok(run(*command, "--out", one, env={"OMP_NUM_THREADS": "1"}))
    procs = run_nodes(nodes, command, two, "two")
    m1, m2 = metrics(one), metrics(two)
    assert [x["step"] for x in m2] == [x["step"] for x in m1], tails(procs)
    assert [x["train/loss"] for x in m2] == pytest.approx([x["train/loss"] for x in m1], abs=1e-4)
    assert_same_weights(one, two, atol=1e-4)


def state_step(out):
    latest = out / "state" / "latest"
    return int(latest.read_text().split("-")[1]) if latest.exists() else 0


def test_sigterm_to_both_nodes_then_resume(nodes, tmp_path):
    """A scheduler's SIGTERM to both launchers (torchrun passes it on to its worker) after the second
    state of a --save-every 2 run: every process stops after the same step and saves, both launchers
    end, state/latest names that step; --resume on both nodes ends with the weights of a 2-node run
    never interrupted (CPU fp32: 1e-6) and metrics.jsonl lists each step once."""
    steps = 8
    command = [*DPO, "--steps", steps, "--save-every", 2]
    reference, out = tmp_path / "reference", tmp_path / "run"
    run_nodes(nodes, command, reference, "reference")

    procs = nodes(command, out, "stopped")
    deadline = time.time() + TIMEOUT
    while state_step(out) < 2:
        assert all(p.poll() is None for p in procs), "a node ended before it could be stopped" + tails(procs)
        assert time.time() < deadline, "no state after step 2 in time" + tails(procs)
        time.sleep(0.05)
    for p in procs:  # as a scheduler does: every node's launcher, about at once
        p.send_signal(signal.SIGTERM)
    codes = wait(procs)
    stopped = state_step(out)
    text = tails(procs)
    print(f"after SIGTERM: torchrun exit statuses {codes}, workers' {worker_codes(procs)}")
    # every worker saved and exited with 143 of itself (torchrun did not have to SIGKILL it); torchrun
    # itself ends with the SignalException it raises on the signal (status 1), not with the workers' 143
    assert worker_codes(procs) == [143] * NODES and "forcefully exiting" not in text, text
    assert all(c != 0 for c in codes), text
    assert 2 <= stopped < steps, text
    assert (out / "state" / f"step-{stopped:08d}" / "state.json").exists(), text
    assert {p.name for p in (out / "state" / f"step-{stopped:08d}").glob("rng-*.pt")} == {"rng-0.pt", "rng-1.pt"}
    assert f"stopped by SIGTERM after step {stopped}" in text, text
    assert not (out / "summary.json").exists()

    procs = run_nodes(nodes, [*command, "--resume"], out, "resumed")
    assert f"resumed from {out / 'state'}" in tails(procs, n=10**6), tails(procs)
    assert [x["step"] for x in metrics(out)] == list(range(1, steps + 1))
    assert [x["train/loss"] for x in metrics(out)] == pytest.approx([x["train/loss"] for x in metrics(reference)],
                                                                    abs=1e-6)
    assert_same_weights(out, reference, atol=1e-6)
