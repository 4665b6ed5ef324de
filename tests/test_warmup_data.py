"""warmup_data.py: what is kept and why (scripted sampler on tiny checkpoints), the length count
against the student's tokenizer as train.py builds and counts it (chat.load_tokenizer), the CLI end to
end through the real sampler on two tiny random experts, and bad input."""

import json
import os

import pytest
from conftest import BASE_MODEL_DIR, SHARED, make_hf_model, save_hf_model
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

import warmup_data as wd
from chat import ASSISTANT, BOS, END_THINK, EOS, INSTRUCTION, THINK, USER, encode_prompt, load_tokenizer
from rewards import reward_details
from sampler import Completion
from sft import read_sft_jsonl

IM_START, IM_END, ENDOFTEXT = "<|im_start|>", "<|im_end|>", "<|endoftext|>"
REAL = os.path.isfile(os.path.join(BASE_MODEL_DIR, "tokenizer.json"))
needs_real = pytest.mark.skipif(not REAL, reason=f"no tokenizer.json in {BASE_MODEL_DIR}")
MATH_TRAIN = os.path.join(SHARED, "data", "math_train.jsonl")


def byte_tokenizer(folder, added):
    """A byte-level BPE without merges (every text round-trips, one token per byte) plus added tokens,
    saved as folder/tokenizer.json: the shape of the Qwen tokenizers, at 256 + len(added) ids."""
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tok = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(alphabet)}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in added if t in (THINK, END_THINK)])
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False)
                            for t in added if t not in (THINK, END_THINK)])
    os.makedirs(folder, exist_ok=True)
    tok.save(os.path.join(folder, "tokenizer.json"))
    return tok


def experts(tmp_path):
    """Two tiny random checkpoints with R1-style and ChatML tokenizers: (think dir, short dir)."""
    think_dir = save_hf_model(make_hf_model("qwen2", vocab_size=320, seed=0), tmp_path / "think")
    short_dir = save_hf_model(make_hf_model("qwen3", vocab_size=320, seed=1), tmp_path / "short")
    byte_tokenizer(think_dir, [BOS, EOS, USER, ASSISTANT, THINK, END_THINK, "<|quad_start|>"])
    byte_tokenizer(short_dir, [ENDOFTEXT, IM_START, IM_END])
    return think_dir, short_dir


def write_lines(path, rows):
    with open(path, "w", encoding="utf-8") as f:
        f.write("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return str(path)


def student_length(student, question, response):
    """The sequence length train.py computes for an SFT example (and compares with its max_len)."""
    return len(encode_prompt(student, question)) + len(student.encode(response, add_special_tokens=False).ids) + 1


def test_scripted_experts_exactly_what_is_kept(tmp_path, monkeypatch, capsys):
    think_dir, short_dir = experts(tmp_path)
    think_tok = Tokenizer.from_file(os.path.join(think_dir, "tokenizer.json"))
    short_tok = Tokenizer.from_file(os.path.join(short_dir, "tokenizer.json"))
    student = load_tokenizer(think_dir)  # what train.py trains with: <|quad_start|> renamed <short>
    max_len = 150
    good_think, good_short = "Add them.\n</think>\n\nSo $1+1=\\boxed{2}$.", "1 + 1 = \\boxed{2} ≈ two"

    def padded(q):  # a valid chain whose student sequence is exactly max_len tokens
        base = student_length(student, q, f"{THINK}\n{good_think}")
        return "x" * (max_len - base) + good_think

    # question -> ((think text, finish reason), (short text, finish reason))
    script = {
        "valid pair": ((good_think, "stop"), (good_short, "stop")),
        "no end of chain": (("Add them, \\boxed{2}", "stop"), (good_short, "stop")),
        "box only in the chain": (("\\boxed{2}? </think>\n\nIt is two.", "stop"), (good_short, "stop")),
        "short without box": ((good_think, "stop"), ("It is 2.", "stop")),
        "think truncated": ((good_think, "length"), (good_short, "stop")),
        "short truncated": ((good_think, "stop"), (good_short, "length")),
        "exactly max-len": ((padded("exactly max-len"), "stop"), (good_short, "stop")),
        "one over max-len": (("x" + padded("one over max-len"), "stop"), (good_short, "stop")),
        "short over max-len": ((good_think, "stop"), (good_short + "y" * max_len, "stop")),
    }
    questions = list(script)
    prompts = write_lines(tmp_path / "p.jsonl", [{"problem": q, "answer": None} for q in questions] + [""])
    calls = []

    def fake_generate(model, prompts, max_new_tokens, **kw):
        think = kw["stop_ids"] == [think_tok.token_to_id(EOS)]
        tok, template, side = (think_tok, wd.THINK_TEMPLATE, 0) if think else (short_tok, wd.SHORT_TEMPLATE, 1)
        calls.append(("think" if think else "short", max_new_tokens, kw))
        rendered = [template.replace("{question}", q) for q in questions]  # the strings: test_templates
        assert [tok.decode(p, skip_special_tokens=False) for p in prompts] == rendered
        out = []
        for i, q in enumerate(questions):
            text, reason = script[q][side]
            ids = tok.encode(text, add_special_tokens=False).ids
            # stopped rows end on a stop id; the short expert's two stop tokens both count
            ids += [kw["stop_ids"][i % len(kw["stop_ids"])]] if reason == "stop" else []
            out.append([Completion(ids, [0.0] * len(ids), reason)])
        return out

    monkeypatch.setattr(wd, "generate", fake_generate)
    out = tmp_path / "pairs.jsonl"
    counts = wd.main(["--prompts", prompts, "--think-model", think_dir, "--short-model", short_dir, "--out", str(out),
                      "--max-len", str(max_len), "--max-new-tokens", "77", "--max-batch", "3"])

    # one call per expert, with each expert's own stop ids and real vocabulary
    assert [c[0] for c in calls] == ["think", "short"] and all(c[1] == 77 for c in calls)
    assert calls[1][2]["stop_ids"] == [short_tok.token_to_id(IM_END), short_tok.token_to_id(ENDOFTEXT)]
    assert [c[2]["vocab_size"] for c in calls] == [think_tok.get_vocab_size(), short_tok.get_vocab_size()]
    assert all(c[2]["max_batch"] == 3 and c[2]["temperature"] == 0.6 and c[2]["top_p"] == 0.95 for c in calls)

    assert dict(counts) == {"kept": 2, "dropped": 7, "think without </think>": 1,
                            "think without \\boxed{} after </think>": 1, "short without \\boxed{}": 1,
                            "think truncated": 1, "short truncated": 1, "over --max-len": 2}
    expected = []
    for q in ("valid pair", "exactly max-len"):
        expected += [(q, f"{THINK}\n{script[q][0][0]}"), (q, f"<short>\n{script[q][1][0]}")]
    assert read_sft_jsonl(out) == expected
    assert not os.path.exists(f"{out}.tmp")
    for q, r in expected:  # the format the RL reward checks; the length train.py checks
        assert reward_details(r, "2").format_ok and reward_details(r, "2").correct
        assert EOS not in r and IM_END not in r and ENDOFTEXT not in r
        assert student_length(student, q, r) <= max_len
    assert student_length(student, "exactly max-len", expected[2][1]) == max_len
    assert student_length(student, "one over max-len", "<think>\nx" + padded("one over max-len")) == max_len + 1
    printed = capsys.readouterr().out
    assert "9 prompts: 2 kept (4 records" in printed and "7 dropped" in printed and "over --max-len 2" in printed


def test_every_drop_reason_of_a_prompt_is_counted(tmp_path):
    """A prompt whose two responses are both truncated, unclosed and unboxed counts under each reason."""
    student = byte_tokenizer(tmp_path, [BOS, EOS, USER, ASSISTANT, THINK, END_THINK])
    questions = ["q1", "q2"]
    think = [("I start to think and", "length"), ("Fine.\n</think>\n\n\\boxed{2}", "stop")]
    short = [("It is", "length"), ("\\boxed{2}", "stop")]
    records, counts = wd.build_pairs(questions, think, short, student, max_len=10)
    assert len(records) == 0
    assert dict(counts) == {"dropped": 2, "think truncated": 1, "think without </think>": 1,
                            "think without \\boxed{} after </think>": 1, "short truncated": 1,
                            "short without \\boxed{}": 1, "over --max-len": 2}


@needs_real
def test_length_count_matches_the_real_student_tokenizer():
    """The count (reasoning expert's tokenizer, control token as 1) equals the count with the student's
    tokenizer as chat.load_tokenizer builds it from the real R1-Distill tokenizer."""
    expert = Tokenizer.from_file(os.path.join(BASE_MODEL_DIR, "tokenizer.json"))
    student = load_tokenizer(BASE_MODEL_DIR)
    q = "Find $x$ if $\\frac{x}{5} + \\frac{1}{5x} = \\frac{1}{2}$. Ünïcode: 平方根"
    think = "Okay, so 2x^2 - 5x + 2 = 0.\n</think>\n\nThe largest value is $\\boxed{2}$."
    short = " To solve, multiply by 10x:\n$$2x^2+2=5x$$ so x = 2 or 1/2. \\boxed{2}"
    n = max(student_length(student, q, f"{THINK}\n{think}"), student_length(student, q, f"<short>\n{short}"))
    for max_len, kept in ((n, 1), (n - 1, 0)):
        records, counts = wd.build_pairs([q], [(think, "stop")], [(short, "stop")], expert, max_len)
        assert counts["kept"] == kept and len(records) == 2 * kept


def test_random_experts_end_to_end(tmp_path, capsys):
    """The real sampler on two random experts: junk, so every pair is dropped; the counts add up."""
    think_dir, short_dir = experts(tmp_path)
    prompts = write_lines(tmp_path / "p.jsonl", [{"problem": f"what is {i} + {i} ?"} for i in range(4)])
    out = tmp_path / "pairs.jsonl"
    # 8 new tokens cannot hold </think> plus a box (10 tokens at one per byte): nothing can be kept
    counts = wd.main(["--prompts", prompts, "--think-model", think_dir, "--short-model", short_dir, "--out", str(out),
                      "--max-new-tokens", "8", "--max-batch", "2", "--limit", "3", "--temperature", "1.0"])
    assert counts["dropped"] == 3 and counts["kept"] == 0
    assert set(counts) <= set(wd.DROP_REASONS) | {"dropped"}
    assert os.path.getsize(out) == 0
    err = capsys.readouterr().err
    assert "think expert: 3 prompts" in err and "short expert: 3 prompts" in err and "is empty" in err


def test_experts_given_as_hub_ids(tmp_path, monkeypatch):
    """No such local folders: both experts are fetched with huggingface_hub.snapshot_download (replaced
    here: no network), called with each id."""
    import huggingface_hub

    think_dir, short_dir = experts(tmp_path)
    folders, calls = {"someone/r1-like": think_dir, "someone/chatml-like": short_dir}, []
    monkeypatch.setattr(huggingface_hub, "snapshot_download", lambda repo_id, **kw: calls.append(repo_id) or folders[repo_id])
    monkeypatch.chdir(tmp_path)
    prompts = write_lines(tmp_path / "p.jsonl", [{"problem": "what is 1 + 1 ?"}])
    counts = wd.main(["--prompts", prompts, "--think-model", "someone/r1-like", "--short-model", "someone/chatml-like",
                      "--out", str(tmp_path / "pairs.jsonl"), "--max-new-tokens", "4"])
    assert sorted(set(calls)) == ["someone/chatml-like", "someone/r1-like"] and counts["dropped"] == 1


def test_bad_input(tmp_path, monkeypatch):
    """Every mistake is one `error:` line naming the file (SystemExit), found before a model is loaded."""
    think_dir, short_dir, out = tmp_path / "missing-think", tmp_path / "missing-short", tmp_path / "o.jsonl"
    base = ["--think-model", str(think_dir), "--short-model", str(short_dir), "--out", str(out)]
    cases = [(['{"problem": "a"}', "{not json"], "bad.jsonl:2: not valid JSON"),
             (['{"problem": "a"}', "", '{"answer": "1"}'], "bad.jsonl:3: expected an object with a non-empty string"),
             (['{"problem": 5}'], "bad.jsonl:1: expected"),
             (['["a"]'], "bad.jsonl:1: expected"),
             (['{"problem": "  "}'], "bad.jsonl:1: expected"),
             ([""], "bad.jsonl: no prompts")]
    for lines, message in cases:
        bad = write_lines(tmp_path / "bad.jsonl", lines)
        with pytest.raises(SystemExit, match="error: .*" + message):
            wd.main(["--prompts", bad] + base)
    good = write_lines(tmp_path / "good.jsonl", [{"problem": "a"}])
    with pytest.raises(SystemExit, match="error: .*no-such-folder"):
        wd.main(["--prompts", good] + base[:-1] + [str(tmp_path / "no-such-folder" / "o.jsonl")])
    with pytest.raises(SystemExit, match="error: .*missing-think"):
        wd.main(["--prompts", good] + base)
    # experts swapped: the ChatML tokenizer has no R1 end-of-sentence
    think_dir, short_dir = experts(tmp_path)
    with pytest.raises(SystemExit, match="error: .*none of the stop tokens"):
        wd.main(["--prompts", good, "--think-model", short_dir, "--short-model", think_dir, "--out", str(out)])
    assert not os.path.exists(out)
    os.remove(os.path.join(short_dir, "config.json"))  # found before the first expert runs, not after
    monkeypatch.setattr(wd, "generate", lambda *a, **k: pytest.fail("generated before checking the input"))
    with pytest.raises(SystemExit, match="error: .*short: no config.json"):
        wd.main(["--prompts", good, "--think-model", think_dir, "--short-model", short_dir, "--out", str(out)])


@pytest.mark.skipif(not os.path.isfile(MATH_TRAIN), reason=f"no {MATH_TRAIN}")
def test_math_train_prompts_load():
    """The shared training file: 7,474 problems, 2 of them with "answer": null (prompts need no answer)."""
    questions = wd.load_prompts(MATH_TRAIN)
    assert len(questions) == 7474 and all(isinstance(q, str) and q for q in questions)


@needs_real
def test_templates():
    """The R1 prompt is what the real R1-Distill chat template renders (transformers, add_generation_prompt);
    the ChatML prompt is Qwen2.5's format with the instruction as the system message."""
    import transformers

    q = "What is $\\{1, 2\\}$?"
    hf = transformers.AutoTokenizer.from_pretrained(BASE_MODEL_DIR)
    rendered = hf.apply_chat_template([{"role": "user", "content": INSTRUCTION + q}], tokenize=False,
                                      add_generation_prompt=True)
    assert rendered.endswith("<｜Assistant｜><think>\n")
    assert wd.THINK_TEMPLATE.replace("{question}", q) == rendered
    assert wd.SHORT_TEMPLATE.replace("{question}", q) == (
        "<|im_start|>system\nPlease reason step by step, and put your final answer within \\boxed{}.<|im_end|>\n"
        "<|im_start|>user\nWhat is $\\{1, 2\\}$?<|im_end|>\n<|im_start|>assistant\n")
