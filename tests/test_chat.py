"""chat.py: the prompt format and the control tokens, on the real R1-Distill tokenizer (when present)
and on small tokenizers built here; transformers loads what save_tokenizer writes."""

import json
import os

import pytest
from conftest import BASE_MODEL_DIR
from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers

from chat import (ASSISTANT, BOS, CHAT_TEMPLATE, EOS, INSTRUCTION, SHORT, THINK, USER, apply_chat_template, chat_template,
                  control_ids, decode_response, encode_prompt, load_tokenizer, prefilled_mode, render_prompt,
                  save_tokenizer)

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


# -----------------------------------------------------------------------------
# apply_chat_template against transformers' apply_chat_template(tokenize=False)

R1_PREFILL = "{{'<｜Assistant｜><think>\\n'}}"  # the generation prompt of R1's template, as written in its JSON


def template_folder(path, template, bos=BOS, eos=EOS):
    """The real R1-Distill tokenizer.json with a tokenizer_config.json carrying `template`."""
    with open(os.path.join(BASE_MODEL_DIR, "tokenizer_config.json"), encoding="utf-8") as f:
        config = json.load(f)
    config.update(chat_template=template, bos_token=bos, eos_token=eos)
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "tokenizer_config.json"), "w", encoding="utf-8") as f:
        json.dump(config, f, ensure_ascii=False)
    with open(os.path.join(BASE_MODEL_DIR, "tokenizer.json"), "rb") as src, open(path / "tokenizer.json", "wb") as dst:
        dst.write(src.read())
    return path


def r1_template():
    with open(os.path.join(BASE_MODEL_DIR, "tokenizer_config.json"), encoding="utf-8") as f:
        template = json.load(f)["chat_template"]
    assert template.endswith(R1_PREFILL + "{% endif %}")  # the real template is what this file expects
    return template


CONVERSATIONS = [
    [{"role": "user", "content": INSTRUCTION + "What is $1+2$?"}],
    [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Q1"},
     {"role": "assistant", "content": "<think>\nhm\n</think>\n\nA1"}, {"role": "user", "content": "Q2"}],
]


def assert_same_as_transformers(folder, conversations=CONVERSATIONS):
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoTokenizer.from_pretrained(str(folder))
    for messages in conversations:
        for gen in (True, False):
            expected = hf.apply_chat_template(messages, add_generation_prompt=gen, tokenize=False)
            assert apply_chat_template(folder, messages, add_generation_prompt=gen) == expected, (messages, gen)


@needs_real
def test_r1_distill_template_equals_transformers():
    assert_same_as_transformers(BASE_MODEL_DIR)
    prompt = apply_chat_template(BASE_MODEL_DIR, [{"role": "user", "content": "Q"}])
    assert prompt == f"{BOS}{USER}Q{ASSISTANT}<think>\n" and prefilled_mode(BASE_MODEL_DIR) == "<think>\n"


@needs_real
def test_official_sft_template_equals_transformers(tmp_path):
    """The official SFT repository's template: R1's, with the generation prompt `<｜Assistant｜>\\n`
    (no <think>, a newline kept), while a training conversation has no newline after <｜Assistant｜>."""
    folder = template_folder(tmp_path, r1_template().replace(R1_PREFILL, "{{'<｜Assistant｜>\\n'}}"))
    assert_same_as_transformers(folder)
    assert apply_chat_template(folder, [{"role": "user", "content": "Q"}]) == f"{BOS}{USER}Q{ASSISTANT}\n"
    assert prefilled_mode(folder) is None
    tok = load_tokenizer(folder)
    assert encode_prompt(tok, "Q", template_dir=folder)[-2:] == [151645, 198]  # <｜Assistant｜> "\n"


@needs_real
def test_template_with_system_message_and_jinja_helpers(tmp_path):
    """A Qwen-style template: system message, loop controls, raise_exception, tojson (no HTML escaping),
    and special tokens written as AddedToken dicts in tokenizer_config.json."""
    template = (
        "{% for m in messages %}{% if m['role'] not in ['system', 'user', 'assistant'] %}"
        "{{ raise_exception('unknown role ' + m['role']) }}{% endif %}"
        "{% if loop.first and m['role'] != 'system' %}<|im_start|>system\nDefault <&>.<|im_end|>\n{% endif %}\n"
        "  <|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
        "{% if m['role'] == 'assistant' %}{% continue %}{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant {{ {'eos': eos_token} | tojson }}\n{% endif %}")
    dict_token = {"__type": "AddedToken", "content": EOS, "lstrip": False, "normalized": True, "rstrip": False,
                  "single_word": False, "special": True}
    folder = template_folder(tmp_path, template, eos=dict_token)
    assert_same_as_transformers(folder)
    assert EOS in apply_chat_template(folder, CONVERSATIONS[0]) and "<&>" in apply_chat_template(folder, CONVERSATIONS[0])
    with pytest.raises(ValueError, match="unknown role tool"):
        apply_chat_template(folder, [{"role": "tool", "content": "x"}])


def test_folder_without_template_gets_our_format(tmp_path):
    tok = load_tokenizer(make_word_tokenizer(tmp_path / "bare"))  # tokenizer.json only
    assert apply_chat_template(tmp_path / "bare", [{"role": "user", "content": "Q"}]) == render_prompt("Q")
    assert encode_prompt(tok, "what is 1 + 2 ?", True, template_dir=tmp_path / "bare") == encode_prompt(
        tok, "what is 1 + 2 ?", True)
    # what a checkpoint of ours carries renders exactly the prompt its training used
    save_tokenizer(tok, tmp_path / "ours")
    for q in ("what is 1 + 2 ?", "Q\nwith {braces} and {% raw %}"):
        assert apply_chat_template(tmp_path / "ours", [{"role": "user", "content": q}]) == render_prompt(q)
    assert chat_template(tmp_path / "ours") == CHAT_TEMPLATE and prefilled_mode(tmp_path / "ours") is None
    # a template that pre-fills <short> is seen as such too; a broken one is named
    save_tokenizer(tok, tmp_path / "short", chat_template=CHAT_TEMPLATE.replace("<｜Assistant｜>{% endif %}",
                                                                                 "<｜Assistant｜><short>{% endif %}"))
    assert prefilled_mode(tmp_path / "short") == SHORT
    save_tokenizer(tok, tmp_path / "broken", chat_template="{% if %}")
    with pytest.raises(ValueError, match="broken.*chat_template line 1"):
        apply_chat_template(tmp_path / "broken", [])
