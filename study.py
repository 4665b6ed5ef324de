"""
The study of issue 12 on the toy task: does vanilla GRPO collapse to one mode, does the think share
rise then fall (the paper's U), and how much does DeGRPO's alpha matter? A grid of RL runs on each
of toy.py's regimes (toy.PRESETS):

    python study.py --presets long toy   # the whole grid: 8 methods x 3 seeds per regime (run time: README.md)
    python study.py --presets toy --seeds 0 --methods degrpo-1 grpo-seq-mean --rl-steps 20   # a shortened one

Methods (METHODS): DeGRPO with alpha 0.001, 0.01, 0.1, 1 and 10 (its answer term token-mean, the
official code's), and vanilla GRPO (--alpha none) aggregated seq-mean (the paper's form) and
token-mean (the official code's); degrpo.py's docstring has the formulas. degrpo-0, an ablation: the
answer term alone, the control token never trained (what moves the mode choice without it? README.md).

Design:
- One warm-up per (preset, seed), shared by every method of that seed: RL of every method starts from
  the same SFT checkpoint, a paired comparison, and the warm-up is paid once per seed, not per run.
- Every run is a subprocess on one thread (OMP_NUM_THREADS=1, torch.set_num_threads(1)), --jobs of
  them at a time (2: one per core of a 2-core machine); its output goes to log.txt in its folder.
  The runs of seed 0 come first, then those of seed 1..., so that a grid cut short has whole seeds.
- Folders: <out>/<preset>/warmup/seed<k>/ and <out>/<preset>/<method>/seed<k>/, the second holding
  rl/metrics.jsonl (one line per RL step, think share per level included) and the RL checkpoints.
  summary.json, written last, marks a finished run: it is skipped when the grid runs again, while a
  folder without one (a run that stopped) is redone from scratch. So the grid continues where it stopped.
- Outputs in --docs, per preset: study_<preset>.png (the batch think share over the RL steps per
  method, mean and min-max band over seeds, over all levels and level by level; the final think
  ratio per level) and study_<preset>.md (the table: see report()).
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import time

METHODS = {f"degrpo-{a}": {"alpha": a} for a in ("0", "0.001", "0.01", "0.1", "1", "10")}  # alpha 0: the ablation
METHODS.update({f"grpo-{agg}": {"alpha": "none", "loss_agg": agg} for agg in ("seq-mean", "token-mean")})
LAST = 20  # collapse: one mode on every level over the last LAST RL steps...
COLLAPSE_SHARE = 0.98  # ...meaning at least this share of each level's samples in that same mode

# -----------------------------------------------------------------------------
# One run, in its own process


def write_json(path, obj):
    """Atomic: a temporary name, then a rename, so that a file that exists is complete."""
    with open(path + ".tmp", "w") as f:
        json.dump(obj, f, indent=1)
    os.replace(path + ".tmp", path)


def read_json(path):
    with open(path) as f:
        return json.load(f)


def work(job):
    """Runs one job (a warm-up, or an RL run from its seed's warm-up) in this process, on one thread."""
    import torch

    import toy
    import train

    torch.set_num_threads(1)
    cfg = train.TrainConfig(preset=job["preset"], seed=job["seed"], out=job["dir"], **METHODS.get(job["method"], {}))
    if job["method"] is None:
        summary = toy.warm_up(cfg, steps=job["sft_steps"])
    else:
        summary = toy.reinforce(cfg, read_json(os.path.join(job["needs"], "summary.json")), steps=job["rl_steps"])
    write_json(os.path.join(job["dir"], "summary.json"), summary)


# -----------------------------------------------------------------------------
# The grid


def grid_jobs(args):
    """Every job, seed by seed: the warm-up first, then one RL run per method from it."""
    jobs = []
    for preset in args.presets:
        for seed in args.seeds:
            warm = os.path.join(args.out, preset, "warmup", f"seed{seed}")
            common = dict(preset=preset, seed=seed, sft_steps=args.sft_steps)
            jobs.append(dict(common, method=None, dir=warm, needs=None, rl_steps=None))
            jobs += [dict(common, method=m, dir=os.path.join(args.out, preset, m, f"seed{seed}"), needs=warm,
                          rl_steps=args.rl_steps) for m in args.methods]
    return jobs


def finished(folder):
    return os.path.exists(os.path.join(folder, "summary.json"))


def start(job):
    """A fresh folder (what a stopped run left is removed), the job's settings in job.json, and the
    job in a subprocess on one thread, its output in log.txt."""
    if os.path.exists(job["dir"]):
        shutil.rmtree(job["dir"])
    os.makedirs(job["dir"])
    write_json(os.path.join(job["dir"], "job.json"), job)
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    with open(os.path.join(job["dir"], "log.txt"), "w") as log:
        return subprocess.Popen([sys.executable, os.path.abspath(__file__), "--job", json.dumps(job)], env=env,
                                stdout=log, stderr=subprocess.STDOUT)


def run_grid(jobs, n_parallel):
    """Runs the jobs not finished yet, n_parallel at a time, each once its warm-up is finished.
    Returns the folders of the jobs that failed (or could not run because their warm-up failed)."""
    for job in jobs:  # a finished run of other settings would be mixed into the table
        if finished(job["dir"]) and read_json(os.path.join(job["dir"], "job.json")) != job:
            raise SystemExit(f"{job['dir']} holds a run of other settings ({os.path.join(job['dir'], 'job.json')}); "
                             "give another --out")
    pending = [j for j in jobs if not finished(j["dir"])]
    print(f"study: {len(jobs)} runs, {len(jobs) - len(pending)} finished already, {len(pending)} to run, "
          f"{n_parallel} at a time", flush=True)
    running, failed, durations, t0 = {}, set(), [], time.time()
    try:
        while pending or running:
            for job in list(pending):
                if job["needs"] in failed:
                    pending.remove(job)
                    failed.add(job["dir"])
                    print(f"  skip {job['dir']}: its warm-up failed", flush=True)
                elif len(running) < n_parallel and (job["needs"] is None or finished(job["needs"])):
                    pending.remove(job)
                    running[job["dir"]] = (start(job), time.time())
                    print(f"[{(time.time() - t0) / 60:5.1f} min] start {job['dir']}", flush=True)
            time.sleep(1)
            for folder, (proc, t_start) in list(running.items()):
                if proc.poll() is None:
                    continue
                del running[folder]
                if proc.returncode == 0 and finished(folder):
                    durations.append(time.time() - t_start)
                    left = len(pending) + len(running)
                    eta = sum(durations) / len(durations) * left / n_parallel / 60
                    print(f"[{(time.time() - t0) / 60:5.1f} min] done  {folder} in {durations[-1]:.0f} s; "
                          f"{left} left, ETA ~{eta:.0f} min", flush=True)
                else:
                    failed.add(folder)
                    with open(os.path.join(folder, "log.txt")) as f:
                        tail = f.read()[-2000:]
                    print(f"  FAILED {folder} (exit {proc.returncode}); the end of its log.txt:\n{tail}", flush=True)
    finally:
        for proc, _ in running.values():  # interrupted: no run outlives the grid
            proc.kill()
    print(f"study: {(time.time() - t0) / 60:.1f} min; {len(failed)} failed", flush=True)
    return failed


# -----------------------------------------------------------------------------
# The report: figure and table from the finished runs


def level_order(levels):
    return sorted(levels, key=lambda lv: (0, int(lv)) if str(lv).isdigit() else (1, str(lv)))


def targets_hold(m, always_think):
    """The demo's targets (README.md): think at most 10% on the easiest level and at least 90% on the
    hardest, accuracy within 3 points of always thinking, at most half its tokens."""
    lv = level_order(m["levels"])
    return (m["levels"][lv[0]]["think_ratio"] <= 0.10 and m["levels"][lv[-1]]["think_ratio"] >= 0.90
            and m["pass@1"] >= always_think["pass@1"] - 0.03 and m["mean_tokens"] <= 0.5 * always_think["mean_tokens"])


def load_run(folder):
    """A finished RL run: its summary and what the report reads from its metrics.jsonl."""
    summary = read_json(os.path.join(folder, "summary.json"))
    with open(os.path.join(folder, "rl", "metrics.jsonl")) as f:
        steps = [json.loads(line) for line in f]
    last = steps[-LAST:]
    think = {lv: sum(m["think_by_level"][lv] for m in last) / max(sum(m["samples_by_level"][lv] for m in last), 1)
             for lv in last[-1]["samples_by_level"]}  # the think share per level over the last LAST steps
    collapsed = ("think" if min(think.values()) >= COLLAPSE_SHARE else
                 "short" if max(think.values()) <= 1 - COLLAPSE_SHARE else "no")
    share = [m["think"] / m["samples"] for m in steps]  # the batch think share, step by step
    share_by_level = {lv: [m["think_by_level"][lv] / m["samples_by_level"][lv] if m["samples_by_level"][lv]
                           else float("nan") for m in steps] for lv in steps[-1]["samples_by_level"]}
    peak = max(range(len(share)), key=lambda k: sum(share[k: k + 10]))  # the highest 10-step window
    return {"summary": summary, "share": share, "share_by_level": share_by_level, "collapsed": collapsed,
            "first_target_step": next((h["step"] for h in summary["history"]
                                       if targets_hold(h, summary["always_think"])), None),
            "share_path": (sum(share[:10]) / len(share[:10]), sum(share[peak: peak + 10]) / len(share[peak: peak + 10]),
                           peak + 1, sum(share[-LAST:]) / len(share[-LAST:]))}


def spread(values, pct=False, digits=2):
    """mean (min-max) over seeds, as text."""
    f = (lambda v: f"{100 * v:.0f}") if pct else (lambda v: f"{v:.{digits}f}")
    mean = sum(values) / len(values)
    return f(mean) + ("%" if pct else "") + (f" ({f(min(values))}-{f(max(values))})" if len(values) > 1 else "")


def report(preset, methods, seeds, out, docs, command):
    """study_<preset>.png and study_<preset>.md in docs from the finished runs; returns the table."""
    import matplotlib
    matplotlib.use("Agg")  # no display needed
    import matplotlib.pyplot as plt

    runs = {m: [load_run(os.path.join(out, preset, m, f"seed{s}")) for s in seeds
                if finished(os.path.join(out, preset, m, f"seed{s}"))] for m in methods}
    runs = {m: r for m, r in runs.items() if r}
    if not runs:
        raise SystemExit(f"study: no finished run of preset {preset} in {out}")
    any_run = next(iter(runs.values()))[0]["summary"]
    levels = level_order(any_run["rl"]["levels"])
    L = len(levels)
    fig = plt.figure(figsize=(max(13, 4.5 * L), 8.5))
    grid = fig.add_gridspec(2, 2 * L)  # top: all levels, and the final think ratio; bottom: one panel a level
    ax, bx = fig.add_subplot(grid[0, :L]), fig.add_subplot(grid[0, L:])
    level_axes = [fig.add_subplot(grid[1, 2 * k: 2 * k + 2]) for k in range(L)]

    def band(a, curves, **style):  # one curve per seed -> their mean, and a min-max band
        n = min(map(len, curves))
        by_step = list(zip(*(c[:n] for c in curves)))  # (steps, seeds)
        line, = a.plot(range(1, n + 1), [sum(v) / len(v) for v in by_step], lw=1.1, **style)
        a.fill_between(range(1, n + 1), [min(v) for v in by_step], [max(v) for v in by_step], color=line.get_color(),
                       alpha=0.15)

    width = 0.8 / len(runs)
    for k, (m, rs) in enumerate(runs.items()):
        band(ax, [r["share"] for r in rs], color=f"C{k}", label=m)
        for a, lv in zip(level_axes, levels):
            band(a, [r["share_by_level"][lv] for r in rs], color=f"C{k}")
        final = [[r["summary"]["rl"]["levels"][lv]["think_ratio"] for r in rs] for lv in levels]  # (levels, seeds)
        mean = [sum(v) / len(v) for v in final]
        bx.bar([i + (k - (len(runs) - 1) / 2) * width for i in range(L)], mean, width, color=f"C{k}", label=m,
               yerr=[[a - min(v) for a, v in zip(mean, final)], [max(v) - a for a, v in zip(mean, final)]], capsize=2)
    ax.set(xlabel="RL step", ylabel="think share of the batch", title="batch think share (mean; band: min-max over seeds)")
    bx.set(xticks=range(L), xticklabels=[f"level {lv}" for lv in levels], ylabel="think ratio",
           title="after RL: think ratio per level (test set; bars: min-max)")
    for a, lv in zip(level_axes, levels):
        a.set(xlabel="RL step", title=f"batch think share, level {lv}")
    for a in [ax, bx] + level_axes:
        a.set_ylim(-0.02, 1.05)
        a.grid(alpha=0.3)
    bx.legend(fontsize=8)
    fig.suptitle(f"toy preset '{preset}', seeds {', '.join(map(str, seeds))}: every method of a seed starts RL from "
                 "that seed's warm-up")
    fig.tight_layout()
    os.makedirs(docs, exist_ok=True)
    fig.savefig(os.path.join(docs, f"study_{preset}.png"), dpi=100)
    plt.close(fig)

    warm = [read_json(os.path.join(out, preset, "warmup", f"seed{s}", "summary.json")) for s in seeds
            if finished(os.path.join(out, preset, "warmup", f"seed{s}"))]
    head = ("| method | seeds | think ratio, level " + " / ".join(levels) + " | accuracy | tokens | "
            "targets first hold at step | collapsed | batch think share: first 10 steps / peak (step) / last 20 |")
    lines = [head, "|" + "---|" * 8]
    for label, key in (("after warm-up SFT", "sft"), ("warm-up, always think", "always_think")):
        lines.append(f"| {label} | {len(warm)} | " + " / ".join(spread([w[key]["levels"][lv]["think_ratio"] for w in warm],
                                                                       pct=True) for lv in levels)
                     + f" | {spread([w[key]['pass@1'] for w in warm], digits=3)} | "
                     f"{spread([w[key]['mean_tokens'] for w in warm], digits=1)} | | | |")
    for m, rs in runs.items():
        rl = [r["summary"]["rl"] for r in rs]
        path = list(zip(*(r["share_path"] for r in rs)))
        lines.append(
            f"| {m} | {len(rs)} | " + " / ".join(spread([x["levels"][lv]["think_ratio"] for x in rl], pct=True) for lv in levels)
            + f" | {spread([x['pass@1'] for x in rl], digits=3)} | {spread([x['mean_tokens'] for x in rl], digits=1)} | "
            + ", ".join(str(r["first_target_step"] or "never") for r in rs) + " | "
            + ", ".join(r["collapsed"] for r in rs) + " | "
            + f"{spread(path[0], pct=True)} / {spread(path[1], pct=True)} ({', '.join(str(s) for s in path[2])}) / "
            + f"{spread(path[3], pct=True)} |")
    seconds = sum(r["summary"]["seconds"] for rs in runs.values() for r in rs) + sum(w["seconds"] for w in warm)
    text = "\n".join([
        f"# Study on the toy preset '{preset}'", "",
        f"Written by `{command}` from the finished runs in `{os.path.join(out, preset)}`: {sum(map(len, runs.values()))} "
        f"RL runs and {len(warm)} warm-ups, {seconds / 60:.0f} min of single-thread run time in all.", "",
        "Per method: mean (min-max) over seeds. Think ratio, accuracy and tokens: the test set after RL, one sample "
        "per problem at temperature 0.6. Targets first hold: the first probed RL step (per seed) at which the demo's "
        "targets hold on the probe set (think <= 10% on the easiest level, >= 90% on the hardest, accuracy within 3 "
        "points of always thinking, at most half its tokens). Collapsed (per seed): at least "
        f"{COLLAPSE_SHARE:.0%} of the samples of every level in one mode over the last {LAST} RL steps. Batch think "
        "share: the share of <think> samples in the RL batches (metrics.jsonl), over the first 10 steps, over the "
        "10-step window where it is highest (its first step), and over the last 20.", "",
        *lines, "", f"![batch think share and final think ratio](study_{preset}.png)", ""])
    with open(os.path.join(docs, f"study_{preset}.md"), "w") as f:
        f.write(text)
    return text


# -----------------------------------------------------------------------------


def main(argv=None):
    import toy

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--presets", nargs="+", default=list(toy.PRESETS), choices=list(toy.PRESETS),
                        help="toy.py's regimes (toy.PRESETS)")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--sft-steps", type=int, help="warm-up steps; default: the preset's")
    parser.add_argument("--rl-steps", type=int, help="RL steps; default: the preset's")
    parser.add_argument("--jobs", type=int, default=2, help="runs at a time, one thread each")
    parser.add_argument("--out", default="runs/study", help="the runs' folders")
    parser.add_argument("--docs", default="docs", help="where the figure and the table go")
    parser.add_argument("--report-only", action="store_true", help="write the figure and table from the finished runs")
    parser.add_argument("--job", help=argparse.SUPPRESS)  # internal: run one job in this process
    args = parser.parse_args(argv)
    if args.job:
        return work(json.loads(args.job))
    args.out = os.path.abspath(args.out)
    failed = set() if args.report_only else run_grid(grid_jobs(args), args.jobs)
    command = "python study.py " + " ".join(argv if argv is not None else sys.argv[1:])
    for preset in args.presets:
        print(report(preset, args.methods, args.seeds, args.out, args.docs, command))
    if failed:
        raise SystemExit(f"study: {len(failed)} runs failed: {', '.join(sorted(failed))}")


if __name__ == "__main__":
    main()
