"""
The toy task: the whole Thinkless method on a laptop CPU in minutes (`python train.py --preset NAME`).
Regimes of one task in PRESETS: "toy" (the default of `python train.py`), the same with longer
chains ("toy-r20", "toy-r39", "toy-r65": study.py's grid), and "long"; a Preset holds what differs
between them: the task's shape, the recipe, alpha, the probe settings.

== The toy regime (--preset toy)

The task: the last digit of the sum of six one-digit numbers, each named by a letter; on level L
only NONZERO[L-1] of the six numbers are nonzero (1, 2, 3 or all 6):
    level 1  "g=0 j=0 a=0 c=5 e=0 d=0"  ->  "5"
    level 4  "g=7 f=1 d=8 e=6 h=4 i=6"  ->  "2"      ((7 + 1 + 8 + 6 + 4 + 6) mod 10)
Two programmatic experts answer every problem (THINKLESS.md section 3):
    think: "<think>g7=7 f1=8 d8=6 e6=2 h4=6 i6=2</think>\\boxed{2}"  a step per number: letter, value, running sum
    short: "<short>\\boxed{2}"                                       the answer in one go
Why this task (THINKLESS.md section 8: thinking pays only where p_short < 0.75 p_think):
  - The short answer is a lookup over the nonzero numbers: a tiny model learns it for one, two and
    three nonzero numbers within the warm-up, but not for six (a cousin of parity: 10^6 cases and no
    shortcut), where it stays near chance (10%). Reliable on easy levels, useless on the hard one.
  - Each thinking step is the same two-digit lookup plus copies at fixed distances, and the letters
    let a step find its number by content ("d" reads the digit after "d="), not by counting
    positions; so the chain is learned in a few hundred steps and is reliable on every level.
  - Problems look alike on every level (six numbers) and the thinking expert always walks all six:
    like a reasoning model, it overthinks the easy ones. A think answer is 35 tokens on every level,
    a short one 5 (end of sentence included), so routing easy problems to <short> saves most tokens.
    (With chains that grow with difficulty, the easy problems would hold too few of the tokens for
    "at most half the tokens of always thinking" to be reachable.)
  - Letters are drawn at random, so even level 1 has ~10^7 distinct problem strings and the held-out
    test problems are disjoint strings.
The tokenizer has one token per character (digits, letters, "=", " "), plus "\\boxed{" and the chat and
control tokens, each one token (32 ids), so decode(encode(text)) == text and rewards.py reads the toy
model's output as it reads the 1.5B model's. The model is a tiny Qwen2 (2 layers, hidden 64, 82k
parameters) saved as a Hugging Face checkpoint: the toy runs the same code paths as the real model.

Measured warm-up (plain loop: AdamW betas (0.9, 0.95), wd 0.1, CE on response tokens, 64 sequences a
step, lr 3e-3 with 5% warm-up and cosine to 3e-4; ONE CPU thread on a shared 2-core machine;
greedy decoding with the first token forced; 100 held-out test problems per level; seed 1 for
write_toy_data and the init):
    SFT steps (train s)    think accuracy, level 1..4    short accuracy, level 1..4    p(<think>) first token
     500  ( 30 s)         1.00 0.99 0.94 0.93           0.90 0.11 0.05 0.17            0.46
    1000  ( 60 s)         1.00 1.00 1.00 1.00           1.00 1.00 0.13 0.14            0.46
    1500  ( 89 s)         0.98 1.00 1.00 1.00           1.00 1.00 0.99 0.14            0.49
    2000  (116 s)         1.00 1.00 1.00 1.00           1.00 1.00 1.00 0.13            0.50
So after the recommended 2000 steps: short pays on levels 1-3 (p_short ~ p_think), thinking pays on
level 4 (0.13 < 0.75), and routing right gives (3 x 5 + 35) / 4 = 12.5 tokens against 35 for always
thinking. Level 3 sits at the edge: with fewer warm-up steps its short answers are unreliable (0.13 at
1000 steps), which makes it a middle level whose routing RL has to find.

Results of the full recipe (train.py, 200 RL steps): README.md. There the always-think baseline is
the warm-up model, not the RL model: after RL the unused think mode drifts on the easy levels.

== The length knob (--preset toy-r20, toy-r39, toy-r65): the toy regime at other length ratios

The length ratio r (a think answer's tokens over a short one's, end of sentence counted) is 7 on the
toy regime; the paper's is in the tens to hundreds. These presets keep the toy task, its levels, its
short expert, its data and its recipe, and make only the thinking expert's chain longer: it walks
the six numbers `passes` times, each pass numbered, like a reasoning model that checks its sum again
    think: "<think>1:g7=7 f1=8 d8=6 e6=2 h4=6 i6=2 2:g7=7 f1=8 ... i6=2 3:g7=7 ... i6=2</think>\\boxed{2}"
    passes 3: 101 tokens, r = 20.2;  6: 197 tokens, r = 39.4;  10: 326 tokens, r = 65.2 (short: 5)
  - A pass after the first is the first again: a copy at a fixed distance (one pass back), the
    easiest thing attention learns. The numbers say where the chain is, so ending it is a lookup
    (the last pass's number), not a count of passes.
  - The model is the toy's, with max_position_embeddings 160 / 256 / 384 (prompt 26 tokens + the
    answer); the RL cap is the rest of those positions; probes every 10 RL steps.
  - What else changes with r: the warm-up's loss is a mean over all answer tokens of a step, so a
    pair's short answer is 5 of its 40 tokens at r = 7 and 5 of 331 at r = 65: the longer the chains,
    the smaller the short answers' share of the warm-up's gradient. Whether that leaves the short
    mode weaker after the same 2000 steps is measured per r in docs/STUDY.md (each forced mode on
    each level), not hidden by changing the task. Measured (docs/study_phase.md, 2026-12-05, seeds
    0-4 at r = 7, 20 and 39, 0-2 at r = 65): forced to think, right on 0.94-1.00 of every level at
    every r (longer chains are no harder to learn); forced short, right on 0.88-1.00 of levels 1-3
    and on 0.09-0.21 of level 4, except two warm-ups of r = 39 (seeds 1 and 3: 0.96 and 0.90) whose
    short mode learned level 4 too, so that no level needs thinking there, one of r = 20 (seed 2:
    0.61, near the 0.75 where short pays as much as thinking), and one of r = 20 (seed 3) whose
    short mode missed level 3 as well (0.10). The seed moves the short mode's reach more than r.

== The long regime (--preset long): the paper's length imbalance and a short mode RL can improve

On the toy regime a think answer is 7x a short one (the paper's: thousands of tokens against
hundreds), and after the warm-up the short answers are right on every level where they can be, so
RL has nothing to improve in the short mode. This regime changes exactly those two things:
    level 1  "d=0 h=0 b=4 g=0 ..."  one of ten numbers nonzero
    level 2  two of ten nonzero, the middle level
    level 3  all ten nonzero
    think: "<think>d=0 0+0=0 h=0 0+0=0 b=4 0+4=4 ... </think>\\boxed{4}"   104 tokens on every level
    short: "<short>\\boxed{4}"                                             4 tokens (26x; 21x with EOS)
  - Length: ten numbers (all ten letters, in random order), and every thinking step written out in
    full, the term and then the addition with the running sum: "b=4 0+4=4". The extra tokens are
    copies at fixed distances, so the chain is long, as a reasoning model's is, and still learned
    within the warm-up (measured below). Under a mean per response (the paper's vanilla GRPO) the control
    token of a think answer then weighs 1/105 of its response, a short answer's 1/5.
  - Level 1 is a lookup of the one nonzero number: short is reliable after the warm-up. Level 3 is
    a sum of ten digits in one go: short stays near chance (10%), thinking pays (section 8).
  - Level 2, the middle: the short expert is right on half of its problems; on the other half it
    slips and answers the first nonzero number only, dropping the second (an instruction model
    that fails on medium problems the reasoning model solves). The student learns both answers, so
    after the warm-up its short accuracy there is well below 0.75 p_think (a third to a half,
    measured below): at first, thinking pays. But the right answer is in its repertoire (half
    of level 2's short data teaches it), and RL rewards the right one of the two: short accuracy
    can rise above 0.75 during RL, and then short pays. So level 2's think share can rise, then fall.
    (Why not a level at the edge of what the warm-up learns, like the toy's level 3: that edge is a
    jump (0.13 to 0.99 between 1000 and 1500 steps on seed 1) and RL's lr is 30x below the
    warm-up's. The careless expert keeps level 2's short accuracy low by the data itself.)
  - The model is the toy's (2 layers, hidden 64) with max_position_embeddings 256 (prompt 42 tokens
    + the 105-token think answer); tokenizer: the toy's plus "+" (33 ids).
Measured warm-up (the toy's loop and recipe; ONE CPU thread; forced mode, greedy / temperature 0.6;
100 held-out test problems per level; seed 1 for write_toy_data and the init):
    SFT steps   think accuracy, level 1..3    short accuracy, level 1..3          p(<think>) first token
                greedy / T 0.6                greedy / T 0.6                      level 1..3
     500        1.00 0.93 0.58 / 1.00 0.94 0.53   0.68 0.06 0.09 / 0.47 0.09 0.11   0.50 0.50 0.50
    1000        1.00 0.95 0.96 / 1.00 0.94 0.94   1.00 0.60 0.08 / 0.98 0.47 0.11   0.42 0.42 0.42
    1500        1.00 1.00 1.00 / 1.00 1.00 1.00   1.00 0.27 0.11 / 0.99 0.29 0.13   0.46 0.46 0.46
    2000        1.00 1.00 1.00 / 1.00 1.00 1.00   1.00 0.32 0.06 / 1.00 0.33 0.09   0.51 0.52 0.52
Tokens per mode (end of sentence not counted): think 104.0-104.6, short 4.0, on every checkpoint.
After the 2000 steps: thinking is always right; short is right on level 1 and near chance on level 3;
on level 2 it is right a third of the time (the student leans to the slip), well
below 0.75 p_think. The warm-up took 470 s of CPU on one thread of a machine shared with several
other jobs (so less on a quiet one); 1500 steps give the same properties.
RL from that warm-up (DeGRPO alpha 1, the preset's RL recipe, seed 1; T 0.6 on the 300 test problems):
    RL step   short accuracy (forced), level 1..3   think ratio (free choice), level 1..3   tokens
       0      1.00 0.33 0.09                        0.51 0.52 0.52 (p(<think>))             -
      25      1.00 0.90 0.11                        0.65 0.72 0.81                          76.7
      50      1.00 0.95 0.10                        0.32 0.48 0.94                          62.0
      100      1.00 1.00 0.09                        0.03 0.08 0.98                          40.3
     200      1.00 1.00 0.09                        0.01 0.00 0.98                          37.0
Level 2's short answers become reliable within 25 RL steps, and its think share rises, then falls
(so, in this run, does level 1's). The 200 RL steps took 232 s of CPU on one thread (shared machine),
probes (600 evaluations every 25 steps) included.
"""

import dataclasses
import json
import os
import random
import re
import shutil
import time

import torch
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers

import chat
import eval as evaluation
from checkpoint import RunError
from chat import ASSISTANT, BOS, END_THINK, EOS, SHORT, THINK, USER  # the real model's template tokens
from model import ModelConfig, Transformer

BOXED = "\\boxed{"
LETTERS = "abcdefghij"


def prompt_text(problem: str) -> str:
    """The R1-Distill chat template without the trailing <think>: the model picks the first token."""
    return f"{BOS}{USER}{problem}{ASSISTANT}"


# -----------------------------------------------------------------------------
# The task and its two experts


@dataclasses.dataclass(frozen=True)
class Task:
    """Problems of `slots` one-digit numbers named by distinct letters; on level L only nonzero[L-1]
    of them are nonzero; the answer is the last digit of their sum."""
    slots: int
    nonzero: tuple[int, ...]  # nonzero numbers on level 1, 2, ...
    spelled_out: bool = False  # think step "g=7 0+7=7" (term, then the addition) instead of "g7=7"
    short_right: tuple[float, ...] | None = None  # per level: how often the short expert is right (None: always)
    passes: int = 1  # how many times the think expert walks the numbers; > 1: each pass numbered "j:"

    @property
    def levels(self) -> int:
        return len(self.nonzero)

    @property
    def chars(self) -> str:  # every character a problem or an expert's answer can hold
        return "0123456789" + LETTERS + "= " + ("+" if self.spelled_out else "") + (":" if self.passes > 1 else "")

    def make_problem(self, rng: random.Random, level: int) -> dict:
        if not 1 <= level <= self.levels:
            raise ValueError(f"level {level}: expected 1..{self.levels}")
        # Random distinct letters: many distinct problem strings even on level 1, so held-out test
        # problems are disjoint strings while every level still covers all of its arithmetic.
        names = rng.sample(LETTERS, self.slots)
        nonzero = set(rng.sample(range(self.slots), self.nonzero[level - 1]))
        values = [rng.randrange(1, 10) if i in nonzero else 0 for i in range(self.slots)]
        problem = " ".join(f"{x}={v}" for x, v in zip(names, values))
        return dict(problem=problem, answer=str(sum(values) % 10), level=level)

    def parse_problem(self, problem: str) -> list[tuple[str, int]]:
        """"a=3 h=0 ..." -> [("a", 3), ("h", 0), ...], refusing anything that is not a problem of this task."""
        terms = problem.split(" ")
        ok = len(terms) == self.slots and all(re.fullmatch(f"[{LETTERS}]=[0-9]", t) for t in terms)
        if not ok or len({t[0] for t in terms}) != self.slots:
            raise ValueError(f"problem {problem!r}: expected {self.slots} terms 'x=D' with distinct letters "
                             f"from {LETTERS}")
        return [(t[0], int(t[2])) for t in terms]

    def think_expert(self, problem: str) -> str:
        steps, total = [], 0
        for x, v in self.parse_problem(problem):
            prev, total = total, (total + v) % 10  # s_i = (s_{i-1} + v_i) mod 10
            steps.append(f"{x}={v} {prev}+{v}={total}" if self.spelled_out else f"{x}{v}={total}")
        chain = " ".join(steps)
        if self.passes > 1:  # the same walk again, each pass numbered: "1:g7=7 ... i6=2 2:g7=7 ... i6=2"
            chain = " ".join(f"{j}:{chain}" for j in range(1, self.passes + 1))
        return f"{THINK}{chain}{END_THINK}{BOXED}{total}}}"

    def short_expert(self, problem: str, careless: bool = False) -> str:
        """The answer in one go; careless: the slip of the unreliable expert (write_toy_data draws it
        with probability 1 - short_right[level]): only the first nonzero number, the rest dropped."""
        values = [v for _, v in self.parse_problem(problem) if v]
        if careless:
            values = values[:1]
        return f"{SHORT}{BOXED}{sum(values) % 10}}}"


def length_ratio(task: Task) -> float:
    """r: the tokens of a think answer over a short one's, end of sentence counted in both (the same
    on every problem: every step of the chain has the same length)."""
    tok = build_tokenizer(chars=task.chars)
    p = task.make_problem(random.Random(0), task.levels)["problem"]
    n_tokens = lambda text: len(tok.encode(text + EOS, add_special_tokens=False).ids)
    return n_tokens(task.think_expert(p)) / n_tokens(task.short_expert(p))


def is_equivalent(answer: str, ground_truth: str) -> bool:
    """The toy's grader for rewards.py: exact string match of the boxed answer."""
    return answer.strip() == ground_truth.strip()


TOY = Task(slots=6, nonzero=(1, 2, 3, 6))
# The default task's functions and constants under their first names (tests and examples use them).
SLOTS, NONZERO, LEVELS = TOY.slots, TOY.nonzero, TOY.levels
make_problem, parse_problem = TOY.make_problem, TOY.parse_problem
think_expert, short_expert = TOY.think_expert, TOY.short_expert


# -----------------------------------------------------------------------------
# Tokenizer and model


def build_tokenizer(out_dir=None, chars: str = TOY.chars) -> Tokenizer:
    """A character-level tokenizer (the `tokenizers` library), saved as out_dir/tokenizer.json.

    Chat tokens are special (skip_special_tokens drops them); the control tokens are added but not
    special, as in the official recipe, so they survive decoding. Every piece is one token."""
    vocab = {c: i for i, c in enumerate([BOXED, "}"] + list(chars))}
    vocab["[UNK]"] = len(vocab)
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    # Split into "\boxed{" or one character; Fuse joins the pieces back without spaces.
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"\\boxed\{|."), behavior="isolated")
    tok.decoder = decoders.Fuse()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in (BOS, USER, ASSISTANT, EOS)])
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in (THINK, END_THINK, SHORT)])
    if out_dir is not None:  # chat.save_tokenizer adds tokenizer_config.json with the chat template
        os.makedirs(out_dir, exist_ok=True)
        tok.save(os.path.join(out_dir, "tokenizer.json"))
    return tok


def toy_model_config(vocab_size: int, max_positions: int = 128) -> ModelConfig:
    """A tiny Qwen2 (82k parameters). The vocabulary is padded to a multiple of 64 rows, like the
    1.5B model's 151936 rows for 151665 ids, so the toy also exercises 'never sample a padded row'."""
    return ModelConfig(vocab_size=-(-vocab_size // 64) * 64, hidden_size=64, intermediate_size=128,
                       num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                       max_position_embeddings=max_positions, rope_theta=10000.0, tie_word_embeddings=False,
                       dtype="float32", bos_token_id=None, eos_token_id=None)


# -----------------------------------------------------------------------------
# Data files


def write_toy_data(out_dir, seed: int = 0, sft_prompts: int = 8000, rl_prompts: int = 4000,
                   test_per_level: int = 100, task: Task = TOY) -> dict:
    """sft.jsonl {prompt, response} (both experts' answers to every prompt, THINKLESS.md section 3),
    rl.jsonl and test.jsonl {problem, answer, level}; levels are uniform, the three sets disjoint.
    Returns {name: path}."""
    rng = random.Random(seed)
    seen, sets = set(), {}
    for name, n in (("test", test_per_level * task.levels), ("rl", rl_prompts), ("sft", sft_prompts)):
        problems = []
        while len(problems) < n:
            p = task.make_problem(rng, len(problems) % task.levels + 1)
            if p["problem"] not in seen:  # held out: no problem string is in two sets
                seen.add(p["problem"])
                problems.append(p)
        rng.shuffle(problems)
        sets[name] = problems
    os.makedirs(out_dir, exist_ok=True)
    paths = {name: os.path.join(out_dir, f"{name}.jsonl") for name in sets}
    with open(paths["sft"], "w") as f:
        for p in sets["sft"]:
            careless = task.short_right is not None and rng.random() >= task.short_right[p["level"] - 1]
            for response in (task.think_expert(p["problem"]), task.short_expert(p["problem"], careless)):
                f.write(json.dumps({"prompt": p["problem"], "response": response}) + "\n")
    for name in ("rl", "test"):
        with open(paths[name], "w") as f:
            f.writelines(json.dumps(p) + "\n" for p in sets[name])
    return paths


# -----------------------------------------------------------------------------
# The recipes (train.py --preset NAME) and their plot


@dataclasses.dataclass(frozen=True)
class Preset:
    """What differs between the toy regimes; run_demo reads it."""
    task: Task
    sft: dict  # train.TrainConfig fields of the warm-up
    rl: dict  # train.TrainConfig fields of RL (max_new_tokens included)
    alpha: str  # DeGRPO's control-token weight; not in `rl`, so that --alpha (none: vanilla GRPO) reaches train.py
    max_positions: int  # the model's max_position_embeddings: prompt + the longest answer
    probe_problems: int = 100  # held-out problems measured every probe_every RL steps for the plot
    probe_every: int = 5


PRESETS = {
    # The first regime (module docstring, first part).
    # Warm-up SFT, measured: 2000 steps of 64 sequences, ~2-3 min on one CPU thread.
    # RL, measured: 200 rollout batches of 32 prompts x 8 samples, ~2 min on one thread.
    # alpha: a control token weighs about alpha x (answer tokens per response) times an answer token:
    # the official 0.001 makes that a few times on the paper's responses of thousands of tokens, but
    # 1/70 on the toy's 5-35, and the mode choice barely moves (think ratio 35/38/43/52% per level
    # after 200 steps); alpha = 1 routes (0/1/4/97%).
    "toy": Preset(
        task=TOY,
        sft=dict(steps=2000, batch_size=64, lr=3e-3, min_lr=3e-4, warmup_frac=0.05, weight_decay=0.1,
                 max_len=128, micro_batch_tokens=8192, save_every=500, grad_checkpointing=False),
        rl=dict(steps=200, batch_size=32, group_size=8, lr=1e-4, max_new_tokens=48, micro_batch_tokens=16384,
                grad_checkpointing=False),
        alpha="1.0", max_positions=128),
    # The toy regime with longer chains (module docstring, "The length knob"): r = 20, 39 and 65 (study.py).
    **{f"toy-r{r}": Preset(
        task=dataclasses.replace(TOY, passes=passes),
        # micro-batches of 8192 tokens: rows are sorted by length, so think and short rows land in
        # micro-batches of their own instead of short rows padded to a think row's length (40% less
        # compute on a CPU; the losses are normalised over the whole step, so the split changes nothing)
        sft=dict(steps=2000, batch_size=64, lr=3e-3, min_lr=3e-4, warmup_frac=0.05, weight_decay=0.1,
                 max_len=positions, micro_batch_tokens=8192, save_every=500, grad_checkpointing=False),
        rl=dict(steps=200, batch_size=32, group_size=8, lr=1e-4, max_new_tokens=positions - 26, micro_batch_tokens=8192,
                grad_checkpointing=False),
        alpha="1.0", max_positions=positions, probe_every=10)
       for r, passes, positions in ((20, 3, 160), (39, 6, 256), (65, 10, 384))},
    # The long regime (module docstring, second part): think answers 26x the tokens of short ones, and
    # a middle level whose short expert is right half the time.
    "long": Preset(
        task=Task(slots=10, nonzero=(1, 2, 10), spelled_out=True, short_right=(1.0, 0.5, 1.0)),
        sft=dict(steps=2000, batch_size=64, lr=3e-3, min_lr=3e-4, warmup_frac=0.05, weight_decay=0.1,
                 max_len=256, micro_batch_tokens=16384, save_every=500, grad_checkpointing=False),
        rl=dict(steps=200, batch_size=16, group_size=8, lr=1e-4, max_new_tokens=120, micro_batch_tokens=32768,
                grad_checkpointing=False),
        alpha="1.0", max_positions=256, probe_every=10),
}


def plot_history(history, path, title="toy task", nonzero=NONZERO):
    """history [(rl_step, eval.evaluate() metrics with "levels")] -> PNG of think ratio and accuracy
    per level over the RL steps."""
    import matplotlib
    matplotlib.use("Agg")  # no display needed
    import matplotlib.pyplot as plt

    if not history or any("levels" not in m for _, m in history):
        raise ValueError("plot_history: expected [(step, metrics)] with per-level metrics ('levels')")
    steps = [s for s, _ in history]
    levels = sorted(history[0][1]["levels"], key=int)
    fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharex=True)
    for ax, key, label in ((axes[0], "think_ratio", "think ratio"), (axes[1], "pass@1", "accuracy")):
        for lv in levels:
            ax.plot(steps, [m["levels"][lv][key] for _, m in history], marker="o", ms=3,
                    label=f"level {lv} ({nonzero[int(lv) - 1]} nonzero)")
        ax.set_xlabel("RL step")
        ax.set_ylabel(label)
        ax.set_ylim(-0.03, 1.03)
        ax.grid(alpha=0.3)
    axes[0].legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


# -----------------------------------------------------------------------------
# The demo driver: `python train.py` (train.py --preset NAME, toy by default) lands here. Two
# stages, which study.py also runs apart: one warm-up, then RL runs of several methods from it.
# Each stage runs through `train`, train.py's train(), handed in by the caller (train.py or study.py):
# this module imports nothing above it, so train.py can import it and no import circle forms.


def method_name(cfg) -> str:
    alpha = cfg.alpha or PRESETS[cfg.preset].alpha
    if alpha.lower() == "none":
        return f"vanilla GRPO ({cfg.loss_agg or 'seq-mean'})"
    return f"DeGRPO (alpha {alpha}{', ' + cfg.loss_agg if cfg.loss_agg else ''})"


def measure(model, tokenizer, problems, cfg, force_mode=None, samples=1) -> dict:
    """eval.evaluate on toy problems (a checkpoint folder or a model): `samples` samples each at the RL
    temperature and the preset's answer cap, per-level metrics included."""
    if isinstance(model, str):
        model = Transformer.from_pretrained(model, dtype=torch.float32).eval()
    return evaluation.evaluate(model, tokenizer, problems, samples=samples,
                               max_new_tokens=PRESETS[cfg.preset].rl["max_new_tokens"], temperature=cfg.temperature,
                               top_p=1.0, max_batch=256, is_equivalent=is_equivalent, instruction=False,
                               force_mode=force_mode, progress=False)


def probe(model, tokenizer, problems, cfg, samples=1) -> dict:
    """measure(), plus the exact first-token probabilities (eval.mode_probabilities, no sampling):
    "p_think" and "p_short", the mean over the problems, overall and in each level's entry."""
    if isinstance(model, str):
        model = Transformer.from_pretrained(model, dtype=torch.float32).eval()
    m = measure(model, tokenizer, problems, cfg, samples=samples)
    probs = evaluation.mode_probabilities(model, tokenizer, problems, cfg.temperature, instruction=False)
    groups = [(m, probs)] + [(m["levels"][lv], [q for q, p in zip(probs, problems) if str(p["level"]) == lv])
                             for lv in m.get("levels", {})]
    for entry, ps in groups:
        entry["p_think"], entry["p_short"] = (sum(p[k] for p in ps) / len(ps) for k in (0, 1))
    return m


def warm_up(cfg, train, steps=None, samples=1) -> dict:
    """Stage 1 in cfg.out: a random tiny model (base/), the data files of the preset's task, warm-up
    SFT through train (sft/), and evaluations of the warm-up model on the test set, `samples`
    per problem: as it chooses (with the exact p(<think>)), made to think on every problem (the
    baseline of the demo's targets: after RL the unused think mode drifts, so the RL model is no
    longer the reasoning model), and made to answer short. steps: fewer SFT steps than the preset's
    (study.py's shortened runs). Returns a JSON-able dict: reinforce() starts from it."""
    t0, out, preset = time.time(), cfg.out, PRESETS[cfg.preset]
    base = os.path.join(out, "base")
    torch.manual_seed(cfg.seed)
    tokenizer = build_tokenizer(chars=preset.task.chars)
    Transformer(toy_model_config(tokenizer.get_vocab_size(), preset.max_positions)).save_pretrained(base)
    chat.save_tokenizer(tokenizer, base)
    paths = write_toy_data(out, cfg.seed, task=preset.task)
    sft_cfg = dataclasses.replace(cfg, preset=None, stage="sft", model=base, data=paths["sft"],
                                  out=os.path.join(out, "sft"), **dict(preset.sft, steps=steps or preset.sft["steps"]))
    sft_ckpt = train(sft_cfg)
    test = evaluation.load_problems(paths["test"])
    model = Transformer.from_pretrained(sft_ckpt, dtype=torch.float32).eval()
    warm = {"sft_ckpt": sft_ckpt, "rl_data": paths["rl"], "test_data": paths["test"],
            "sft": probe(model, tokenizer, test, cfg, samples),
            **{f"always_{mode}": measure(model, tokenizer, test, cfg, mode, samples) for mode in ("think", "short")}}
    print(f"\n== after warm-up SFT ({time.time() - t0:.0f} s)")
    print(evaluation.format_table({"SFT": warm["sft"], "SFT, always think": warm["always_think"],
                                   "SFT, always short": warm["always_short"]}))
    return dict(warm, seconds=time.time() - t0)


def reinforce(cfg, warm, train, steps=None, probe_samples=1) -> dict:
    """Stage 2 in cfg.out/rl: DeGRPO (or vanilla GRPO with cfg.alpha "none") through train from
    warm's SFT checkpoint (the RL seed is cfg.seed, which need not be the warm-up's), a held-out
    probe() every preset.probe_every steps with probe_samples samples per problem (the plot's curves),
    and the final evaluation on the test set. steps: fewer RL steps than the preset's. Returns the
    run's summary."""
    t0, name, preset = time.time(), method_name(cfg), PRESETS[cfg.preset]
    tokenizer = build_tokenizer(chars=preset.task.chars)
    test = evaluation.load_problems(warm["test_data"])
    probe_set = test[:: max(1, len(test) // preset.probe_problems)]  # a small held-out slice for the RL curves
    history = [(0, probe(warm["sft_ckpt"], tokenizer, probe_set, cfg, probe_samples))]

    def on_step(step, sampler_model):
        if step % preset.probe_every == 0:
            history.append((step, probe(sampler_model, tokenizer, probe_set, cfg, probe_samples)))

    rl_cfg = dataclasses.replace(cfg, preset=None, stage="rl", model=warm["sft_ckpt"], data=warm["rl_data"],
                                 out=os.path.join(cfg.out, "rl"), alpha=cfg.alpha or preset.alpha,
                                 **dict(preset.rl, steps=steps or preset.rl["steps"]))
    after = measure(train(rl_cfg, is_equivalent=is_equivalent, on_step=on_step), tokenizer, test, cfg)
    print(f"\n== after {name} ({time.time() - t0:.0f} s)")
    print(evaluation.format_table({"SFT": warm["sft"], "SFT, always think": warm["always_think"], name: after}))
    return {"method": name, "alpha": rl_cfg.alpha, "loss_agg": cfg.loss_agg, "seed": cfg.seed, "sft": warm["sft"],
            "always_think": warm["always_think"], "rl": after, "history": [{"step": s, **m} for s, m in history],
            "seconds": time.time() - t0}


# What the demo writes into --out. The demo starts from scratch on every run, so a rerun into the same
# --out (`python train.py` twice) first removes these, and only these: a folder that holds anything
# else (a real run's checkpoints, a user's files) is refused instead.
DEMO_OUTPUTS = ("base", "sft.jsonl", "rl.jsonl", "test.jsonl", "sft", "rl", "think_ratio.png", "summary.json")


def clear_demo_folder(out):
    if not os.path.isdir(out):
        return
    if foreign := sorted(set(os.listdir(out)) - set(DEMO_OUTPUTS)):
        raise RunError(f"--out {out} holds files the toy demo did not write ({', '.join(foreign[:5])}): "
                       f"give the demo an empty or new --out")
    if previous := sorted(os.listdir(out)):
        print(f"== the toy demo starts over: removing the previous demo's {', '.join(previous)} from {out}")
    for name in previous:
        path = os.path.join(out, name)
        shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)


def run_demo(cfg, train):
    """Warm-up SFT, evaluation, DeGRPO (or vanilla GRPO with --alpha none), evaluation, plot.
    cfg: train.TrainConfig with a preset of PRESETS; train: train.train, which runs the stages as it runs a real one."""
    t0 = time.time()
    clear_demo_folder(cfg.out)
    print(f"== toy task ({cfg.preset}): warm-up SFT, then {method_name(cfg)}, on {torch.get_num_threads()} CPU "
          f"threads; out: {cfg.out}")
    summary = reinforce(cfg, warm_up(cfg, train), train)
    summary["seconds"] = time.time() - t0
    plot = os.path.join(cfg.out, "think_ratio.png")
    plot_history([(h["step"], h) for h in summary["history"]], plot, title=f"toy task ({cfg.preset}), {summary['method']}",
                 nonzero=PRESETS[cfg.preset].task.nonzero)
    with open(os.path.join(cfg.out, "summary.json"), "w") as f:
        json.dump(summary, f, indent=2)
    print(f"plot: {plot}; summary: {os.path.join(cfg.out, 'summary.json')}; {summary['seconds']:.0f} s in all")
    return summary
