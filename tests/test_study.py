"""study.py shortened: one seed, two methods, two RL seeds, a few steps; the grid continues where it
stopped and writes the figures and the tables. And the outcome measures on hand-made step counts."""

import json
import re

import study
import study_report


def test_shortened_study_continues_and_writes_figures_and_tables(tmp_path, capsys):
    runs, docs = tmp_path / "runs", tmp_path / "docs"
    args = ["--presets", "toy", "--seeds", "0", "--sft-steps", "10", "--rl-steps", "2", "--probe-samples", "2",
            "--out", str(runs), "--docs", str(docs)]
    study.main(args + ["--methods", "degrpo-1"])
    assert "study: 2 runs, 0 finished already, 2 to run" in capsys.readouterr().out
    stopped = runs / "toy" / "degrpo-1-seq-mean" / "seed0"  # a run that stopped before its summary
    stopped.mkdir(parents=True)
    (stopped / "stale.txt").write_text("from a run that stopped")
    study.main(args + ["--methods", "degrpo-1", "degrpo-1-seq-mean", "--rl-seeds-per-warmup", "2"])
    assert "study: 5 runs, 2 finished already, 3 to run" in capsys.readouterr().out
    assert not (stopped / "stale.txt").exists() and (stopped / "summary.json").exists()  # redone from scratch

    metrics = [json.loads(line) for line in open(stopped / "rl" / "metrics.jsonl")]
    assert len(metrics) == 2 and set(metrics[-1]["samples_by_level"]) == {"1", "2", "3", "4"}
    summary = json.loads((stopped / "summary.json").read_text())
    assert summary["alpha"] == "1" and summary["loss_agg"] == "seq-mean" and summary["seed"] == 0
    other = json.loads((runs / "toy" / "degrpo-1-seq-mean" / "seed0-rl1000" / "summary.json").read_text())
    assert other["seed"] == 1000 and other["sft"] == summary["sft"]  # another RL seed, the same warm-up
    probe = summary["history"][0]
    assert probe["samples"] == 2 * 100 and 0 <= probe["levels"]["4"]["p_think"] <= 1  # 2 samples, exact p
    warm = json.loads((runs / "toy" / "warmup" / "seed0" / "summary.json").read_text())
    assert warm["always_short"]["think_ratio"] == 0 and warm["always_think"]["think_ratio"] == 1

    for name in ("study_toy.png", "study_phase.png"):
        assert (docs / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = (docs / "study_toy.md").read_text()
    assert "| degrpo-1 | 1 | " in table and "| degrpo-1-seq-mean | 1 | " in table  # k of n: first RL seed only
    assert "## The spread from the RL seed alone" in table and "| degrpo-1-seq-mean | 0 | 1000 |" in table
    assert re.search(r"\| 7\.0 \(toy\) \| [01]/1(; [01]/[01] where short is wrong)? \|", (docs / "study_phase.md").read_text())
    assert re.search(r"\| 7\.0 \| 1 \| .* \| \d\.\d\d \(0\) \| [01]/1 \|", (docs / "study_phase.md").read_text())  # the warm-up


def counts(shares, n=20):
    """Think and sample counts of one level, step by step, from think shares."""
    return [round(s * n) for s in shares], [n] * len(shares)


def test_collapse_needs_fifty_windows_below_five_percent_or_the_last_twenty():
    # 100 steps at 50%, then 59 steps at 0% (windows ending at steps 110..159 lie wholly in the zeros:
    # 50 of them), then 41 steps at 50%: a collapse to short by the sustained rule only
    think, samples = counts([0.5] * 100 + [0.0] * 59 + [0.5] * 41)
    m = study_report.level_measures(think, samples, short_is_right=False)
    assert m["to_short"] and m["to_think"] is None  # to think: not counted on a level where short is not right
    assert m["min_w"] == 0 and m["min_w_step"] == 110 and m["below_steps"] == 59 and m["last"] == 0.5
    # one zero step fewer: 49 windows, no collapse
    think, samples = counts([0.5] * 100 + [0.0] * 58 + [0.5] * 42)
    assert not study_report.level_measures(think, samples, short_is_right=False)["to_short"]
    # the last 20 steps below 5% are a collapse, however short
    think, samples = counts([0.5] * 180 + [0.0] * 20)
    m = study_report.level_measures(think, samples, short_is_right=True)
    assert m["to_short"] and m["last"] == 0 and m["to_think"] is False
    # the mirror image, to think, on a level where short is right
    think, samples = counts([0.5] * 100 + [1.0] * 59 + [0.5] * 41)
    m = study_report.level_measures(think, samples, short_is_right=True)
    assert m["to_think"] and not m["to_short"]
    # windows pool samples: 1 think of 10 samples, then 0 of 30 for nine steps, is 1/280 (not a mean of shares)
    m = study_report.level_measures([1] + [0] * 9, [10] + [30] * 9, short_is_right=True)
    assert m["windows"] == [1 / 280]


def test_where_a_collapsed_level_went():
    """With the short counts, the last 20 steps split into think / short / no control token; a
    collapse is named by the larger of short and no control token."""
    think, samples = counts([0.5] * 180 + [0.0] * 20)
    short, _ = counts([0.5] * 180 + [0.25] * 20)  # the rest of the last 20 steps chose no control token
    m = study_report.level_measures(think, samples, short_is_right=False, short=short)
    assert m["to_short"] and (m["last"], m["short_last"], m["none_last"]) == (0, 0.25, 0.75)
    assert study_report.no_mode(m)
    short, _ = counts([0.5] * 180 + [1.0] * 20)
    assert not study_report.no_mode(study_report.level_measures(think, samples, False, short))
    # every sample chose a mode: 1 - 4/5 - 1/5 is -5.6e-17 in floats, which the tables printed as -0%
    m = study_report.level_measures([4] * 20, [5] * 20, False, short=[1] * 20)
    assert m["none_last"] == 0.0 and f"{m['none_last']:.0%}" == "0%"


def test_a_collapse_to_short_counts_as_harmful_only_where_short_is_wrong_and_the_criterion():
    """A hard level that goes short after a warm-up whose short mode solves it is routing, not
    collapse: the phase diagram counts it apart; the criterion needs 3 seeds or more to decide."""
    down = counts([0.5] * 180 + [0.0] * 20)
    up = counts([0.5] * 200)
    run = lambda shares, short_right: {"levels": {"1": study_report.level_measures(*shares, short_is_right=short_right)}}
    vanilla = {0: run(down, False), 1: run(down, True), 2: run(down, False), 3: run(down, False)}
    degrpo = {0: run(up, False), 1: run(down, True), 2: run(up, False), 3: run(up, False)}
    assert study_report.count(list(vanilla.values()), "1", "to_short") == "4/4; 3/3 where short is wrong"
    assert study_report.count(list(degrpo.values()), "1", "to_short") == "1/4; 0/3 where short is wrong"
    share, text = study_report.phase_cell(list(vanilla.values()), "1")
    assert share == 1.0 and text.startswith("3/3 short wrong\n4/4 all seeds")
    grid = {"runs": {"grpo-seq-mean": vanilla, "degrpo-1": degrpo}}
    assert study_report.criterion(grid) == ("grpo-seq-mean 4/4 against degrpo-1 1/4: does not hold "
                                            "(where short is wrong: 3/3 against 0/3: holds)")
    grid = {"runs": {"grpo-seq-mean": {0: vanilla[0]}, "degrpo-1": {0: degrpo[0]}}}
    assert "1/1 against degrpo-1 0/1: too few seeds" in study_report.criterion(grid)
