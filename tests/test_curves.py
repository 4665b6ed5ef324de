"""Watching a run: curves.png drawn at every save and at the end (and never failing the run), the
panels a run's metrics give, and --wandb in wandb's offline mode (and a clear error without wandb)."""

import glob
import json
import math
import os
import struct
import subprocess
import sys

import pytest
from conftest import ROOT
from test_train import assets, rl_args, run_main, sft_args, sft_model  # noqa: F401

import curves
import train

PNG = b"\x89PNG\r\n\x1a\n"


def rl_line(step, **extra):
    """A metrics line of an RL step on data with levels 1 and 2 (level 2 absent from this batch)."""
    return {"stage": "rl", "step": step, "samples": 16, "think": 4, "short": 10, "malformed": 2, "acc_think": 0.5,
            "acc_short": 0.9, "accuracy": 0.7, "reward": 0.3, "response_len": 40.0, "response_len_max": 64,
            "truncated_frac": 0.125, "loss": 0.01, "clip_frac": 0.0, "kl": 0.001, "entropy": 1.5, "grad_norm": 0.2,
            "logp_gap": 0.0, "rollout_time": 1.0, "update_time": 2.0, "step_time": 3.1,
            "think_by_level": {"1": 4, "2": 0}, "samples_by_level": {"1": 16, "2": 0}, **extra}


def test_panels_of_an_rl_run_and_an_sft_run():
    rl = curves.panels([rl_line(1), rl_line(2, think=0, acc_think=0.0, think_by_level={"1": 0, "2": 0})])
    titles = [t for t, _ in rl]
    assert titles == ["loss", "reward", "accuracy", "think share", "response length (tokens)",
                      "truncated / malformed share", "KL to the reference", "entropy", "clip fraction",
                      "gradient norm (before clipping)", "step time (s)"]
    series = dict(rl)
    think = dict(series["think share"])
    assert think["all"] == [0.25, 0.0] and think["level 1"] == [0.25, 0.0]
    assert all(math.isnan(v) for v in think["level 2"])  # no level-2 sample in the batch: no point, not 0
    accuracy = dict(series["accuracy"])
    assert accuracy["<think>"][0] == 0.5 and math.isnan(accuracy["<think>"][1])  # no think sample in step 2
    assert dict(series["truncated / malformed share"])["malformed"] == [0.125, 0.125]
    assert [label for label, _ in series["step time (s)"]] == ["step", "rollout", "update"]
    sft = curves.panels([{"stage": "sft", "step": 1, "loss": 2.0, "grad_norm": 1.0, "lr": 1e-5, "step_time": 0.5}])
    assert [t for t, _ in sft] == ["loss", "gradient norm (before clipping)", "learning rate", "step time (s)"]


def test_curves_drawn_at_every_save_and_at_the_end(assets, sft_model, tmp_path, monkeypatch):
    drawn = []
    real = curves.draw
    monkeypatch.setattr(curves, "draw", lambda *a, **k: drawn.append(len(open(a[0]).readlines())) or real(*a, **k))
    out = tmp_path / "rl"
    train.train(train.parse_args([str(a) for a in rl_args(assets, sft_model, out, steps=3) + ["--save-every", 2]]))
    assert drawn == [2, 3]  # at step 2's save, and at the end
    assert (out / "curves.png").read_bytes()[:8] == PNG and not list(out.glob("*.tmp.png"))
    lines = [json.loads(line) for line in open(out / "metrics.jsonl")]
    assert all(line["step_time"] >= line["rollout_time"] + line["update_time"] for line in lines)


def test_a_failed_drawing_never_fails_the_run(assets, tmp_path, monkeypatch, capsys):
    def broken(*args, **kwargs):
        raise RuntimeError("no fonts here")

    monkeypatch.setattr(curves, "draw", broken)
    out = tmp_path / "sft"
    ckpt = train.train(train.parse_args([str(a) for a in sft_args(assets, out, steps=2)]))
    assert ckpt == str(out / "step_000002") and len(open(out / "metrics.jsonl").readlines()) == 2
    assert f"warning: {out / 'curves.png'} not drawn (RuntimeError: no fonts here); the run goes on" in capsys.readouterr().out


def test_wandb_asked_for_but_missing_is_one_clear_line(assets, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "wandb", None)  # import wandb raises ImportError
    status, output = run_main(sft_args(assets, tmp_path / "sft") + ["--wandb", "thinkless"], capsys)
    assert status == 1 and output == ("error: --wandb thinkless: the wandb package is not installed (an optional "
                                      "dependency): pip install wandb, or drop --wandb (metrics.jsonl and curves.png "
                                      "are written either way)\n")
    assert not (tmp_path / "sft").exists()


def test_wandb_that_cannot_start_is_one_clear_line_before_any_model_loads(assets, tmp_path, monkeypatch, capsys):
    wandb = pytest.importorskip("wandb")

    def no_login(**kwargs):
        raise wandb.errors.UsageError("api_key not configured (no-tty)")

    def load(*args, **kwargs):
        raise AssertionError("a model was loaded before wandb started")

    monkeypatch.setattr(wandb, "init", no_login)
    monkeypatch.setattr(train.Transformer, "from_pretrained", load)
    status, output = run_main(sft_args(assets, tmp_path / "sft") + ["--wandb", "thinkless"], capsys)
    assert status == 1 and output.endswith("\nerror: --wandb thinkless: wandb could not start (UsageError: api_key "
                                           "not configured (no-tty)); WANDB_MODE=offline logs to disk without an account\n")


def wandb_history(run_dir):
    """The logged steps of an offline wandb run, {step: {key: value}}, read from its run-ID.wandb file
    (LevelDB log blocks of 32 KiB, each record a wandb Record protobuf)."""
    from wandb.proto import wandb_internal_pb2

    data = open(glob.glob(os.path.join(run_dir, "run-*.wandb"))[0], "rb").read()
    pos, records, pending = 7, [], b""  # 7 bytes of file header
    while pos + 7 <= len(data):
        if 32768 - pos % 32768 < 7:  # a block's tail too short for a record header is padding
            pos += 32768 - pos % 32768
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        pending, pos = pending + data[pos + 7:pos + 7 + length], pos + 7 + length
        if kind in (1, 4):  # a full record, or the last piece of one
            records.append(pending)
            pending = b""
        elif kind == 0:
            break
    history = {}
    for raw in records:
        record = wandb_internal_pb2.Record()
        record.ParseFromString(raw)
        if record.WhichOneof("record_type") == "history":
            items = {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in record.history.item}
            history[items["_step"]] = items
    return history


def test_wandb_offline_logs_every_step_and_resume_continues_the_run(assets, sft_model, tmp_path):
    pytest.importorskip("wandb")
    out = tmp_path / "rl"
    env = dict(os.environ, WANDB_MODE="offline", WANDB_DIR=str(tmp_path), WANDB_SILENT="true", OMP_NUM_THREADS="1",
               CUDA_VISIBLE_DEVICES="")
    for steps, resume in ((2, []), (3, ["--resume"])):
        args = rl_args(assets, sft_model, out, steps=steps) + ["--wandb", "thinkless-test"] + resume
        proc = subprocess.run([sys.executable, os.path.join(ROOT, "train.py")] + [str(a) for a in args], env=env,
                              capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    run_id = json.load(open(out / "wandb.json"))["id"]
    runs = sorted(glob.glob(str(tmp_path / "wandb" / "offline-run-*")))
    assert len(runs) == 2 and all(r.endswith(run_id) for r in runs)  # --resume: the same wandb run
    logged = {**wandb_history(runs[0]), **wandb_history(runs[1])}
    metrics = [json.loads(line) for line in open(out / "metrics.jsonl")]
    assert sorted(logged) == [1, 2, 3] == [m["step"] for m in metrics]
    for m in metrics:
        got = logged[m["step"]]
        assert got["reward"] == m["reward"] and got["grad_norm"] == m["grad_norm"] and got["kl"] == m["kl"]
        assert got["think_share"] == m["think"] / m["samples"]
        assert got["think_by_level/1"] == m["think_by_level"]["1"]
