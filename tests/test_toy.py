"""The toy task: tokenizer round trips, experts checked by independent arithmetic, level design,
data files, and the tiny model against transformers."""

import dataclasses
import json
import os
import random
import re

import pytest
import torch

import toy


@pytest.fixture(scope="module")
def tok():
    return toy.build_tokenizer()


def problems(n=200, seed=0):
    rng = random.Random(seed)
    return [toy.make_problem(rng, level) for _ in range(n // toy.LEVELS) for level in range(1, toy.LEVELS + 1)]


def values_of(problem):
    """Independent parse: the six digits after '='."""
    return [int(d) for d in re.findall(r"=(\d)", problem)]


# -----------------------------------------------------------------------------
# Tokenizer


def test_chat_and_control_tokens_are_single_tokens(tok):
    for t in (toy.BOS, toy.USER, toy.ASSISTANT, toy.EOS, toy.THINK, toy.END_THINK, toy.SHORT, toy.BOXED):
        ids = tok.encode(t, add_special_tokens=False).ids
        assert len(ids) == 1 and ids[0] == tok.token_to_id(t), (t, ids)
    assert tok.get_vocab_size() < 64  # tiny: characters, \boxed{ and the chat/control tokens


@pytest.mark.parametrize("name", list(toy.PRESETS))
def test_round_trip_is_exact(name):
    task = toy.PRESETS[name].task
    tok = toy.build_tokenizer(chars=task.chars)
    rng = random.Random(0)
    for p in [task.make_problem(rng, level) for _ in range(50) for level in range(1, task.levels + 1)]:
        for response in (task.think_expert(p["problem"]), task.short_expert(p["problem"]),
                         task.short_expert(p["problem"], careless=True)):
            text = toy.prompt_text(p["problem"]) + response + toy.EOS
            ids = tok.encode(text, add_special_tokens=False).ids
            assert tok.decode(ids, skip_special_tokens=False) == text
            assert tok.token_to_id("[UNK]") not in ids
            # the response alone, as the sampler decodes it; control tokens survive skip_special_tokens
            r_ids = tok.encode(response, add_special_tokens=False).ids
            assert tok.decode(r_ids, skip_special_tokens=False) == response
            assert tok.decode(r_ids, skip_special_tokens=True) == response
            assert r_ids[0] in (tok.token_to_id(toy.THINK), tok.token_to_id(toy.SHORT))


def test_saved_tokenizer_loads_in_transformers(tok, tmp_path):
    transformers = pytest.importorskip("transformers")
    toy.build_tokenizer(tmp_path)
    hf = transformers.PreTrainedTokenizerFast(tokenizer_file=str(tmp_path / "tokenizer.json"))
    p = problems(10)[7]
    text = toy.prompt_text(p["problem"]) + toy.think_expert(p["problem"]) + toy.EOS
    ids = tok.encode(text, add_special_tokens=False).ids
    assert hf.encode(text, add_special_tokens=False) == ids
    assert hf.decode(ids) == text


# -----------------------------------------------------------------------------
# Task and experts


def test_experts_are_correct_by_independent_arithmetic():
    for p in problems(400, seed=1):
        vals = values_of(p["problem"])
        assert len(vals) == toy.SLOTS
        assert p["answer"] == str(sum(vals) % 10)
        assert toy.short_expert(p["problem"]) == f"<short>\\boxed{{{p['answer']}}}"
        think = toy.think_expert(p["problem"])
        m = re.fullmatch(r"<think>(.*)</think>\\boxed\{(\d)\}", think)
        assert m and m.group(2) == p["answer"]
        steps = m.group(1).split(" ")
        letters = re.findall(r"([a-j])=", p["problem"])
        for i, step in enumerate(steps):  # step i: letter, its value, running sum mod 10
            assert step == f"{letters[i]}{vals[i]}={sum(vals[:i + 1]) % 10}"


def test_rewards_parser_grades_both_experts():
    rewards = pytest.importorskip("rewards")
    for p in problems(40, seed=2):
        for mode, response in (("think", toy.think_expert(p["problem"])), ("short", toy.short_expert(p["problem"]))):
            d = rewards.reward_details(response, p["answer"], toy.is_equivalent)
            assert d.mode == mode and d.format_ok and d.correct, (response, d)
            wrong = str((int(p["answer"]) + 1) % 10)
            assert not rewards.reward_details(response, wrong, toy.is_equivalent).correct


def test_levels_grow_in_work_not_in_length():
    """Harder levels have more numbers to add (more changes of the running sum); every think
    answer has the same length, as a reasoning model overthinks easy questions."""
    by_level = {lv: [] for lv in range(1, toy.LEVELS + 1)}
    for p in problems(800, seed=3):
        by_level[p["level"]].append(p)
    lengths, work = set(), []
    for lv, ps in by_level.items():
        nonzero = {sum(v != 0 for v in values_of(p["problem"])) for p in ps}
        assert nonzero == {toy.NONZERO[lv - 1]}
        lengths |= {len(toy.think_expert(p["problem"])) for p in ps}
        work.append(nonzero.pop())
        answers = {p["answer"] for p in ps}
        assert len(answers) >= 9  # no constant answer a model could learn instead of adding
    assert work == sorted(work) and len(set(work)) == toy.LEVELS
    assert len(lengths) == 1
    assert lengths.pop() > 5 * len(toy.short_expert(by_level[1][0]["problem"])) / 2


def test_bad_input_is_refused():
    with pytest.raises(ValueError, match="level 0"):
        toy.make_problem(random.Random(0), 0)
    for bad in ("a=1 b=2", "a=1 a=2 c=3 d=4 e=5 f=6", "a=12 b=2 c=3 d=4 e=5 f=6", "x=1 b=2 c=3 d=4 e=5 f=6"):
        with pytest.raises(ValueError, match="problem"):
            toy.think_expert(bad)


# -----------------------------------------------------------------------------
# Data files and model


@pytest.mark.parametrize("name", list(toy.PRESETS))
def test_data_files(tmp_path, name):
    task = toy.PRESETS[name].task
    n_sft = 400 * task.levels  # 400 prompts a level: enough to see how often the short expert is right
    paths = toy.write_toy_data(tmp_path, seed=5, sft_prompts=n_sft, rl_prompts=200, test_per_level=25, task=task)
    sft = [json.loads(line) for line in open(paths["sft"])]
    rl = [json.loads(line) for line in open(paths["rl"])]
    test = [json.loads(line) for line in open(paths["test"])]
    assert len(sft) == 2 * n_sft and len(rl) == 200 and len(test) == 25 * task.levels
    # both experts' answers for every SFT prompt; the think expert always right, the short one right
    # as often as task.short_right says (checked by independent arithmetic)
    modes, short_right = {}, {lv: [] for lv in range(1, task.levels + 1)}
    for r in sft:
        modes.setdefault(r["prompt"], []).append(r["response"][:7])
        vals = values_of(r["prompt"])
        answer = re.fullmatch(r"<(?:think|short)>.*\\boxed\{(\d)\}", r["response"]).group(1)
        if r["response"].startswith("<think>"):
            assert r["response"] == task.think_expert(r["prompt"]) and answer == str(sum(vals) % 10)
        else:
            level = task.nonzero.index(sum(v != 0 for v in vals)) + 1
            short_right[level].append(answer == str(sum(vals) % 10))
            if answer != str(sum(vals) % 10):  # the slip: only the first nonzero number
                assert answer == str(next(v for v in vals if v))
    assert all(sorted(m) == ["<short>", "<think>"] for m in modes.values()) and len(modes) == n_sft
    expected = task.short_right or (1.0,) * task.levels
    for lv, right in short_right.items():
        assert abs(sum(right) / len(right) - expected[lv - 1]) < 0.08, (lv, sum(right) / len(right))
    for p in rl + test:
        assert p["answer"] == str(sum(values_of(p["problem"])) % 10)
    assert [sum(p["level"] == lv for p in test) for lv in range(1, task.levels + 1)] == [25] * task.levels
    sft_p, rl_p, test_p = set(modes), {p["problem"] for p in rl}, {p["problem"] for p in test}
    assert len(rl_p) == len(rl) and len(test_p) == len(test)
    assert not (test_p & sft_p) and not (test_p & rl_p) and not (rl_p & sft_p)
    # the same seed writes the same files
    again = toy.write_toy_data(tmp_path / "again", seed=5, sft_prompts=n_sft, rl_prompts=200, test_per_level=25, task=task)
    assert all(open(paths[k]).read() == open(again[k]).read() for k in paths)
    # and the project's readers accept them
    sft_mod = pytest.importorskip("sft")
    assert len(sft_mod.read_sft_jsonl(paths["sft"])) == 2 * n_sft


def test_tiny_model_matches_transformers(tok, tmp_path):
    transformers = pytest.importorskip("transformers")
    from model import Transformer

    cfg = toy.toy_model_config(tok.get_vocab_size())
    assert cfg.vocab_size >= tok.get_vocab_size() and cfg.vocab_size % 64 == 0
    torch.manual_seed(0)
    model = Transformer(cfg).eval()
    assert sum(p.numel() for p in model.parameters()) < 200_000
    model.save_pretrained(tmp_path / "toy")
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "toy", dtype=torch.float32).eval()
    p = problems(10)[3]
    ids = tok.encode(toy.prompt_text(p["problem"]) + toy.think_expert(p["problem"]), add_special_tokens=False).ids
    idx = torch.tensor([ids])
    with torch.no_grad():
        torch.testing.assert_close(model(idx), hf(idx).logits, rtol=1e-4, atol=1e-5)


def test_plot_history(tmp_path):
    pytest.importorskip("matplotlib")
    levels = {str(lv): {"think_ratio": 0.5, "pass@1": 0.7} for lv in range(1, toy.LEVELS + 1)}
    path = tmp_path / "plot.png"
    toy.plot_history([(0, {"levels": levels}), (5, {"levels": levels})], path)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(ValueError, match="levels"):
        toy.plot_history([(0, {})], path)


# -----------------------------------------------------------------------------
# The presets: what each regime promises, checked without training


def test_long_think_answers_are_20x_short_ones():
    """The long regime's length imbalance is of the paper's order: every think answer at least 20x
    the tokens of a short one (end of sentence counted in both), on every level."""
    task = toy.PRESETS["long"].task
    tok = toy.build_tokenizer(chars=task.chars)
    rng = random.Random(4)
    n_tokens = lambda text: len(tok.encode(text + toy.EOS, add_special_tokens=False).ids)
    for level in range(1, task.levels + 1):
        for p in [task.make_problem(rng, level) for _ in range(50)]:
            think, short = n_tokens(task.think_expert(p["problem"])), n_tokens(task.short_expert(p["problem"]))
            assert think >= 20 * short, (p, think, short)


def test_long_experts_are_correct_by_independent_arithmetic():
    task = toy.PRESETS["long"].task
    rng = random.Random(6)
    for level in range(1, task.levels + 1):
        for p in [task.make_problem(rng, level) for _ in range(100)]:
            vals, letters = values_of(p["problem"]), re.findall(r"([a-j])=", p["problem"])
            assert len(vals) == task.slots == len(set(letters)) and sum(v != 0 for v in vals) == task.nonzero[level - 1]
            assert p["answer"] == str(sum(vals) % 10)
            m = re.fullmatch(r"<think>(.*)</think>\\boxed\{(\d)\}", task.think_expert(p["problem"]))
            assert m and m.group(2) == p["answer"]
            words = m.group(1).split(" ")
            for i in range(task.slots):  # step i: "letter=value previous+value=running sum"
                prev, total = sum(vals[:i]) % 10, sum(vals[:i + 1]) % 10
                assert words[2 * i: 2 * i + 2] == [f"{letters[i]}={vals[i]}", f"{prev}+{vals[i]}={total}"]
            assert task.short_expert(p["problem"]) == f"<short>\\boxed{{{p['answer']}}}"
            first = next(v for v in vals if v)
            assert task.short_expert(p["problem"], careless=True) == f"<short>\\boxed{{{first}}}"


@pytest.mark.parametrize("name", list(toy.PRESETS))
def test_preset_fits_its_model_and_flags(name):
    """Every answer fits max_new_tokens, every pair the warm-up's max_len and the model's positions;
    train.py takes the preset's name and refuses a flag the preset sets itself."""
    import train

    preset = toy.PRESETS[name]
    task = preset.task
    tok = toy.build_tokenizer(chars=task.chars)
    p = task.make_problem(random.Random(0), task.levels)
    prompt = len(tok.encode(toy.prompt_text(p["problem"]), add_special_tokens=False).ids)
    think = len(tok.encode(task.think_expert(p["problem"]) + toy.EOS, add_special_tokens=False).ids)
    assert think <= preset.rl["max_new_tokens"] and prompt + think <= preset.sft["max_len"]
    assert prompt + preset.rl["max_new_tokens"] <= preset.max_positions
    assert train.parse_args(["--preset", name]).preset == name
    with pytest.raises(SystemExit):
        train.parse_args(["--preset", name, "--lr", "0.1"])
    with pytest.raises(SystemExit):
        train.parse_args(["--preset", "no-such-preset"])


# -----------------------------------------------------------------------------
# The pipeline, shortened: train.py's toy preset with fewer steps


def test_demo_rerun_starts_over_and_refuses_a_foreign_folder(tmp_path, monkeypatch):
    """`python train.py` twice into the same --out: the second run replaces the first's outputs. A
    folder that holds anything the demo did not write is refused and left as it is."""
    import train
    from checkpoint import RunError

    preset = toy.PRESETS["toy"]
    monkeypatch.setitem(toy.PRESETS, "toy", dataclasses.replace(
        preset, sft=dict(preset.sft, steps=2, batch_size=8, save_every=1000),
        rl=dict(preset.rl, steps=1, batch_size=4, group_size=2), probe_every=1000))
    real = toy.write_toy_data
    monkeypatch.setattr(toy, "write_toy_data", lambda out, seed, task: real(out, seed, sft_prompts=64, rl_prompts=64,
                                                                              test_per_level=4, task=task))
    out = tmp_path / "demo"
    for _ in range(2):
        toy.run_demo(train.parse_args(["--out", str(out)]), train.train)
    assert sorted(os.listdir(out / "sft")) == ["curves.png", "metrics.jsonl", "step_000002"]
    assert [json.loads(line)["step"] for line in open(out / "sft" / "metrics.jsonl")] == [1, 2]
    assert sorted(os.listdir(out)) == sorted(toy.DEMO_OUTPUTS)
    (out / "notes.txt").write_text("mine")
    with pytest.raises(RunError, match=f"--out {out} holds files the toy demo did not write \\(notes.txt\\)"):
        toy.run_demo(train.parse_args(["--out", str(out)]), train.train)
    assert sorted(os.listdir(out)) == sorted(toy.DEMO_OUTPUTS + ("notes.txt",))
    with pytest.raises(SystemExit):  # the demo always starts from scratch: nothing to resume
        train.parse_args(["--resume"])


@pytest.fixture(scope="module")
def short_run(tmp_path_factory):
    """run_toy with 1000 warm-up steps (short answers are then reliable on levels 1-2 only, see the
    toy docstring) and 60 DeGRPO steps: about a minute and a half on 2 cores."""
    import train

    out = tmp_path_factory.mktemp("toy")
    patch = pytest.MonkeyPatch()
    preset = toy.PRESETS["toy"]
    patch.setitem(toy.PRESETS, "toy", dataclasses.replace(preset, sft=dict(preset.sft, steps=1000, save_every=1000),
                                                          rl=dict(preset.rl, steps=60, save_every=1000), probe_every=30))
    try:
        summary = toy.run_demo(train.parse_args(["--out", str(out)]), train.train)
    finally:
        patch.undo()
    return out, summary


def test_rl_routes_easy_to_short_and_hard_to_think(short_run):
    out, summary = short_run
    before, after = summary["sft"]["levels"], summary["rl"]["levels"]
    think = {lv: (before[lv]["think_ratio"], after[lv]["think_ratio"]) for lv in before}
    assert think["1"][1] < think["1"][0] - 0.15, think  # the easiest level moves to <short>
    assert think["4"][1] > think["4"][0] + 0.15, think  # the hardest to <think>
    assert summary["rl"]["mean_tokens"] < summary["sft"]["mean_tokens"], (summary["sft"], summary["rl"])
    assert summary["always_think"]["think_ratio"] == 1.0
    assert [h["step"] for h in summary["history"]] == [0, 30, 60]
    assert (out / "think_ratio.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert json.loads((out / "summary.json").read_text())["rl"]["samples"] == summary["rl"]["samples"]


def test_trained_checkpoint_greedy_matches_transformers(short_run, tok):
    """The RL checkpoint loads in transformers, whose greedy generate gives our sampler's tokens."""
    transformers = pytest.importorskip("transformers")
    import chat
    from model import Transformer
    from sampler import generate

    out, _ = short_run
    ckpt = sorted((out / "rl").glob("step_*"))[-1]
    test = [json.loads(line) for line in open(out / "test.jsonl")][:16]
    prompts = [chat.encode_prompt(tok, p["problem"], instruction=False) for p in test]
    assert len({len(p) for p in prompts}) == 1  # toy prompts share one length: one batch, no padding
    eos = tok.token_to_id(toy.EOS)
    max_new_tokens = toy.PRESETS["toy"].rl["max_new_tokens"]
    ours = generate(Transformer.from_pretrained(ckpt, dtype=torch.float32).eval(), prompts, max_new_tokens,
                    temperature=0, stop_ids=(eos,))
    hf = transformers.AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32).eval()
    with torch.no_grad():
        ref = hf.generate(torch.tensor(prompts), max_new_tokens=max_new_tokens, do_sample=False,
                          eos_token_id=eos, pad_token_id=eos)
    modes = set()
    for i, row in enumerate(ref[:, len(prompts[0]):].tolist()):
        expected = row[: row.index(eos) + 1] if eos in row else row
        assert ours[i][0].tokens == expected, (i, tok.decode(ours[i][0].tokens, skip_special_tokens=False),
                                               tok.decode(expected, skip_special_tokens=False))
        modes.add(expected[0])
    assert modes == {tok.token_to_id(toy.THINK), tok.token_to_id(toy.SHORT)}  # both modes compared
