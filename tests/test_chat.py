"""chat.py: the prompt format and the control tokens, on the real R1-Distill tokenizer (when present)
and on small tokenizers built here; transformers loads what save_tokenizer writes."""

import json
import os

import pytest
from conftest import BASE_MODEL_DIR
from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers

from chat import (ASSISTANT, BOS, EOS, INSTRUCTION, SHORT, THINK, USER, control_ids, decode_response, encode_prompt,
                  load_tokenizer, render_prompt, save_tokenizer)

REAL = os.path.isfile(os.path.join(BASE_MODEL_DIR, "tokenizer.json"))
needs_real = pytest.mark.skipif(not REAL, reason=f"no tokenizer.json in {BASE_MODEL_DIR}")
WORDS = ["what", "is", "1", "+", "2", "?", "the", "answer", "\\boxed{3}", "please", "reason"]


def make_word_tokenizer(path, added=(BOS, EOS, USER, ASSISTANT, THINK, "</think>", "<|quad_start|>"), special=()):
    """A word-level tokenizer with the R1 added tokens (as the toy task builds), saved to path/tokenizer.json."""
    vocab = {"[UNK]": 0, **{w: i + 1 for i, w in enumerate(WORDS)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.add_tokens([AddedToken(t, special=t in special, normalized=False) for t in added])
    os.makedirs(path, exist_ok=True)
    tok.save(os.path.join(path, "tokenizer.json"))
    return str(path)


def test_render_prompt():
    assert render_prompt("What is 1+2?") == "<｜begin▁of▁sentence｜><｜User｜>What is 1+2?<｜Assistant｜>"
    assert render_prompt("Q", instruction=True) == (
        "<｜begin▁of▁sentence｜><｜User｜>Please reason step by step, and put your final answer within "
        "\\boxed{}.\nQ<｜Assistant｜>")
    assert not render_prompt("Q").endswith("<think>\n")  # the model chooses the mode


@needs_real
def test_real_tokenizer_control_tokens():
    tok = load_tokenizer(BASE_MODEL_DIR)
    ids = control_ids(tok)
    assert (ids.think, ids.end_think, ids.short, ids.eos) == (151648, 151649, 151650, 151643)
    assert tok.token_to_id("<|quad_start|>") is None  # renamed, not duplicated
    assert tok.get_vocab_size() == 151665  # no new row
    prompt = encode_prompt(tok, "What is 1+2?", instruction=True)
    assert prompt[:2] == [151646, 151644] and prompt[-1] == 151645 and prompt.count(151646) == 1
    assert tok.decode(prompt, skip_special_tokens=False) == render_prompt("What is 1+2?", instruction=True)
    # control tokens survive decoding, with or without skip_special_tokens; the eos does not
    response = "<think>\nEasy.\n</think>\n\nSo \\boxed{3}."
    ids_ = tok.encode(response, add_special_tokens=False).ids + [151643]
    assert ids_[0] == 151648
    assert decode_response(tok, ids_) == response == tok.decode(ids_, skip_special_tokens=True)
    short = tok.encode("<short>\n\\boxed{3}", add_special_tokens=False).ids
    assert short[0] == 151650 and tok.decode(short, skip_special_tokens=True) == "<short>\n\\boxed{3}"


@needs_real
def test_real_tokenizer_saved_loads_in_transformers(tmp_path):
    transformers = pytest.importorskip("transformers")
    tok = load_tokenizer(BASE_MODEL_DIR)
    save_tokenizer(tok, tmp_path)
    assert control_ids(load_tokenizer(tmp_path)) == control_ids(tok)  # the saved folder loads again
    hf = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    messages = [{"role": "user", "content": INSTRUCTION + "What is 1+2?"}]
    text = hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert text == render_prompt("What is 1+2?", instruction=True)
    assert hf(text, add_special_tokens=False)["input_ids"] == encode_prompt(tok, "What is 1+2?", instruction=True)
    assert hf.convert_tokens_to_ids(SHORT) == 151650 and hf.eos_token == EOS
    assert hf.decode([151650, 18, 151643], skip_special_tokens=True) == "<short>3"


def test_word_tokenizer_quad_start_is_renamed(tmp_path):
    tok = load_tokenizer(make_word_tokenizer(tmp_path, special=("<|quad_start|>", THINK, EOS)))
    ids = control_ids(tok)
    assert ids.short == len(WORDS) + 1 + 6  # the id of <|quad_start|>: the 7th added token
    prompt = encode_prompt(tok, "what is 1 + 2 ?")
    assert tok.decode(prompt, skip_special_tokens=False).split() == [BOS, USER, "what", "is", "1", "+", "2", "?",
                                                                      ASSISTANT]
    response = [ids.think, tok.token_to_id("the"), ids.end_think, ids.short, ids.eos]
    assert decode_response(tok, response).split() == [THINK, "the", "</think>", SHORT]
    assert tok.decode(response, skip_special_tokens=True).split() == [THINK, "the", "</think>", SHORT]


def test_word_tokenizer_without_short_gets_one_with_a_warning(tmp_path):
    path = make_word_tokenizer(tmp_path, added=(BOS, EOS, USER, ASSISTANT, THINK, "</think>"))
    with pytest.warns(UserWarning, match="embedding"):
        tok = load_tokenizer(path)
    assert control_ids(tok).short == len(WORDS) + 1 + 6
    assert tok.encode(SHORT, add_special_tokens=False).ids == [control_ids(tok).short]
    save_tokenizer(tok, tmp_path / "saved")  # saved with <short>: loads again without a warning
    with open(tmp_path / "saved" / "tokenizer.json") as f:
        assert SHORT in [t["content"] for t in json.load(f)["added_tokens"]]


def test_control_token_that_is_not_one_token_is_refused(tmp_path):
    # <think> missing from the added tokens: the word level model maps it to [UNK]
    path = make_word_tokenizer(tmp_path, added=(BOS, EOS, USER, ASSISTANT, "</think>", "<|quad_start|>"))
    with pytest.raises(ValueError, match="<think>"):
        load_tokenizer(path)


def test_byte_level_bpe_splits_a_missing_control_token(tmp_path):
    # a real BPE splits "<think>" into several pieces when it is not an added token
    tok = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate("<>/thinkTHINK")}, merges=[]))
    tok.add_tokens([AddedToken(t, normalized=False) for t in (BOS, EOS, USER, ASSISTANT, "</think>", SHORT)])
    tok.save(str(tmp_path / "tokenizer.json"))
    with pytest.raises(ValueError, match="encodes to .*expected exactly one id"):
        load_tokenizer(tmp_path)


def test_missing_files_and_tokens(tmp_path):
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        load_tokenizer(tmp_path)
    tok = load_tokenizer(make_word_tokenizer(tmp_path / "a"))
    bare = Tokenizer(models.WordLevel({"[UNK]": 0}, unk_token="[UNK]"))
    with pytest.raises(ValueError, match="eos"):
        control_ids(bare)
    path = make_word_tokenizer(tmp_path / "b", added=(BOS, USER, ASSISTANT, THINK, "</think>", "<|quad_start|>"))
    with pytest.raises(ValueError, match="eos"):
        load_tokenizer(path)
    assert control_ids(tok).eos == tok.token_to_id(EOS)
