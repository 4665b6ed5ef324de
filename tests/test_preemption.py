"""A run stopped by its scheduler and continued, and a run on two nodes: SIGTERM / SIGINT finish the
step, the ranks agree, a checkpoint is saved, the ranks exit with checkpoint.PREEMPTED, and --resume
gives the metrics and weights of an uninterrupted run; torchrun --nnodes 2 (one process per node, on
this machine) computes what one process does, writes one checkpoint, and refuses an --out the nodes
do not share. The tiny model and helpers of test_train.py."""

import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest
from conftest import ROOT
from test_train import assert_same_weights, assets, rl_args, sft_args, sft_model, train_py, weights  # noqa: F401

import checkpoint
import train

TIMING = ("rollout_time", "update_time", "step_time")  # wall-clock fields: the only ones that may differ

# train.main with each step slowed down (so that a signal sent after k logged steps lands mid-run, not
# after the last step), a second SIGTERM sent to itself in the middle of every checkpoint save (it must
# change nothing), and its pid in pid_rank{RANK}: the test signals one rank, or torchrun.
STOPPABLE = f"""
import os, signal, sys, time
sys.path.insert(0, {ROOT!r})
import checkpoint, degrpo, sft, train

def slow(step):
    def slowed(*args, **kwargs):
        time.sleep(0.4)
        return step(*args, **kwargs)
    return slowed

sft.sft_step, degrpo.rl_step = slow(sft.sft_step), slow(degrpo.rl_step)
real_save = checkpoint.dcp.save

def save(*args, **kwargs):
    os.kill(os.getpid(), signal.SIGTERM)
    return real_save(*args, **kwargs)

checkpoint.dcp.save = save
with open(os.path.join(sys.argv[1], "pid_rank" + os.environ["RANK"]), "w") as f:
    f.write(str(os.getpid()))
train.main(sys.argv[2:])
"""


def stoppable(tmp_path):
    """STOPPABLE as a file; it writes its pid files into tmp_path (its first argument)."""
    path = tmp_path / "stoppable.py"
    path.write_text(STOPPABLE)
    return path


def launch(args, log, nproc=2, nodes=None, script=None, cwd=None):
    """train.py (or script) under torchrun, in the background, its output to the file log: the Popen.
    nodes (node_rank, port): one process as node node_rank of two, rendezvous on 127.0.0.1:port."""
    layout = ([f"--nproc-per-node={nproc}"] if nodes is None else
              ["--nnodes=2", f"--node-rank={nodes[0]}", "--nproc-per-node=1", "--master-addr=127.0.0.1",
               f"--master-port={nodes[1]}"])
    command = [sys.executable, "-m", "torch.distributed.run"] + layout + [str(script or os.path.join(ROOT, "train.py"))]
    env = dict(os.environ, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    return subprocess.Popen(command + [str(a) for a in args], stdout=open(log, "w"), stderr=subprocess.STDOUT,
                            env=env, cwd=cwd, start_new_session=True)


def finish(proc, log, timeout=240):
    """Waits for a launch(): (returncode, output); a hang kills its process group and fails the test."""
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        pytest.fail(f"hung: {open(log).read()[-3000:]}")
    return proc.returncode, open(log).read()


def wait_for_steps(out, k, procs, timeout=180):
    """Until out/metrics.jsonl holds k steps (rank 0 writes a line after each step)."""
    deadline, path = time.time() + timeout, os.path.join(out, "metrics.jsonl")
    while time.time() < deadline:
        if os.path.exists(path) and len(open(path).readlines()) >= k:
            return
        if any(p.poll() is not None for p in procs):
            pytest.fail("the run ended before it was signalled")
        time.sleep(0.05)
    pytest.fail(f"{path}: fewer than {k} steps after {timeout} s")


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def metrics(out):
    return [{k: v for k, v in json.loads(line).items() if k not in TIMING} for line in open(os.path.join(out, "metrics.jsonl"))]


def assert_stopped_and_saved(out, output, signal_name):
    """The stopped run: one checkpoint, at the last step it logged, whole; the line saying how to go on."""
    logged = len(metrics(out))
    assert checkpoint.checkpoints(out) == [f"step_{logged:06d}"], (os.listdir(out), output[-3000:])
    assert not [d for d in os.listdir(out) if d.startswith(".step_")]  # no half-written checkpoint
    line = (f"stopped by {signal_name} after step {logged}/8, saved in {os.path.join(out, f'step_{logged:06d}')}: "
            f"to continue, run the same command with --resume")
    assert output.count(line) == 1, output[-3000:]  # rank 0 only
    assert not [f for f in ("train.py", "checkpoint.py", "stoppable.py") if f'{f}", line' in output]  # no traceback of ours
    return logged


# -----------------------------------------------------------------------------


@pytest.fixture
def signal_handlers():
    """train.main sets SIGTERM and SIGINT (ignored once it stops): restored for the tests that follow."""
    saved = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
    yield
    for sig, handler in saved.items():
        signal.signal(sig, handler)


def test_sigint_in_one_process_saves_and_resumes(assets, tmp_path, monkeypatch, capfd, signal_handlers):
    """python train.py (one process, as on one GPU): Ctrl-C during step 2 finishes it, saves step 2,
    exits with status PREEMPTED and one line; --resume ends where the uninterrupted run ends."""
    args = [str(a) for a in sft_args(assets, tmp_path / "straight", steps=4) + ["--save-every", 100]]
    train.main(args)
    real, calls = train.sft.sft_step, []

    def interrupted(*a, **k):
        calls.append(1)
        if len(calls) == 2:  # Ctrl-C in the middle of step 2
            os.kill(os.getpid(), signal.SIGINT)
        return real(*a, **k)

    monkeypatch.setattr(train.sft, "sft_step", interrupted)
    stopped = [a.replace(str(tmp_path / "straight"), str(tmp_path / "stopped")) for a in args]
    capfd.readouterr()
    with pytest.raises(SystemExit) as exit:
        train.main(stopped)
    assert exit.value.code == checkpoint.PREEMPTED == 75
    output = capfd.readouterr()
    assert "SIGINT: finishing this step, then saving a checkpoint and stopping" in output.err
    assert output.out.endswith(f"stopped by SIGINT after step 2/4, saved in {tmp_path / 'stopped' / 'step_000002'}: "
                               f"to continue, run the same command with --resume\n"), output.out
    assert signal.getsignal(signal.SIGINT) == signal.SIG_IGN  # until the process exits
    monkeypatch.setattr(train.sft, "sft_step", real)
    train.main(stopped + ["--resume"])
    assert metrics(tmp_path / "stopped") == metrics(tmp_path / "straight")
    assert_same_weights(tmp_path / "straight" / "step_000004", tmp_path / "stopped" / "step_000004", atol=0)


@pytest.mark.parametrize("stage", ["sft", "rl"])
def test_sigterm_to_torchrun_stops_saves_and_resumes_exactly(assets, sft_model, tmp_path, stage):
    """2 ranks (gloo): SIGTERM to torchrun, which forwards it to both ranks, in the middle of the run;
    a second SIGTERM arrives during the save. Then --resume to the end: the metrics of every step and
    the final weights are those of the uninterrupted run, exactly."""
    def args(out):
        base = sft_args(assets, out) if stage == "sft" else rl_args(assets, sft_model, out)
        return base + ["--steps", 8, "--save-every", 100]  # no regular save before the end

    train_py(args(tmp_path / "straight"), nproc=2)
    out, log = tmp_path / "stopped", tmp_path / "stopped.log"
    os.makedirs(out)
    proc = launch([tmp_path] + args(out), log, script=stoppable(tmp_path))
    wait_for_steps(out, 2, [proc])
    proc.send_signal(signal.SIGTERM)  # torchrun, as a scheduler's signal to the job step
    returncode, output = finish(proc, log)
    assert returncode != 0  # torchrun's own status after a signal; the ranks' is PREEMPTED (test below)
    logged = assert_stopped_and_saved(out, output, "SIGTERM")
    assert 2 <= logged < 8
    output = train_py(args(out) + ["--resume"], nproc=2)
    assert f"resumed from {out / f'step_{logged:06d}'} at step {logged}" in output
    assert metrics(out) == metrics(tmp_path / "straight")
    assert_same_weights(tmp_path / "straight" / "step_000008", out / "step_000008", atol=0)
    assert (out / "curves.png").stat().st_size > 0


def test_two_nodes_equal_one_process_and_stop_together(assets, tmp_path):
    """torchrun --nnodes 2, one process a node (global rank 1 is local rank 0 of node 1): a SIGTERM to
    node 1's process alone stops both nodes at the same step (they agree), one checkpoint is written
    (rank 0 writes the Hugging Face folder, each rank its shard), --resume continues on both nodes, and
    the losses and weights are those of one process (and, exactly, of two ranks on one node)."""
    one = tmp_path / "one"
    train_py(sft_args(assets, one, steps=8) + ["--save-every", 100])
    train_py(sft_args(assets, tmp_path / "straight", steps=8) + ["--save-every", 100], nproc=2)
    out = tmp_path / "two_nodes"
    os.makedirs(out)
    args, port = [tmp_path] + sft_args(assets, out, steps=8) + ["--save-every", 100], free_port()
    procs = [launch(args, tmp_path / f"node{n}.log", nodes=(n, port), script=stoppable(tmp_path)) for n in (0, 1)]
    wait_for_steps(out, 2, procs)
    os.kill(int((tmp_path / "pid_rank1").read_text()), signal.SIGTERM)  # node 1's rank only
    (code0, output0), (code1, output1) = (finish(p, tmp_path / f"node{n}.log") for n, p in enumerate(procs))
    assert code0 != 0 and code1 != 0
    for output in (output0, output1):  # each node's torchrun reports its rank's status
        assert "exitcode  : 75" in output and "exitcode  : -" not in output, output[-3000:]
    assert_stopped_and_saved(out, output0, "a signal to another rank")
    assert "stopped by" not in output1  # rank 1 prints nothing
    port = free_port()
    procs = [launch(args[1:] + ["--resume"], tmp_path / f"resume{n}.log", nodes=(n, port)) for n in (0, 1)]
    for n, p in enumerate(procs):
        returncode, output = finish(p, tmp_path / f"resume{n}.log")
        assert returncode == 0, output[-3000:]
    assert checkpoint.checkpoints(out)[-1] == "step_000008"
    assert metrics(out) == metrics(tmp_path / "straight")  # two nodes = two ranks on one node, exactly
    assert_same_weights(one / "step_000008", out / "step_000008", atol=1e-6)
    for a, b in zip(metrics(one), metrics(out)):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-6)


def test_an_out_the_nodes_do_not_share_is_refused(assets, tmp_path):
    """Each node sees its own --out (here: a relative --out from two working directories, as two nodes'
    local disks would be): refused at the start with one line, before any checkpoint could be split
    between them, and nothing is left behind."""
    port = free_port()
    for n in (0, 1):
        os.makedirs(tmp_path / f"node{n}")
    args = sft_args(assets, "out", steps=2)
    procs = [launch(args, tmp_path / f"node{n}.log", nodes=(n, port), cwd=tmp_path / f"node{n}") for n in (0, 1)]
    (code0, output0), (code1, _) = (finish(p, tmp_path / f"node{n}.log", timeout=120) for n, p in enumerate(procs))
    assert code0 != 0 and code1 != 0
    assert ("error: --out out: rank 1 does not see the file rank 0 wrote there (1 of 2 ranks do not): every rank "
            "writes its shard of a checkpoint into --out, so it must be one folder on a filesystem all nodes share") \
        in output0, output0[-3000:]
    assert not os.path.exists(tmp_path / "node0" / "out") and not os.path.exists(tmp_path / "node1" / "out")


def test_a_mistake_on_one_rank_stops_every_rank(assets, tmp_path, monkeypatch):
    """A --data file only one rank can read (a node-local path): every rank stops with one line naming
    the rank, instead of the others waiting in their first collective for --dist-timeout-h."""
    script = tmp_path / "rank1_lacks_data.py"
    script.write_text(f"""
import os, sys
sys.path.insert(0, {ROOT!r})
import data, train
real = data.load_items
def load_items(cfg, *args):
    if os.environ["RANK"] == "1":
        cfg.data = cfg.data + ".missing"
    return real(cfg, *args)
train.load_items = load_items
train.main(sys.argv[1:])
""")
    log = tmp_path / "log"
    returncode, output = finish(launch(sft_args(assets, tmp_path / "out"), log, script=script), log, timeout=120)
    assert returncode != 0
    assert f"error: rank 1: {assets / 'sft.jsonl'}.missing: No such file or directory" in output, output[-3000:]
