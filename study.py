"""
Where does vanilla GRPO collapse? A grid of RL runs on toy.py's regimes (toy.PRESETS), written up in
docs/STUDY.md. The grid of issue 21 crosses the length ratio r (a think answer's tokens over a short
one's, end of sentence counted) with the aggregation of the loss, on one level structure (the `toy`
task: six numbers, 1, 2, 3 or 6 of them nonzero on levels 1-4; after the warm-up short answers are
reliable on levels 1-3 and near chance on level 4, the hard level):

    python study.py --presets toy toy-r20 toy-r65 --seeds 0 1 2                        # r = 7, 20, 65
    python study.py --presets toy-r39 --seeds 0 1 2 3 4                                # r = 39
    python study.py --presets toy-r39 --seeds 0 1 2 3 4 --methods grpo-seq-mean degrpo-1 --rl-seeds-per-warmup 2
    python study.py --presets toy toy-r20 --seeds 3 4                                  # r = 7, 20: 5 seeds
    python study.py --report-only --presets toy toy-r20 toy-r39 toy-r65                # docs/study_*.{md,png}

Methods (METHODS; degrpo.py's docstring has the formulas): vanilla GRPO (--alpha none) aggregated
seq-mean (the paper's form: the control token of response i weighs 1/(n (T_i+1))) and token-mean (the
official code's: every token 1/N); DeGRPO alpha 1 with its answer term token-mean (the official
code's) and with it seq-mean (the paper's 1/T_i per response): the last pair tells whether DeGRPO's
answer aggregation matters, and seq-mean DeGRPO against vanilla seq-mean separates the control
token's weight from the answer tokens' reweighting. Earlier studies' methods (alpha 0 ... 10) remain.

Outcome measures, fixed before the grid ran (issue 21). From each run's rl/metrics.jsonl, per level L:
  - the batch think share per step, s_L(t) = think samples / samples of level L in RL step t; a
    level has 10-30 samples a step (32 prompts x 8, levels uniform), so single steps are noisy and
    the measures pool samples over windows: W_L(t) = the think share of level L's samples of steps
    t-9..t (the 10-step window ending at t, t >= 10);
  - min W: the lowest W_L(t) over the run (and its t); steps < 5%: the number of steps with
    s_L(t) < 5%; last 20: the think share of level L's samples over the last 20 steps;
  - the event "level L collapsed to short": W_L(t) < 5% for at least 50 consecutive t, or last 20
    < 5%; "level L collapsed to think": the same above 95%, counted only on a level where short is
    right after the warm-up (its forced-short accuracy on the test set at least 0.75 x its
    forced-think accuracy: THINKLESS.md section 8's break-even). On the hard level, collapse to short
    is the harmful one; on levels 1-3 it is the routing the reward asks for;
  - counted per cell (r, method) as k of n warm-up seeds, on the first RL seed of each warm-up;
  - added once the first run had shown it (descriptive, no change to the events or the criterion):
    where a level's samples went when its think share fell, from short_by_level: its short share and
    its share of samples with no control token at all (a format error, reward -1) over the last 20
    steps; a collapse "to short" is then named by the larger of the two;
  - the probe, every probe_every RL steps on 25 held-out problems per level: p(<think>) as the model's
    exact probability of <think> as the first response token at the RL temperature (eval.
    mode_probabilities: one forward pass, no sampling), per level; accuracy and think ratio from
    --probe-samples samples per problem (4).
Criterion, stated before the run: "vanilla collapses where DeGRPO does not" holds in a cell r for a
vanilla method V when the hard level collapsed to short in at least 80% of V's seeds and in at most
20% of DeGRPO alpha 1's (token-mean) on the same warm-ups (4 of 5 against at most 1 of 5; 3 of 3
against 0 of 3); with the per-seed pairs shown (paired differences of the hard level's min W).
Anything between is reported as it is and decides nothing. Added once r = 39's warm-up of seed 1 had
shown that a warm-up can teach the short mode the hard level (forced short 0.96): the collapse counts
and the criterion are also given on the seeds where short is wrong on the hard level after the
warm-up (where it is right, going short is the routing the reward asks for), beside the counts on
all seeds; and the criterion decides nothing on fewer than 3 seeds.

Design:
- One warm-up per (preset, seed), shared by every method of that seed: RL of every method starts from
  the same SFT checkpoint with the same RL seed, a paired comparison, and the warm-up is paid once.
  --rl-seeds-per-warmup K adds RL runs with other RL seeds (seed + 1000 j, j < K) from the same
  warm-up: the spread from RL sampling alone, apart from the warm-up's.
- Every run is a subprocess on one thread (OMP_NUM_THREADS=1, torch.set_num_threads(1)), --jobs of
  them at a time (2: one per core of a 2-core machine); its output goes to log.txt in its folder.
  The runs of the first seed come first (every preset's), so that a grid cut short has whole seeds.
- Folders: <out>/<preset>/warmup/seed<k>/ and <out>/<preset>/<method>/seed<k>[-rl<rl seed>]/, the
  second holding rl/metrics.jsonl (one line per RL step, think share per level included).
  summary.json, written last, marks a finished run: it is skipped when the grid runs again, while a
  folder without one (a run that stopped) is redone from scratch. So the grid continues where it stopped.
- Outputs in --docs (study_report.py writes them from the finished runs): per preset
  study_<preset>.png and study_<preset>.md, and study_phase.png / study_phase.md across the presets.
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import time

from study_report import finished, read_json, write_report

METHODS = {f"degrpo-{a}": {"alpha": a} for a in ("0", "0.001", "0.01", "0.1", "1", "10")}  # alpha 0: an ablation
METHODS.update({f"grpo-{agg}": {"alpha": "none", "loss_agg": agg} for agg in ("seq-mean", "token-mean")})
METHODS["degrpo-1-seq-mean"] = {"alpha": "1", "loss_agg": "seq-mean"}
GRID_METHODS = ("grpo-seq-mean", "grpo-token-mean", "degrpo-1", "degrpo-1-seq-mean")  # issue 21's grid
RL_SEED_STRIDE = 1000  # RL seed of the j-th RL run from warm-up seed s: s + 1000 j

# -----------------------------------------------------------------------------
# One run, in its own process


def write_json(path, obj):
    """Atomic: a temporary name, then a rename, so that a file that exists is complete."""
    with open(path + ".tmp", "w") as f:
        json.dump(obj, f, indent=1)
    os.replace(path + ".tmp", path)


def work(job):
    """Runs one job (a warm-up, or an RL run from its seed's warm-up) in this process, on one thread."""
    import torch

    import toy
    import train

    torch.set_num_threads(1)
    seed = job["seed"] if job["method"] is None else job["rl_seed"]
    cfg = train.TrainConfig(preset=job["preset"], seed=seed, out=job["dir"], **METHODS.get(job["method"], {}))
    if job["method"] is None:
        summary = toy.warm_up(cfg, train.train, steps=job["sft_steps"], samples=job["probe_samples"])
    else:
        summary = toy.reinforce(cfg, read_json(os.path.join(job["needs"], "summary.json")), train.train,
                                steps=job["rl_steps"], probe_samples=job["probe_samples"])
    write_json(os.path.join(job["dir"], "summary.json"), summary)


# -----------------------------------------------------------------------------
# The grid


def run_dir(out, preset, method, seed, rl_seed):
    name = f"seed{seed}" if rl_seed == seed else f"seed{seed}-rl{rl_seed}"
    return os.path.join(out, preset, method, name)


def grid_jobs(args):
    """Every job, seed by seed (each seed's presets in the order given): a warm-up, then the RL runs
    of every method from it. A grid cut short has whole seeds of every preset."""
    jobs = []
    for seed in args.seeds:
        for preset in args.presets:
            warm = os.path.join(args.out, preset, "warmup", f"seed{seed}")
            common = dict(preset=preset, seed=seed, sft_steps=args.sft_steps, probe_samples=args.probe_samples)
            jobs.append(dict(common, method=None, dir=warm, needs=None, rl_steps=None, rl_seed=None))
            jobs += [dict(common, method=m, rl_seed=rl_seed, dir=run_dir(args.out, preset, m, seed, rl_seed), needs=warm,
                          rl_steps=args.rl_steps)
                     for rl_seed in (seed + RL_SEED_STRIDE * j for j in range(args.rl_seeds_per_warmup))
                     for m in args.methods]
    return jobs


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


def main(argv=None):
    import toy

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--presets", nargs="+", default=["toy", "toy-r20", "toy-r39", "toy-r65"],
                        choices=list(toy.PRESETS), help="toy.py's regimes (toy.PRESETS)")
    parser.add_argument("--methods", nargs="+", default=list(GRID_METHODS), choices=list(METHODS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2], help="warm-up seeds")
    parser.add_argument("--rl-seeds-per-warmup", type=int, default=1,
                        help=f"RL runs per warm-up and method, RL seeds seed + {RL_SEED_STRIDE} j")
    parser.add_argument("--sft-steps", type=int, help="warm-up steps; default: the preset's")
    parser.add_argument("--rl-steps", type=int, help="RL steps; default: the preset's")
    parser.add_argument("--probe-samples", type=int, default=4, help="samples per problem of the probes")
    parser.add_argument("--jobs", type=int, default=2, help="runs at a time, one thread each")
    parser.add_argument("--out", default="runs/study", help="the runs' folders")
    parser.add_argument("--docs", default="docs", help="where the figures and tables go")
    parser.add_argument("--report-only", action="store_true",
                        help="write the figures and tables from the finished runs of --presets (every seed found)")
    parser.add_argument("--job", help=argparse.SUPPRESS)  # internal: run one job in this process
    args = parser.parse_args(argv)
    if args.job:
        return work(json.loads(args.job))
    for name in ("rl_seeds_per_warmup", "probe_samples", "jobs"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    args.out = os.path.abspath(args.out)  # the runs' subprocesses and summaries name their folders absolutely
    failed = set() if args.report_only else run_grid(grid_jobs(args), args.jobs)
    command = "python study.py " + " ".join(argv if argv is not None else sys.argv[1:])
    print(write_report(args.presets, args.out, args.docs, command, args.methods))
    if failed:
        raise SystemExit(f"study: {len(failed)} runs failed: {', '.join(sorted(failed))}")


if __name__ == "__main__":
    main()
