"""
Watching a run: every step prints a progress line, and its metrics go to out/metrics.jsonl (and, with
--wandb PROJECT, to Weights & Biases); out/curves.png is drawn from metrics.jsonl at every save and at
the end of the run.

A run of days is watched from afar, so the curves are the ones a user of RL needs to see whether it
goes well: reward, accuracy per mode, the think share (per level when the data have levels), response
length (mean and max), truncated share, KL, entropy, clip fraction, gradient norm and step time; SFT
draws its loss, gradient norm, learning rate and step time. Only rank 0 writes, and drawing never
fails the run: a failure is one warning line. wandb is optional (pip install wandb; off by default):
the run's wandb id is kept in out/wandb.json, so that --resume continues the same wandb run.
Imports nothing of ours; matplotlib and wandb are imported when first used.
"""

import json
import math
import os

# -----------------------------------------------------------------------------
# The progress line, and metrics.jsonl -> curves


def progress(stage, m):
    """The metrics of a step for the progress line. rl: think k/n counts the samples that chose
    <think> (the rest chose <short> or neither); malformed counts format errors of either mode or none
    (rewards.py: no control token, a chain never closed, no \\boxed{}). The gradient norm in 3
    significant digits: 1e-5 must not print as 0.000."""
    if stage == "sft":
        return f"loss {m['loss']:.4f} | grad {m['grad_norm']:.3g} | lr {m['lr']:.2e}"
    return (f"reward {m['reward']:+.3f} | think {m['think']}/{m['samples']} acc {m['acc_think']:.2f} | "
            f"short {m['short']} acc {m['acc_short']:.2f} | malformed {m['malformed']} | len {m['response_len']:.0f} | "
            f"kl {m['kl']:.4f} | clip {m['clip_frac']:.3f} | grad {m['grad_norm']:.3g}")


def read_metrics(path):
    """The metrics lines of a run, in order (a line cut short by a crash is skipped)."""
    rows = []
    with open(path) as f:
        for line in f:
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                pass
    return rows


def derived(m):
    """The shares the raw counts of an RL step imply: think share (of all samples, per level) and
    malformed share. NaN where nothing was counted (no sample of a level in this step's batch)."""
    share = lambda k, n: k / n if n else math.nan
    out = {}
    if "samples" in m:
        out["think_share"] = share(m.get("think", 0), m["samples"])
        out["malformed_share"] = share(m.get("malformed", 0), m["samples"])
    for level, n in (m.get("samples_by_level") or {}).items():
        out[f"think_share_level_{level}"] = share(m["think_by_level"].get(level, 0), n)
    return out


def accuracy(m, mode):
    """acc_think / acc_short, NaN in a step where no sample chose the mode (the metric reads 0 there)."""
    return m[f"acc_{mode}"] if m.get(mode) else math.nan


# Each panel: a title and its series (label, value of a metrics line or None where it has none).
PANELS = [
    ("loss", [("loss", lambda m: m.get("loss"))]),
    ("reward", [("mean reward", lambda m: m.get("reward"))]),
    ("accuracy", [("all", lambda m: m.get("accuracy")),
                  ("<think>", lambda m: accuracy(m, "think") if "acc_think" in m else None),
                  ("<short>", lambda m: accuracy(m, "short") if "acc_short" in m else None)]),
    ("think share", [("all", lambda m: derived(m).get("think_share"))]),  # + one series per level (draw)
    ("response length (tokens)", [("mean", lambda m: m.get("response_len")),
                                  ("max", lambda m: m.get("response_len_max"))]),
    ("truncated / malformed share", [("truncated", lambda m: m.get("truncated_frac")),
                                     ("malformed", lambda m: derived(m).get("malformed_share"))]),
    ("KL to the reference", [("k3", lambda m: m.get("kl"))]),
    ("entropy", [("entropy", lambda m: m.get("entropy"))]),
    ("clip fraction", [("clipped", lambda m: m.get("clip_frac"))]),
    ("gradient norm (before clipping)", [("norm", lambda m: m.get("grad_norm"))]),
    ("learning rate", [("lr", lambda m: m.get("lr"))]),
    ("step time (s)", [("step", lambda m: m.get("step_time")), ("rollout", lambda m: m.get("rollout_time")),
                       ("update", lambda m: m.get("update_time"))]),
]


def panels(rows):
    """PANELS with the per-level think share added, each series as (label, [values]), without the
    series (and panels) a run does not have."""
    levels = sorted({lv for m in rows for lv in m.get("samples_by_level") or {}}, key=lambda lv: (len(lv), lv))
    out = []
    for title, series in PANELS:
        if title == "think share":
            series = series + [(f"level {lv}", lambda m, lv=lv: derived(m).get(f"think_share_level_{lv}"))
                               for lv in levels]
        kept = [(label, [f(m) for m in rows]) for label, f in series]
        kept = [(label, values) for label, values in kept if any(v is not None for v in values)]
        if kept:
            out.append((title, kept))
    return out


def draw(metrics_file, png, title=None):
    """curves.png of the run whose metrics.jsonl is metrics_file: one panel per quantity, over the steps."""
    import matplotlib
    matplotlib.use("Agg")  # no display needed
    import matplotlib.pyplot as plt

    rows = [m for m in read_metrics(metrics_file) if "step" in m]
    if not rows:
        raise ValueError(f"{metrics_file}: no step logged yet")
    steps, shown = [m["step"] for m in rows], panels(rows)
    cols = 3
    fig, axes = plt.subplots(math.ceil(len(shown) / cols), cols, figsize=(4.3 * cols, 2.9 * math.ceil(len(shown) / cols)),
                             squeeze=False)
    for ax, (name, series) in zip(axes.flat, shown):
        for label, values in series:
            ax.plot(steps, [math.nan if v is None else v for v in values], label=label, lw=1.2,
                    marker="o" if len(steps) <= 30 else None, ms=3)
        ax.set_title(name, fontsize=10)
        ax.grid(alpha=0.3)
        if len(series) > 1:
            ax.legend(fontsize=7)
    for ax in axes.flat[len(shown):]:
        ax.axis("off")
    for ax in axes[-1]:
        ax.set_xlabel(f"{rows[-1].get('stage', '')} step")
    fig.suptitle(title or os.path.dirname(os.path.abspath(metrics_file)), fontsize=11)
    fig.tight_layout()
    tmp = png + ".tmp.png"  # written aside and renamed: a viewer never reads half a file
    try:
        fig.savefig(tmp, dpi=80)
    finally:
        plt.close(fig)
    os.replace(tmp, png)


# -----------------------------------------------------------------------------
# The run's log: metrics.jsonl, wandb, curves.png


def check_wandb(project):
    """A clear error, before any model loads, when --wandb is asked for and wandb is not installed."""
    if project is None:
        return
    try:
        import wandb  # noqa: F401
    except ImportError:
        raise ValueError(f"--wandb {project}: the wandb package is not installed (an optional dependency): "
                         f"pip install wandb, or drop --wandb (metrics.jsonl and curves.png are written either way)") from None


class RunLog:
    """What rank 0 writes for people to watch a run; on other ranks (writer False) every call does nothing.
    wandb_project: None, or the wandb project every step is also logged to (run name: --out's name)."""

    def __init__(self, out, writer, wandb_project=None, config=None, resume=False):
        self.out, self.writer, self.wandb = out, writer, None
        self.metrics_file, self.png = os.path.join(out, "metrics.jsonl"), os.path.join(out, "curves.png")
        if writer and wandb_project:
            self.wandb = start_wandb(wandb_project, out, config, resume)

    def log(self, line):
        """Appends a step's line ({"stage", "step", metrics...}) to metrics.jsonl, and sends it to wandb."""
        if not self.writer:
            return
        with open(self.metrics_file, "a") as f:
            f.write(json.dumps(line) + "\n")
        if self.wandb is not None:
            numbers = {k: v for k, v in line.items() if k != "step" and isinstance(v, (int, float, dict))}
            self.wandb.log({**numbers, **derived(line)}, step=line["step"])

    def draw(self):
        """curves.png from metrics.jsonl; a failure is a warning line, never the end of the run."""
        if not self.writer:
            return
        try:
            draw(self.metrics_file, self.png, title=os.path.abspath(self.out))
        except Exception as e:  # noqa: BLE001: a figure is never worth a run
            print(f"warning: {self.png} not drawn ({type(e).__name__}: {e}); the run goes on", flush=True)

    def close(self):
        if self.wandb is not None:
            self.wandb.finish()
            self.wandb = None


def start_wandb(project, out, config, resume):
    """A wandb run named after --out. Its id is kept in out/wandb.json: --resume logs into the same
    wandb run, a new run in the folder starts a new one."""
    import wandb

    id_file = os.path.join(out, "wandb.json")
    saved = json.load(open(id_file)) if resume and os.path.isfile(id_file) else {}
    run_id = saved.get("id") if saved.get("project") == project else None  # None: wandb makes a new one
    try:
        run = wandb.init(project=project, name=os.path.basename(os.path.abspath(out)), id=run_id,
                         resume="allow" if run_id else None, config=config)
    except Exception as e:  # noqa: BLE001: no login, no network...: one line, before any model loads
        raise ValueError(f"--wandb {project}: wandb could not start ({type(e).__name__}: {e}); "
                         f"WANDB_MODE=offline logs to disk without an account") from None
    os.makedirs(out, exist_ok=True)
    with open(id_file, "w") as f:
        json.dump({"project": project, "id": run.id}, f)
    return run
