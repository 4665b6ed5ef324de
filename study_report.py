"""
study.py's report: the outcome measures of its docstring, computed from the finished runs' files, and
the tables and figures of docs/STUDY.md. Reads only what the runs wrote (summary.json,
rl/metrics.jsonl), so it can be rerun on a grid at any stage: `python study.py --report-only`.

    per preset   study_<preset>.md   the warm-up per level and forced mode; per method the collapse
                                     events (k of n seeds), the measures per level, the hard level
                                     seed by seed, paired differences against DeGRPO alpha 1, the
                                     test set after RL, and the spread from the RL seed alone
                 study_<preset>.png  batch think share per level over the RL steps and the exact
                                     probe p(<think>) per level (mean, min-max band over seeds)
    across them  study_phase.md/png  r against method: the seeds whose hard level collapsed to short
"""

import glob
import json
import os

import toy

WINDOW = 10  # steps pooled by the window measures
LAST = 20  # steps of the "last 20" share
LOW, HIGH = 0.05, 0.95  # collapse thresholds of the think share
SUSTAIN = 50  # consecutive windows below LOW (above HIGH) that make a collapse
BREAK_EVEN = 0.75  # short "is right" on a level when p_short >= 0.75 p_think (THINKLESS.md section 8)
BASELINE = "degrpo-1"  # the DeGRPO the criterion compares against
VANILLA = ("grpo-seq-mean", "grpo-token-mean")  # the methods the criterion judges


def read_json(path):
    with open(path) as f:
        return json.load(f)


def finished(folder):
    """summary.json is written last (atomically): a folder that has one holds a finished run."""
    return os.path.exists(os.path.join(folder, "summary.json"))


# -----------------------------------------------------------------------------
# The measures of one run


def pooled(think, samples):
    return sum(think) / max(sum(samples), 1)


def neither(think, short):
    """The share (or probability) left for no control token; clipped, so float rounding prints 0%, not -0%."""
    return max(0.0, 1 - think - short)


def longest_run(flags):
    best = cur = 0
    for f in flags:
        cur = cur + 1 if f else 0
        best = max(best, cur)
    return best


def level_measures(think, samples, short_is_right, short=None):
    """think, samples (and short): per RL step, one level's counts -> the docstring's measures of that
    level; with short, where its samples went over the last 20 steps (short, or no control token)."""
    windows = [pooled(think[t - WINDOW: t], samples[t - WINDOW: t]) for t in range(WINDOW, len(think) + 1)]  # W(t)
    last = pooled(think[-LAST:], samples[-LAST:])
    short_last = pooled(short[-LAST:], samples[-LAST:]) if short is not None else float("nan")
    low = min(range(len(windows)), key=windows.__getitem__) if windows else None
    to_think = longest_run(w > HIGH for w in windows) >= SUSTAIN or last > HIGH
    return {"share": [k / n if n else float("nan") for k, n in zip(think, samples)], "windows": windows,
            "min_w": windows[low] if windows else float("nan"), "min_w_step": WINDOW + low if windows else None,
            "below_steps": sum(n > 0 and k / n < LOW for k, n in zip(think, samples)), "last": last,
            "short_last": short_last, "none_last": neither(last, short_last),
            "to_short": longest_run(w < LOW for w in windows) >= SUSTAIN or last < LOW,
            "to_think": (to_think if short_is_right else None),  # None: not counted on this level
            "short_right": short_is_right}


def short_is_right(warm, level):
    lv = warm["always_short"]["levels"][level], warm["always_think"]["levels"][level]
    return lv[0]["pass@1"] >= BREAK_EVEN * lv[1]["pass@1"]


def load_run(folder, warm):
    """A finished RL run: its summary, its per-level measures, its probe curves."""
    summary = read_json(os.path.join(folder, "summary.json"))
    with open(os.path.join(folder, "rl", "metrics.jsonl")) as f:
        steps = [json.loads(line) for line in f]
    levels = toy_levels(steps[-1]["samples_by_level"])
    counts = lambda key, lv: [m[key][lv] for m in steps] if key in steps[-1] else None
    measures = {lv: level_measures(counts("think_by_level", lv), counts("samples_by_level", lv), short_is_right(warm, lv),
                                   counts("short_by_level", lv)) for lv in levels}
    probes = {key: {lv: [(h["step"], h["levels"][lv][key]) for h in summary["history"]] for lv in levels}
              for key in ("p_think", "p_short")}
    probes["p_none"] = {lv: [(s, neither(t, q)) for (s, t), (_, q) in zip(probes["p_think"][lv], probes["p_short"][lv])]
                        for lv in levels}  # the first token is neither control token
    return {"summary": summary, "levels": measures, "probes": probes, "seed": int(summary["seed"])}


def toy_levels(levels):
    return sorted(levels, key=int)


# -----------------------------------------------------------------------------
# Reading a preset's grid


def load_preset(preset, out, method_order):
    """{"warm": {seed: summary}, "runs": {method: {seed: run}}, "replicas": {method: {(seed, rl_seed): run}}}
    from every finished run found under out/preset; methods in method_order first."""
    warm = {int(d.rsplit("seed", 1)[1]): read_json(os.path.join(d, "summary.json"))
            for d in glob.glob(os.path.join(out, preset, "warmup", "seed*")) if finished(d)}
    runs, replicas = {}, {}
    methods = sorted(os.path.basename(d) for d in glob.glob(os.path.join(out, preset, "*")) if not d.endswith("warmup"))
    for method in methods:
        for d in sorted(glob.glob(os.path.join(out, preset, method, "seed*"))):
            name = os.path.basename(d)[len("seed"):]
            seed, _, rl_seed = name.partition("-rl")
            seed, rl_seed = int(seed), int(rl_seed or seed)
            if not finished(d) or seed not in warm:
                continue
            run = load_run(d, warm[seed])
            replicas.setdefault(method, {})[(seed, rl_seed)] = run
            if rl_seed == seed:  # the k-of-n counts: one RL run per warm-up, the first RL seed
                runs.setdefault(method, {})[seed] = run
    order = [m for m in method_order if m in runs] + [m for m in runs if m not in method_order]
    return {"warm": dict(sorted(warm.items())), "runs": {m: dict(sorted(runs[m].items())) for m in order},
            "replicas": replicas}


# -----------------------------------------------------------------------------
# Text


def shown(path):
    """A path as the docs print it: relative to the working folder (the project) when inside it."""
    rel = os.path.relpath(path)
    return path if rel.startswith("..") else rel


def pct(x):
    return f"{100 * x:.0f}%"


def spread(values, fmt=pct):
    """mean (min-max) over seeds, as text."""
    mean = sum(values) / len(values)
    return fmt(mean) + (f" ({fmt(min(values))}-{fmt(max(values))})" if len(values) > 1 else "")


def no_mode(x):
    """A level whose think share collapsed went mostly to no control token, not to <short>."""
    return x["none_last"] > x["short_last"]


def harmful(x):
    """A collapse to short on a level where, after that seed's warm-up, short is wrong (forced short
    below 0.75 x forced think): the failure the paper names. Where short is right, going short is
    the routing the reward asks for."""
    return x["to_short"] and not x["short_right"]


def harmful_count(ms):
    """(j, m): of the m runs whose level is hard after the warm-up, the j that collapsed to short."""
    hard = [x for x in ms if not x["short_right"]]
    return sum(map(harmful, hard)), len(hard)


def count(runs, level, event):
    """'k/n' of the runs where `event` happened on `level` (runs where it is not counted left out); for
    a collapse to short, how many of the k went mostly to no control token instead, and, where short
    is right after some seeds' warm-ups, j/m counted on the other seeds alone."""
    ms = [r["levels"][level] for r in runs if r["levels"][level][event] is not None]
    if not ms:
        return "-"
    text = f"{sum(x[event] for x in ms)}/{len(ms)}"
    if event == "to_short":
        none = sum(x[event] and no_mode(x) for x in ms)
        j, m = harmful_count(ms)
        text += (f" ({none} no mode)" if none else "") + (f"; {j}/{m} where short is wrong" if m < len(ms) else "")
    return text


def warmup_table(warm, levels):
    ws = list(warm.values())
    rows = ["| after the warm-up | " + " | ".join(f"level {lv}" for lv in levels) + " |", "|---" * (len(levels) + 1) + "|"]
    for label, key, field in (("forced think: accuracy", "always_think", "pass@1"),
                              ("forced short: accuracy", "always_short", "pass@1"),
                              ("free choice: p(<think>), exact", "sft", "p_think"),
                              ("free choice: think ratio, sampled", "sft", "think_ratio")):
        rows.append(f"| {label} | " + " | ".join(spread([w[key]["levels"][lv][field] for w in ws],
                                                         fmt=lambda v: f"{v:.2f}") for lv in levels) + " |")
    rows.append("| short is right (>= 0.75 x think), seeds | " + " | ".join(
        f"{sum(short_is_right(w, lv) for w in ws)}/{len(ws)}" for lv in levels) + " |")
    return rows


def method_tables(runs, levels):
    """The events, the per-level measures and the test set after RL, one row per method."""
    events = ["| method | runs | " + " | ".join(f"level {lv}: to short / to think" for lv in levels) + " |",
              "|---" * (len(levels) + 2) + "|"]
    per_level = ["| method | level | min W (mean, min-max) | steps < 5% | last 20 |", "|---|---|---|---|---|"]
    after = ["| method | think ratio, level " + " / ".join(levels) + " | accuracy | tokens |", "|---|---|---|---|"]
    for m, by_seed in runs.items():
        rs = list(by_seed.values())
        events.append(f"| {m} | {len(rs)} | " + " | ".join(f"{count(rs, lv, 'to_short')} / {count(rs, lv, 'to_think')}"
                                                          for lv in levels) + " |")
        for lv in levels:
            ms = [r["levels"][lv] for r in rs]
            per_level.append(f"| {m} | {lv} | {spread([x['min_w'] for x in ms])} | "
                             f"{spread([x['below_steps'] for x in ms], fmt=lambda v: f'{v:.0f}')} | "
                             f"{spread([x['last'] for x in ms])} |")
        rl = [r["summary"]["rl"] for r in rs]
        after.append(f"| {m} | " + " / ".join(spread([x["levels"][lv]["think_ratio"] for x in rl]) for lv in levels)
                     + f" | {spread([x['pass@1'] for x in rl], fmt=lambda v: f'{v:.3f}')} | "
                     f"{spread([x['mean_tokens'] for x in rl], fmt=lambda v: f'{v:.1f}')} |")
    return events, per_level, after


def hard_level_tables(runs, warm, hard):
    """The hard level seed by seed (with its forced-mode accuracy after that seed's warm-up), and each
    method's paired differences against BASELINE."""
    seeds = sorted({s for by_seed in runs.values() for s in by_seed})
    acc = lambda s, mode: warm[s][mode]["levels"][hard]["pass@1"]
    per_seed = ["| method | " + " | ".join(f"seed {s} (short {acc(s, 'always_short'):.2f}, think {acc(s, 'always_think'):.2f})"
                                          for s in seeds) + " |", "|---" * (len(seeds) + 1) + "|"]
    for m, by_seed in runs.items():
        cells = []
        for s in seeds:
            x = by_seed[s]["levels"][hard] if s in by_seed else None
            cells.append("" if x is None else f"{pct(x['min_w'])} @{x['min_w_step']}, {x['below_steps']} < 5%, last "
                         f"{pct(x['last'])} / {pct(x['short_last'])} / {pct(x['none_last'])}"
                         + ((" **no mode**" if no_mode(x) else " **short**") if x["to_short"] else "")
                         + (" (short is right)" if x["to_short"] and x["short_right"] else ""))
        per_seed.append(f"| {m} | " + " | ".join(cells) + " |")
    paired = [f"| method minus {BASELINE}, same warm-up and RL seed | min W, per seed | last 20, per seed | "
              "tokens after RL, per seed |", "|---|---|---|---|"]
    base = runs.get(BASELINE, {})
    for m, by_seed in runs.items():
        common = [s for s in seeds if s in by_seed and s in base]
        if m == BASELINE or not common:
            continue
        diff = lambda get: ", ".join(f"{get(by_seed[s]) - get(base[s]):+.2f}" for s in common)
        paired.append(f"| {m} | {diff(lambda r: r['levels'][hard]['min_w'])} | {diff(lambda r: r['levels'][hard]['last'])} "
                      f"| {diff(lambda r: r['summary']['rl']['mean_tokens'])} |")
    return per_seed, paired


def replica_table(replicas, levels, hard):
    rows = ["| method | warm-up seed | RL seed | hard level: min W (step), collapse | last 20, level " + " / ".join(levels)
            + " | tokens after RL |", "|---|---|---|---|---|---|"]
    for m, by_pair in replicas.items():
        warm_seeds = {s for s, r in by_pair if r != s}
        for (s, rl_seed), run in sorted(by_pair.items()):
            if s in warm_seeds:
                x = run["levels"]
                went = (" **no mode**" if no_mode(x[hard]) else " **short**") if x[hard]["to_short"] else ""
                rows.append(f"| {m} | {s} | {rl_seed} | {pct(x[hard]['min_w'])} ({x[hard]['min_w_step']}){went} | "
                            + " / ".join(pct(x[lv]["last"]) for lv in levels)
                            + f" | {run['summary']['rl']['mean_tokens']:.1f} |")
    return rows if len(rows) > 2 else []


def preset_text(preset, data, command, out):
    runs, warm = data["runs"], data["warm"]
    levels = toy_levels(next(iter(warm.values()))["sft"]["levels"])
    hard = levels[-1]
    events, per_level, after = method_tables(runs, levels)
    per_seed, paired = hard_level_tables(runs, warm, hard)
    replicas = replica_table(data["replicas"], levels, hard)
    seconds = sum(r["summary"]["seconds"] for by in data["replicas"].values() for r in by.values())
    seconds += sum(w["seconds"] for w in warm.values())
    n_runs = sum(map(len, data["replicas"].values()))
    r = toy.length_ratio(toy.PRESETS[preset].task)
    return "\n".join([
        f"# Study on the toy preset '{preset}' (r = {r:.1f})", "",
        f"Written by `{command}` from the finished runs in `{shown(os.path.join(out, preset))}`: "
        f"{len(warm)} warm-ups and {n_runs} RL runs, {seconds / 60:.0f} min of single-thread run time in all. "
        "The measures and the criterion are defined in study.py's docstring; W is the think share of a level's "
        f"samples over a {WINDOW}-step window of the RL batches.", "",
        f"## The warm-up (test set, {len(warm)} seeds: mean (min-max))", "", *warmup_table(warm, levels), "",
        f"## Collapse events, k of n seeds (hard level: {hard})", "", *events, "",
        f"## The hard level (level {hard}), seed by seed", "",
        "Per seed, the hard level's forced-short and forced-think accuracy after that seed's warm-up; per cell, min W "
        "@ the step that ends its window, steps below 5%, and over the last 20 steps the share of its samples that "
        "chose think / short / no control token; bold: the think share collapsed (to short, or to no mode); "
        "(short is right): on that seed's warm-up short was right on the hard level too (>= 0.75 x think).", "",
        *per_seed, "",
        "## Paired differences on the hard level", "", *paired, "",
        "## Every level: mean (min-max) over seeds", "", *per_level, "",
        "## The test set after RL (one sample per problem at temperature 0.6)", "", *after, "",
        *(["## The spread from the RL seed alone (two RL seeds from the same warm-up)", "", *replicas, ""]
          if replicas else []),
        f"![batch think share and probe per level](study_{preset}.png)", ""])


# -----------------------------------------------------------------------------
# Figures


def band(ax, xs, curves, **style):
    """One curve per seed -> their mean, and a min-max band."""
    n = min(map(len, curves))
    by_x = list(zip(*(c[:n] for c in curves)))  # (x, seeds)
    line, = ax.plot(xs[:n], [sum(v) / len(v) for v in by_x], lw=1.1, **style)
    ax.fill_between(xs[:n], [min(v) for v in by_x], [max(v) for v in by_x], color=line.get_color(), alpha=0.15)


def preset_figure(preset, data, path, plt):
    runs = data["runs"]
    levels = toy_levels(next(iter(data["warm"].values()))["sft"]["levels"])
    fig, axes = plt.subplots(3, len(levels), figsize=(4.2 * len(levels), 10), sharey=True, squeeze=False)
    for k, (m, by_seed) in enumerate(runs.items()):
        rs = list(by_seed.values())
        for col, lv in enumerate(levels):
            windows = [r["levels"][lv]["windows"] for r in rs]
            band(axes[0][col], list(range(WINDOW, WINDOW + max(map(len, windows)))), windows, color=f"C{k}",
                 label=f"{m} ({len(rs)})")
            for row, key in ((1, "p_think"), (2, "p_none")):
                probe = [r["probes"][key][lv] for r in rs]
                band(axes[row][col], [s for s, _ in probe[0]], [[p for _, p in c] for c in probe], color=f"C{k}",
                     marker=".")
    for col, lv in enumerate(levels):
        axes[0][col].set(title=f"level {lv} ({toy.PRESETS[preset].task.nonzero[int(lv) - 1]} nonzero): batch think share",
                         xlabel=f"RL step (end of a {WINDOW}-step window)")
        axes[1][col].set(title=f"level {lv}: probe, exact p(<think>)", xlabel="RL step")
        axes[2][col].set(title=f"level {lv}: probe, p(no control token first)", xlabel="RL step")
        for row in (0, 1, 2):
            axes[row][col].axhline(LOW, color="grey", lw=0.6, ls=":")
            axes[row][col].set_ylim(-0.02, 1.02)
            axes[row][col].grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.suptitle(f"toy preset '{preset}' (r = {toy.length_ratio(toy.PRESETS[preset].task):.1f}): mean over seeds, "
                 "band min-max; every method of a seed starts RL from that seed's warm-up")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def phase_cell(runs, hard):
    """One cell of the phase diagram: (share of the seeds where the hard level is hard after the warm-up
    whose hard level collapsed to short, its text)."""
    ms = [r["levels"][hard] for r in runs]
    k = sum(x["to_short"] for x in ms)
    none = sum(x["to_short"] and no_mode(x) for x in ms)
    j, m = harmful_count(ms)
    mean_min_w = sum(x["min_w"] for x in ms) / len(ms)
    text = (f"{j}/{m} short wrong" + (f"\n{k}/{len(ms)} all seeds" if m < len(ms) else "")
            + (f"\n({none} no mode)" if none else "") + f"\nmin W {pct(mean_min_w)}")
    return (j / m if m else float("nan")), text


def phase(presets, grids, method_order, path, plt):
    """The phase diagram: rows r, columns methods, the share of seeds whose hard level collapsed to short,
    counted on the seeds where short is wrong on it after the warm-up (all seeds in the text)."""
    presets = sorted(presets, key=lambda p: toy.length_ratio(toy.PRESETS[p].task))
    methods = [m for m in method_order if any(m in grids[p]["runs"] for p in presets)]
    share, labels = [], []
    for p in presets:
        cells = []
        for m in methods:
            rs = list(grids[p]["runs"].get(m, {}).values())
            cells.append(phase_cell(rs, toy_levels(rs[0]["levels"])[-1]) if rs else (float("nan"), ""))
        share.append([c[0] for c in cells])
        labels.append([c[1] for c in cells])
    fig, ax = plt.subplots(figsize=(2.3 * len(methods) + 1.5, 1.3 * len(presets) + 1.8))
    im = ax.imshow(share, cmap="Reds", vmin=0, vmax=1, aspect="auto")
    for i in range(len(presets)):
        for j in range(len(methods)):
            ax.text(j, i, labels[i][j], ha="center", va="center", fontsize=8,
                    color="white" if share[i][j] > 0.6 else "black")
    ax.set_xticks(range(len(methods)), methods)
    ax.set_yticks(range(len(presets)), [f"r = {toy.length_ratio(toy.PRESETS[p].task):.0f}" for p in presets])
    ax.set_title("seeds whose hard level's think share collapsed (< 5%), k/n of the seeds where short is wrong\n"
                 "on it after the warm-up (all seeds below, where they differ), how many to no control token,\n"
                 "and the mean of its lowest 10-step think share", fontsize=9)
    fig.colorbar(im, ax=ax, label="share of seeds (short wrong)")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return presets, methods


MIN_SEEDS = 3  # the criterion decides nothing on fewer seeds (issue 21: at least 3 per cell)


def verdict(k_v, k_d, n):
    if n < MIN_SEEDS:
        return f"too few seeds to decide (fewer than {MIN_SEEDS})"
    return "holds" if k_v >= 0.8 * n and k_d <= 0.2 * n else "does not hold"


def criterion(grid):
    """Per vanilla method: k/n of the hard level's collapse to short against BASELINE's and the verdict,
    on every seed (as stated before the run) and on the seeds where short is wrong on the hard level
    after the warm-up (added once r = 39's seed 1 had shown a warm-up whose short mode solved it)."""
    out = []
    base = grid["runs"].get(BASELINE, {})
    for m in VANILLA:
        runs = grid["runs"].get(m, {})
        seeds = [s for s in runs if s in base]
        if not seeds:
            continue
        hard = toy_levels(runs[seeds[0]]["levels"])[-1]
        k_v = sum(runs[s]["levels"][hard]["to_short"] for s in seeds)
        k_d = sum(base[s]["levels"][hard]["to_short"] for s in seeds)
        text = f"{m} {k_v}/{len(seeds)} against {BASELINE} {k_d}/{len(seeds)}: {verdict(k_v, k_d, len(seeds))}"
        wrong = [s for s in seeds if not base[s]["levels"][hard]["short_right"]]
        if len(wrong) < len(seeds):
            j_v = sum(runs[s]["levels"][hard]["to_short"] for s in wrong)
            j_d = sum(base[s]["levels"][hard]["to_short"] for s in wrong)
            text += f" (where short is wrong: {j_v}/{len(wrong)} against {j_d}/{len(wrong)}: {verdict(j_v, j_d, len(wrong))})"
        out.append(text)
    return "; ".join(out)


def warmup_across(grids, ordered):
    """Per r: each forced mode's accuracy per level after the warm-up, and per seed whether short is
    wrong on the hard level (the seeds the criterion can use)."""
    rows = ["| r | seeds | forced think, level 1 / 2 / 3 / 4 | forced short, level 1 / 2 / 3 / 4 | "
            "hard level: short accuracy per seed | seeds where short is wrong on it |", "|---|---|---|---|---|---|"]
    for p in ordered:
        warm = grids[p]["warm"]
        levels = toy_levels(next(iter(warm.values()))["sft"]["levels"])
        hard = levels[-1]
        acc = lambda mode, lv: spread([w[mode]["levels"][lv]["pass@1"] for w in warm.values()], fmt=lambda v: f"{v:.2f}")
        per_seed = ", ".join(f"{w['always_short']['levels'][hard]['pass@1']:.2f} ({s})" for s, w in warm.items())
        wrong = sum(not short_is_right(w, hard) for w in warm.values())
        rows.append(f"| {toy.length_ratio(toy.PRESETS[p].task):.1f} | {len(warm)} | "
                    + " / ".join(acc("always_think", lv) for lv in levels) + " | "
                    + " / ".join(acc("always_short", lv) for lv in levels) + f" | {per_seed} | {wrong}/{len(warm)} |")
    return rows


def write_report(presets, out, docs, command, method_order):
    """Every table and figure in docs from the finished runs; returns the phase table's text.
    method_order: the methods of the phase diagram, in its order (the others get their own .md rows)."""
    import matplotlib
    matplotlib.use("Agg")  # no display needed
    import matplotlib.pyplot as plt

    os.makedirs(docs, exist_ok=True)
    grids = {}
    for p in presets:
        data = load_preset(p, out, method_order)
        if not data["warm"] or not data["runs"]:
            print(f"study: no finished RL run of preset {p} in {shown(out)}; left out of the report")
            continue
        grids[p] = data
        with open(os.path.join(docs, f"study_{p}.md"), "w") as f:
            f.write(preset_text(p, data, command, out))
        preset_figure(p, data, os.path.join(docs, f"study_{p}.png"), plt)
    if not grids:
        raise SystemExit(f"study: no finished run of {', '.join(presets)} in {shown(out)}")
    ordered, methods = phase(list(grids), grids, method_order, os.path.join(docs, "study_phase.png"), plt)
    rows = ["| r | " + " | ".join(methods) + " | criterion (study.py): vanilla collapses where DeGRPO does not |",
            "|---" * (len(methods) + 2) + "|"]
    for p in ordered:
        cells = []
        for m in methods:
            rs = list(grids[p]["runs"].get(m, {}).values())
            hard = toy_levels(rs[0]["levels"])[-1] if rs else None
            cells.append(count(rs, hard, "to_short") if rs else "")
        rows.append(f"| {toy.length_ratio(toy.PRESETS[p].task):.1f} ({p}) | " + " | ".join(cells) + f" | {criterion(grids[p])} |")
    text = "\n".join([
        "# The phase diagram: where the hard level collapsed to short", "",
        f"Written by `{command}` from the finished runs in `{shown(out)}`. Per cell: the warm-up seeds "
        "(first RL seed of each) in which the hard level's think share stayed below 5% over 10-step windows for "
        f"{SUSTAIN} consecutive steps or over the last {LAST} steps (study.py); where short was right on the hard "
        "level after some seeds' warm-ups (forced short >= 0.75 x forced think: going short is then the routing "
        "the reward asks for), also counted on the other seeds alone. The figure's colour is that second share.",
        "", *rows, "",
        "![phase diagram](study_phase.png)", "",
        "## The warm-up at each r (test set: mean (min-max) over seeds; per seed: short accuracy (seed))", "",
        *warmup_across(grids, ordered), ""])
    with open(os.path.join(docs, "study_phase.md"), "w") as f:
        f.write(text)
    return text
