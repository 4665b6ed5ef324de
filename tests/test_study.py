"""study.py shortened: one seed, two methods, a few steps; the grid continues where it stopped and
writes the figure and the table."""

import json

import study


def test_shortened_study_continues_and_writes_figure_and_table(tmp_path, capsys):
    runs, docs = tmp_path / "runs", tmp_path / "docs"
    args = ["--presets", "toy", "--seeds", "0", "--sft-steps", "10", "--rl-steps", "2", "--out", str(runs), "--docs", str(docs)]
    study.main(args + ["--methods", "degrpo-1"])
    assert "study: 2 runs, 0 finished already, 2 to run" in capsys.readouterr().out
    stopped = runs / "toy" / "grpo-seq-mean" / "seed0"  # a run that stopped before its summary
    stopped.mkdir(parents=True)
    (stopped / "stale.txt").write_text("from a run that stopped")
    study.main(args + ["--methods", "degrpo-1", "grpo-seq-mean"])
    assert "study: 3 runs, 2 finished already, 1 to run" in capsys.readouterr().out
    assert not (stopped / "stale.txt").exists() and (stopped / "summary.json").exists()  # redone from scratch

    metrics = [json.loads(line) for line in open(stopped / "rl" / "metrics.jsonl")]
    assert len(metrics) == 2 and set(metrics[-1]["samples_by_level"]) == {"1", "2", "3", "4"}
    summary = json.loads((stopped / "summary.json").read_text())
    assert summary["alpha"] == "none" and summary["loss_agg"] == "seq-mean"
    assert (docs / "study_toy.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = (docs / "study_toy.md").read_text()
    rows = [line.split("|")[1].strip() for line in table.splitlines() if line.startswith("| ")]
    assert rows == ["method", "after warm-up SFT", "warm-up, always think", "degrpo-1", "grpo-seq-mean"]
    for line in table.splitlines()[-6:-3]:  # the methods' rows and the always-think row: 8 columns each
        assert line.count("|") == 9, line
