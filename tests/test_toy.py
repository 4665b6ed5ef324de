"""The toy task: tokenizer round trips, experts checked by independent arithmetic, level design,
data files, and the tiny model against transformers."""

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


def test_round_trip_is_exact(tok):
    for p in problems():
        for response in (toy.think_expert(p["problem"]), toy.short_expert(p["problem"])):
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


def test_data_files(tmp_path):
    paths = toy.write_toy_data(tmp_path, seed=5, sft_prompts=400, rl_prompts=200, test_per_level=25)
    sft = [json.loads(line) for line in open(paths["sft"])]
    rl = [json.loads(line) for line in open(paths["rl"])]
    test = [json.loads(line) for line in open(paths["test"])]
    assert len(sft) == 800 and len(rl) == 200 and len(test) == 25 * toy.LEVELS
    # both experts' answers for every SFT prompt
    modes = {}
    for r in sft:
        modes.setdefault(r["prompt"], []).append(r["response"][:7])
        assert r["response"] in (toy.think_expert(r["prompt"]), toy.short_expert(r["prompt"]))
    assert all(sorted(m) == ["<short>", "<think>"] for m in modes.values()) and len(modes) == 400
    for p in rl + test:
        assert p["answer"] == str(sum(values_of(p["problem"])) % 10)
    assert [sum(p["level"] == lv for p in test) for lv in range(1, toy.LEVELS + 1)] == [25] * toy.LEVELS
    sft_p, rl_p, test_p = set(modes), {p["problem"] for p in rl}, {p["problem"] for p in test}
    assert len(rl_p) == len(rl) and len(test_p) == len(test)
    assert not (test_p & sft_p) and not (test_p & rl_p) and not (rl_p & sft_p)
    # the same seed writes the same files
    again = toy.write_toy_data(tmp_path / "again", seed=5, sft_prompts=400, rl_prompts=200, test_per_level=25)
    assert all(open(paths[k]).read() == open(again[k]).read() for k in paths)
    # and the project's readers accept them
    sft_mod = pytest.importorskip("sft")
    assert len(sft_mod.read_sft_jsonl(paths["sft"])) == 800


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
# The pipeline, shortened: train.py's toy preset with fewer steps


def test_demo_rerun_starts_over_and_refuses_a_foreign_folder(tmp_path, monkeypatch):
    """`python train.py` twice into the same --out: the second run replaces the first's outputs. A
    folder that holds anything the demo did not write is refused and left as it is."""
    import train
    from checkpoint import RunError

    monkeypatch.setattr(toy, "SFT_OVERRIDES", dict(toy.SFT_OVERRIDES, steps=2, batch_size=8, save_every=1000))
    monkeypatch.setattr(toy, "RL_OVERRIDES", dict(toy.RL_OVERRIDES, steps=1, batch_size=4, group_size=2))
    monkeypatch.setattr(toy, "PROBE_EVERY", 1000)
    real = toy.write_toy_data
    monkeypatch.setattr(toy, "write_toy_data", lambda out, seed: real(out, seed, sft_prompts=64, rl_prompts=64,
                                                                        test_per_level=4))
    out = tmp_path / "demo"
    for _ in range(2):
        toy.run_demo(train.parse_args(["--out", str(out)]))
    assert sorted(os.listdir(out / "sft")) == ["metrics.jsonl", "step_000002"]
    assert [json.loads(line)["step"] for line in open(out / "sft" / "metrics.jsonl")] == [1, 2]
    assert sorted(os.listdir(out)) == sorted(toy.DEMO_OUTPUTS)
    (out / "notes.txt").write_text("mine")
    with pytest.raises(RunError, match=f"--out {out} holds files the toy demo did not write \\(notes.txt\\)"):
        toy.run_demo(train.parse_args(["--out", str(out)]))
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
    patch.setattr(toy, "SFT_OVERRIDES", dict(toy.SFT_OVERRIDES, steps=1000, save_every=1000))
    patch.setattr(toy, "RL_OVERRIDES", dict(toy.RL_OVERRIDES, steps=60, save_every=1000))
    patch.setattr(toy, "PROBE_EVERY", 30)
    try:
        summary = toy.run_demo(train.parse_args(["--out", str(out)]))
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
    ours = generate(Transformer.from_pretrained(ckpt, dtype=torch.float32).eval(), prompts, toy.MAX_NEW_TOKENS,
                    temperature=0, stop_ids=(eos,))
    hf = transformers.AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32).eval()
    with torch.no_grad():
        ref = hf.generate(torch.tensor(prompts), max_new_tokens=toy.MAX_NEW_TOKENS, do_sample=False,
                          eos_token_id=eos, pad_token_id=eos)
    modes = set()
    for i, row in enumerate(ref[:, len(prompts[0]):].tolist()):
        expected = row[: row.index(eos) + 1] if eos in row else row
        assert ours[i][0].tokens == expected, (i, tok.decode(ours[i][0].tokens, skip_special_tokens=False),
                                               tok.decode(expected, skip_special_tokens=False))
        modes.add(expected[0])
    assert modes == {tok.token_to_id(toy.THINK), tok.token_to_id(toy.SHORT)}  # both modes compared
