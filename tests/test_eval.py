"""eval.py: problem files, the metrics against hand-counted ones (scripted sampler), and the CLI end to
end on a tiny random checkpoint (the numbers are meaningless there; the table and the JSONL are checked)."""

import json
import os

import pytest
import torch
from conftest import make_hf_model, save_hf_model
from test_chat import make_word_tokenizer

import eval as ev
import official_score
from chat import CHAT_TEMPLATE, EOS, THINK, control_ids, encode_prompt, load_tokenizer, save_tokenizer
from rewards import thinkless_reward
from sampler import Completion


def write_jsonl(path, rows):
    with open(path, "w") as f:
        f.write("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return str(path)


def test_load_problems(tmp_path):
    path = write_jsonl(tmp_path / "ok.jsonl", [{"problem": "a", "answer": "1", "level": 2}, "",
                                              {"problem": "b", "answer": ["2", 3]}, {"problem": "c", "answer": 4.5}])
    assert ev.load_problems(path) == [{"problem": "a", "answer": "1", "level": 2},
                                      {"problem": "b", "answer": ["2", "3"]}, {"problem": "c", "answer": "4.5"}]
    with open(tmp_path / "ok.json", "w") as f:
        json.dump([{"problem": "a", "answer": "1"}], f)
    assert ev.load_problems(tmp_path / "ok.json") == [{"problem": "a", "answer": "1"}]
    bad = [('{"problem": "a", "answer": "1"}\n{"problem": "b"', ":2: not valid JSON"),
           ('{"problem": "a", "answer": "1"}\n\n{"question": "b", "answer": "1"}', ":3: expected an object"),
           ('{"problem": "a", "answer": []}', ":1: 'answer' must be"),
           ('{"problem": "a", "answer": true}', ":1: 'answer' must be"),
           ('{"problem": "a", "answer": {"x": 1}}', ":1: 'answer' must be"),
           ("\n", "no problems")]
    for i, (text, message) in enumerate(bad):
        path = tmp_path / f"bad{i}.jsonl"
        path.write_text(text)
        with pytest.raises(ValueError, match=f"bad{i}.jsonl{message}" if message.startswith(":") else message):
            ev.load_problems(path)
    (tmp_path / "bad.json").write_text('{"problem": "a"}')
    with pytest.raises(ValueError, match="JSON list"):
        ev.load_problems(tmp_path / "bad.json")


def test_load_problems_skips_unanswered_for_training(tmp_path, capsys):
    path = write_jsonl(tmp_path / "train.jsonl", [{"problem": "a", "answer": None}, {"problem": "b", "answer": "2"},
                                                 {"problem": "c", "answer": ""}, {"problem": "d", "answer": {"x": 1}}])
    with pytest.raises(ValueError, match="train.jsonl:1: 'answer' must be"):
        ev.load_problems(path)  # a benchmark refuses it
    with pytest.raises(ValueError, match="train.jsonl:4: 'answer' must be"):
        ev.load_problems(path, skip_unanswered=True)  # a wrong type is still an error
    path = write_jsonl(tmp_path / "train.jsonl", [{"problem": "a", "answer": None}, {"problem": "b", "answer": "2"},
                                                 {"problem": "c", "answer": ""}])
    assert ev.load_problems(path, skip_unanswered=True) == [{"problem": "b", "answer": "2"}]
    assert "skipped 2 problems without an answer: " in capsys.readouterr().out


# (response as the model wrote it, ground truth, official verdict, strict verdict), worked out by hand
# from the official extraction (THINKLESS.md section 5) and the RL reward's format rules (section 4)
SCORING_CASES = [
    # a box inside the thinking counts for the official scripts; the answer part has none: format error
    ("<think>\nSo x = \\boxed{5}, I think.\n</think>\n\nThe answer is 6.", "5", True, False),
    # the last box wins in both, wherever it is
    ("<think>\n\\boxed{5}\n</think>\n\n\\boxed{6}", "5", False, False),
    ("<short>\\boxed{3} no, \\boxed{4}", "3", False, False),
    # nested braces, and the MATH normaliser: 0.5 -> \frac{1}{2}
    ("<short>\n\\boxed{\\frac{1}{2}}", "0.5", True, True),
    ("<short>\n\\boxed{\\dfrac{3}{4}}.", "3/4", True, True),
    # no box: the last number (thousands separators dropped), which strict never reads
    ("<short>\nThe total is 1,234.", "1234", True, False),
    ("<short>\nIt is 12, not 13", "12", False, False),
    # answer tags come before the last number
    ("<short><answer>7</answer> and then 8", "7", True, False),
    # truncated chains: a closed box in the thinking counts; an unclosed one does not, the last number does
    ("<think>\nLet me compute \\boxed{12}... wait, maybe", "12", True, False),
    ("<think>\nThe sum is 3+4, so \\boxed{", "7", False, False),
    # a short answer, a list of ground truths, a missing control token
    ("<short>\n\\boxed{42}", "42", True, True),
    ("<think>\nhm\n</think>\n\n\\boxed{three}", ["3", "three"], True, True),
    ("\\boxed{42}", "42", True, False),
]


@pytest.mark.parametrize("response, truth, official, strict", SCORING_CASES)
def test_official_and_strict_scores(response, truth, official, strict):
    assert ev.score_official(response, truth) is official
    assert ev.score_strict(response, truth) is strict


def test_official_extraction_and_normaliser():
    extract = official_score.extract_answer
    assert extract("<think>\\boxed{\\frac{a}{b+\\{1\\}}}</think> 3") == "\\frac{a}{b+\\{1\\}}"
    assert extract("x <answer> y=2 </answer> 5") == "y=2" and extract("no digits") is None
    assert extract("-3.5 then 2,000,000") == "2000000" and extract("a -3.5") == "-3.5"
    norm = official_score.strip_string
    assert norm("x = \\dfrac12") == "\\frac{1}{2}" and norm("\\frac1{2}") == "\\frac{1}{2}"
    assert norm("50\\%") == "50" and norm(".5") == "\\frac{1}{2}" and norm("90^\\circ") == "90"
    assert norm("5 \\text{ cm}") == "5" and norm("\\sqrt3") == "\\sqrt{3}" and norm("\\left( 1,2 \\right)") == "(1,2)"
    assert official_score.thinks("<short> <think>") and not official_score.thinks("<short>")


def test_metrics_with_a_scripted_sampler(tmp_path, monkeypatch):
    tok = load_tokenizer(make_word_tokenizer(tmp_path / "tok"))
    ids = control_ids(tok)
    box3, the = tok.token_to_id("\\boxed{3}"), tok.token_to_id("the")
    problems = [{"problem": "what is 1 + 2 ?", "answer": "3", "level": 1},
                {"problem": "what is 2 + 1 ?", "answer": ["3", "three"], "level": 1},
                {"problem": "what is 2 + 2 ?", "answer": "4", "level": 2}]
    script = {  # (seed, problem) -> (tokens, finish reason)
        (0, 0): ([ids.short, box3, ids.eos], "stop"),  # short, correct, 2 tokens
        (0, 1): ([ids.think, the, ids.end_think, box3, ids.eos], "stop"),  # think, correct, 4 tokens
        (0, 2): ([ids.short, box3, ids.eos], "stop"),  # short, wrong, 2 tokens
        (1, 0): ([ids.think, the, box3], "length"),  # think, truncated: format error, 3 tokens (official: correct)
        (1, 1): ([ids.short, box3, ids.eos], "stop"),  # short, correct, 2 tokens
        (1, 2): ([box3, ids.eos], "stop"),  # no control token: format error, 1 token
    }
    calls = []

    def fake_generate(model, prompts, max_new_tokens, **kw):
        calls.append(kw)
        assert prompts == [encode_prompt(tok, p["problem"], instruction=True) for p in problems]
        return [[Completion(*script[kw["seed"], i][:1], [0.0], script[kw["seed"], i][1])] for i in range(3)]

    monkeypatch.setattr(ev, "generate", fake_generate)
    model = torch.nn.Module()
    model.config = type("Config", (), {"vocab_size": 320})()
    out = tmp_path / "out.jsonl"
    m = ev.evaluate(model, tok, problems, samples=2, max_new_tokens=16, out_jsonl=out, compile=True)
    assert [c["seed"] for c in calls] == [0, 1]
    assert all(c["temperature"] == 0.6 and c["top_p"] == 0.95 and c["stop_ids"] == (ids.eos,) and c["n"] == 1
               and c["vocab_size"] == tok.get_vocab_size() and c["compile"] for c in calls)
    # the official tokens: the prompt + every generated token, end of sentence included
    prompt_lens = [len(encode_prompt(tok, p["problem"], instruction=True)) for p in problems]
    response_lens = {(s, i): len(script[s, i][0]) for s in range(2) for i in range(3)}
    official_tokens = [prompt_lens[i] + response_lens[s, i] for s in range(2) for i in range(3)]
    expected = {"samples": 6, "pass@1": 3 / 6, "mean_tokens": 14 / 6, "think_ratio": 2 / 6, "think_acc": 1 / 2,
                "short_acc": 2 / 3, "format_error_rate": 2 / 6, "truncated_rate": 1 / 6,
                "official_pass@1": 4 / 6, "official_tokens": sum(official_tokens) / 6, "official_think_ratio": 2 / 6}
    levels = m.pop("levels")
    assert m == pytest.approx(expected)
    assert levels["1"] == pytest.approx({"samples": 4, "pass@1": 0.75, "mean_tokens": 11 / 4, "think_ratio": 0.5,
                                         "think_acc": 0.5, "short_acc": 1.0, "format_error_rate": 0.25,
                                         "truncated_rate": 0.25, "official_pass@1": 1.0, "official_think_ratio": 0.5,
                                         "official_tokens": sum(official_tokens[i] for i in (0, 1, 3, 4)) / 4})
    assert levels["2"]["pass@1"] == 0 and levels["2"]["think_ratio"] == 0 and levels["2"]["think_acc"] is None
    records = [json.loads(line) for line in open(out)]
    assert [r["reward"] for r in records] == [1.0, 0.5, -1.0, -1.0, 1.0, -1.0]
    assert [r["mode"] for r in records] == ["short", "think", "short", "think", "short", None]
    assert [r["official_correct"] for r in records] == [True, True, False, True, True, False]
    assert [r["official_extracted"] for r in records] == ["3"] * 6
    assert [r["official_tokens"] for r in records] == official_tokens
    assert records[1]["response"].split() == [THINK, "the", "</think>", "\\boxed{3}"]  # control tokens kept, no eos
    table = ev.format_table({"bench": {**m, "levels": levels}})
    assert "bench" in table and "0.5000" in table and "0.6667" in table and "33.3%" in table and "level 2" in table


def test_template_that_prefills_think(tmp_path, monkeypatch):
    """A checkpoint whose template pre-fills <think> (the base R1-Distill model): the prompt is
    rendered by it, and its control token is the response's first token, as a forced mode."""
    tok = load_tokenizer(make_word_tokenizer(tmp_path / "tok"))
    ids = control_ids(tok)
    folder = tmp_path / "ckpt"
    save_tokenizer(tok, folder, chat_template=CHAT_TEMPLATE.replace("<｜Assistant｜>{% endif %}",
                                                                    "<｜Assistant｜><think>{% endif %}"))
    problem = {"problem": "what is 1 + 2 ?", "answer": "3"}
    budgets = []

    def fake_generate(model, prompts, max_new_tokens, **kw):
        assert prompts == [encode_prompt(tok, problem["problem"], instruction=True) + [ids.think]]
        budgets.append(max_new_tokens)
        return [[Completion([ids.end_think, tok.token_to_id("\\boxed{3}"), ids.eos], [0.0] * 3, "stop")]]

    monkeypatch.setattr(ev, "generate", fake_generate)
    model = torch.nn.Module()
    model.config = type("Config", (), {"vocab_size": 320})()
    out = tmp_path / "out.jsonl"
    m = ev.evaluate(model, tok, [problem], samples=1, max_new_tokens=8, template_dir=folder, out_jsonl=out)
    record = json.loads(open(out).read())
    assert budgets == [7] and record["response"].split() == [THINK, "</think>", "\\boxed{3}"]
    assert m["think_ratio"] == 1 and m["pass@1"] == 1 and m["official_pass@1"] == 1 and m["mean_tokens"] == 3
    assert record["official_tokens"] == len(encode_prompt(tok, problem["problem"], instruction=True)) + 1 + 3
    with pytest.raises(ValueError, match="pre-fills '<think>' already"):
        ev.evaluate(model, tok, [problem], force_mode="short", template_dir=folder)


def test_forced_mode_counts_in_the_token_budget(tmp_path, monkeypatch):
    """force_mode puts the control token at the end of the prompt and counts it as a response token."""
    tok = load_tokenizer(make_word_tokenizer(tmp_path / "tok"))
    ids = control_ids(tok)
    problem = {"problem": "what is 1 + 2 ?", "answer": "3"}
    budgets = []

    def fake_generate(model, prompts, max_new_tokens, **kw):
        assert prompts == [encode_prompt(tok, problem["problem"], instruction=True) + [ids.think]]
        budgets.append(max_new_tokens)
        return [[Completion([tok.token_to_id("the")] * max_new_tokens, [0.0] * max_new_tokens, "length")]]

    monkeypatch.setattr(ev, "generate", fake_generate)
    model = torch.nn.Module()
    model.config = type("Config", (), {"vocab_size": 320})()
    m = ev.evaluate(model, tok, [problem], samples=1, max_new_tokens=8, force_mode="think", progress=False)
    assert budgets == [7] and m["mean_tokens"] == 8 and m["think_ratio"] == 1 and m["truncated_rate"] == 1
    with pytest.raises(ValueError, match="max_new_tokens=1: a forced mode needs >= 2"):
        ev.evaluate(model, tok, [problem], max_new_tokens=1, force_mode="short")


def test_cli_end_to_end(tmp_path, capsys):
    ckpt = save_hf_model(make_hf_model("qwen2", vocab_size=320), tmp_path / "ckpt")
    save_tokenizer(load_tokenizer(make_word_tokenizer(tmp_path / "tok")), ckpt)
    data = write_jsonl(tmp_path / "bench.jsonl", [{"problem": "what is 1 + 2 ?", "answer": "3", "level": "Level 1"},
                                                  {"problem": "what is the answer ?", "answer": ["3", "4"],
                                                   "level": "Level 2"},
                                                  {"problem": "please reason", "answer": "2", "level": "Level 1"},
                                                  {"problem": "not used", "answer": "2"}])
    out_dir = tmp_path / "out"
    argv = ["--model", ckpt, "--data", data, "--samples", "2", "--max-new-tokens", "6", "--max-batch", "4",
            "--limit", "3", "--temperature", "1.0", "--top-p", "1.0", "--out-dir"]
    results = ev.main(argv + [str(out_dir)])
    table = capsys.readouterr().out
    assert table.splitlines()[1].split()[:5] == ["benchmark", "samples", "|", "pass@1", "tokens"]
    rows = [line.split() for line in table.splitlines()[3:]]  # name, samples, ...
    assert [r[:2] for r in rows] == [["bench", "6"], ["Level", "1"], ["Level", "2"]]
    assert [r[2] for r in rows[1:]] == ["4", "2"]
    records = [json.loads(line) for line in open(out_dir / "bench.jsonl")]
    assert len(records) == 6 and sorted((r["index"], r["seed"]) for r in records) == [(i, s) for i in range(3)
                                                                                      for s in range(2)]
    tok = load_tokenizer(ckpt)
    vocab = tok.get_vocab()
    for r in records:
        assert r["reward"] == thinkless_reward(r["response"], r["answer"])  # details and reward agree
        assert 1 <= r["tokens"] <= 6 and r["finish_reason"] in ("stop", "length")
        assert EOS not in r["response"] and all(w in vocab for w in r["response"].split())  # no padded rows
    assert all(r["official_correct"] == ev.score_official(r["response"], r["answer"]) for r in records)
    prompt_len = {i: len(encode_prompt(tok, p, instruction=True)) for i, p in
                  enumerate(["what is 1 + 2 ?", "what is the answer ?", "please reason"])}
    assert all(r["official_tokens"] == prompt_len[r["index"]] + r["tokens"] + (r["finish_reason"] == "stop")
               for r in records)
    assert results["bench"]["samples"] == 6 and set(results["bench"]["levels"]) == {"Level 1", "Level 2"}
    summary = json.load(open(out_dir / "summary.json"))
    assert summary["results"] == json.loads(json.dumps(results))
    assert results["bench"]["mean_tokens"] == pytest.approx(sum(r["tokens"] for r in records) / 6)
    # seeded: the same run gives the same generations
    ev.main(argv + [str(tmp_path / "again")])
    again = [json.loads(line) for line in open(tmp_path / "again" / "bench.jsonl")]
    assert [r["response"] for r in again] == [r["response"] for r in records]


def test_cli_bad_data_fails_before_loading_the_model(tmp_path):
    bad = write_jsonl(tmp_path / "bad.jsonl", ['{"problem": "a", "answer": "1"}', '{"problem": "b"}'])
    with pytest.raises(SystemExit, match="^error: .*bad.jsonl:2"):  # one line, no traceback
        ev.main(["--model", str(tmp_path / "missing"), "--data", bad])
    with pytest.raises(SystemExit, match="^error: .*no-such.jsonl: No such file"):
        ev.main(["--model", str(tmp_path / "missing"), "--data", str(tmp_path / "no-such.jsonl")])
    good = write_jsonl(tmp_path / "good.jsonl", ['{"problem": "a", "answer": "1"}'])
    os.makedirs(tmp_path / "empty")  # a folder that is not a checkpoint
    with pytest.raises(SystemExit, match="^error: .*empty/config.json: no config.json"):
        ev.main(["--model", str(tmp_path / "empty"), "--data", good])


def test_help_shows_the_costly_defaults(capsys):
    """5 samples of up to 32,768 tokens: hours on a CPU if forgotten, so --help says them."""
    with pytest.raises(SystemExit):
        ev.main(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    for shown in ("default 5", "default 32768", "default 0.6", "default 0.95", "default eval_out"):
        assert shown in text, shown
    from conftest import ROOT

    assert "/eval_out/" in open(f"{ROOT}/.gitignore").read().split()  # its default output stays out of git


def test_mode_probabilities_are_the_first_token_softmax(tmp_path):
    """The exact probe (study.py's p(<think>)): equal to softmax(logits / T) over the tokenizer's ids
    at the prompt's last position, computed here by transformers one prompt at a time, for prompts of
    several lengths (mode_probabilities right-pads them) over two batches."""
    transformers = pytest.importorskip("transformers")
    import toy
    from model import Transformer

    tok = toy.build_tokenizer()
    folder = tmp_path / "toy"
    torch.manual_seed(0)
    model = Transformer(toy.toy_model_config(tok.get_vocab_size()))
    problems = [{"problem": " ".join(f"{x}={i % 10}" for i, x in enumerate("abcdefghij"[:n])), "answer": "0"}
                for n in (1, 6, 3, 10, 2)]
    think, short = tok.token_to_id(toy.THINK), tok.token_to_id(toy.SHORT)
    with torch.no_grad():  # the control rows along a prompt's last hidden state: far from the uniform 1/64
        ids = tok.encode(toy.prompt_text(problems[1]["problem"]), add_special_tokens=False).ids
        h = model(torch.tensor([ids]), head=lambda x, w: x[0, -1])  # (H,)
        model.lm_head.weight[think] = 2.0 * h / h.norm() ** 2
        model.lm_head.weight[short] = 1.5 * h / h.norm() ** 2 + 0.1 * torch.randn_like(h)
    model.save_pretrained(folder)
    temperature = 0.6
    got = ev.mode_probabilities(Transformer.from_pretrained(folder).eval(), tok, problems, temperature,
                                instruction=False, batch=3)
    hf = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    real_ids = max(tok.get_vocab(with_added_tokens=True).values()) + 1  # the padded rows are never sampled
    expected = []
    for p in problems:
        ids = tok.encode(toy.prompt_text(p["problem"]), add_special_tokens=False).ids
        with torch.no_grad():
            logits = hf(torch.tensor([ids])).logits[0, -1, :real_ids].double()  # (V_real,)
        probs = torch.softmax(logits / temperature, dim=-1)
        expected.append((probs[think].item(), probs[short].item()))
    assert len({len(p["problem"]) for p in problems}) == len(problems)  # every prompt a different length
    assert max(p for pair in expected for p in pair) > 0.05  # not the near-uniform 1/64 of a random head
    torch.testing.assert_close(torch.tensor(got, dtype=torch.float64), torch.tensor(expected, dtype=torch.float64),
                               rtol=1e-4, atol=1e-6)
    with pytest.raises(ValueError, match="temperature"):
        ev.mode_probabilities(model, tok, problems, temperature=0)
