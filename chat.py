"""The prompt format and the control tokens (THINKLESS.md, section 2).

Prompt: the DeepSeek-R1-Distill template WITHOUT the trailing `<think>\\n` that the original template
appends, so that the model's first generated token is its own choice of mode:

    <｜begin▁of▁sentence｜><｜User｜>{question}<｜Assistant｜>          -> model writes <think> or <short> ...

Control tokens: `<think>` and `</think>` are added tokens of the R1-Distill tokenizer already. `<short>`
is not; the official recipe renames the unused added token `<|quad_start|>` (id 151650) to `<short>`,
so it is ONE token with an existing embedding row. The loss treats response position 0 as the mode
decision, so a control token that splits into several ids silently breaks the method: load_tokenizer
refuses to go on unless each of the three encodes to exactly one id. All three are made non-special,
so that they survive decode(skip_special_tokens=True); decode_response keeps them in any case.

The tokenizer is a plain `tokenizers.Tokenizer` (what transformers' fast tokenizers wrap);
save_tokenizer writes tokenizer.json plus a tokenizer_config.json carrying this chat template, so a
checkpoint folder loads in transformers / vLLM with the same prompt format.
"""

import json
import os
import warnings
from dataclasses import dataclass

from tokenizers import AddedToken, Tokenizer

BOS, EOS = "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>"
USER, ASSISTANT = "<｜User｜>", "<｜Assistant｜>"
THINK, END_THINK, SHORT = "<think>", "</think>", "<short>"
UNUSED_FOR_SHORT = "<|quad_start|>"  # the official recipe's donor token for <short>
INSTRUCTION = "Please reason step by step, and put your final answer within \\boxed{}.\n"

# The same format as a Jinja chat template, for transformers' apply_chat_template and vLLM.
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}"
    "{% if m['role'] == 'user' %}<｜User｜>{{ m['content'] }}"
    "{% elif m['role'] == 'assistant' %}<｜Assistant｜>{{ m['content'] }}<｜end▁of▁sentence｜>{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}<｜Assistant｜>{% endif %}"
)


@dataclass(frozen=True)
class ControlIds:
    think: int
    end_think: int
    short: int
    eos: int


def resolve_model(name) -> str:
    """The checkpoint folder for --model NAME: the local folder NAME when there is one, else the Hugging
    Face Hub repository NAME (e.g. deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B), whose config, safetensors
    and tokenizer files huggingface_hub.snapshot_download fetches into its cache (once: a later call
    finds them there) and whose cached folder it returns."""
    name = str(name)
    if os.path.isdir(name):
        return name
    if name.startswith((".", "/", "~")) or name.count("/") > 1:  # a path, not an id of the form owner/name
        raise FileNotFoundError(f"{name}: no such checkpoint folder")
    import huggingface_hub  # only here: a run from local folders never imports it

    try:
        return huggingface_hub.snapshot_download(name, allow_patterns=["*.json", "*.safetensors"])
    except (OSError, ValueError) as e:  # offline, no such repository, a gated one, not a valid id
        raise FileNotFoundError(f"{name}: no such local folder, and fetching it from the Hugging Face Hub "
                                f"failed ({type(e).__name__}: {' '.join(str(e).split())[:400]})") from None


def load_tokenizer(model_dir) -> Tokenizer:
    """model_dir/tokenizer.json with `<short>` set up and the control tokens checked (one id each)."""
    path = os.path.join(model_dir, "tokenizer.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no tokenizer.json (expected a Hugging Face tokenizer file)")
    with open(path, encoding="utf-8") as f:
        spec = json.load(f)
    added = {t["content"]: t for t in spec.get("added_tokens", [])}
    if SHORT not in added and UNUSED_FOR_SHORT in added:
        added[UNUSED_FOR_SHORT]["content"] = SHORT  # same id, same embedding row: nothing to resize
        added[SHORT] = added.pop(UNUSED_FOR_SHORT)
    for name in (THINK, END_THINK, SHORT):
        if name in added:
            added[name]["special"] = False  # kept by decode(skip_special_tokens=True)
    tok = Tokenizer.from_str(json.dumps(spec))
    if SHORT not in added:
        tok.add_tokens([AddedToken(SHORT, special=False, normalized=False)])
        warnings.warn(f"{path}: neither {SHORT} nor {UNUSED_FOR_SHORT} found; added {SHORT} as id "
                      f"{tok.token_to_id(SHORT)}: the model's embedding and lm_head must have a row for it "
                      f"(grow them if vocab_size <= that id), and that row starts untrained")
    for name in (THINK, END_THINK, SHORT):
        ids = tok.encode(name, add_special_tokens=False).ids
        if len(ids) != 1 or ids[0] != tok.token_to_id(name):
            raise ValueError(f"{path}: control token {name!r} encodes to {ids}, expected exactly one id; "
                             f"Thinkless reads the mode from the first response token")
    control_ids(tok)  # fails early when the end-of-sentence token is missing
    return tok


def control_ids(tokenizer: Tokenizer) -> ControlIds:
    ids = {name: tokenizer.token_to_id(tok) for name, tok in
           (("think", THINK), ("end_think", END_THINK), ("short", SHORT), ("eos", EOS))}
    missing = [name for name, i in ids.items() if i is None]
    if missing:
        raise ValueError(f"tokenizer has no token for {missing} (expected {THINK}, {END_THINK}, {SHORT}, {EOS})")
    return ControlIds(**ids)


def render_prompt(question: str, instruction: bool = False) -> str:
    """The R1-Distill prompt without the trailing <think>: the model picks the mode itself."""
    if instruction:  # evaluation prompts carry the instruction; RL uses the raw question
        question = INSTRUCTION + question
    return f"{BOS}{USER}{question}{ASSISTANT}"


def encode_prompt(tokenizer: Tokenizer, question: str, instruction: bool = False) -> list[int]:
    # add_special_tokens=False: the rendered text has its BOS already, the post-processor would add another
    return tokenizer.encode(render_prompt(question, instruction), add_special_tokens=False).ids


def decode_response(tokenizer: Tokenizer, ids: list[int]) -> str:
    """Generated ids -> text for the reward: control tokens kept, the end-of-sentence token(s) dropped."""
    eos = tokenizer.token_to_id(EOS)
    return tokenizer.decode([i for i in ids if i != eos], skip_special_tokens=False)


def tokenizer_vocab_size(tokenizer: Tokenizer, model_vocab_size: int | None = None) -> int:
    """The ids the tokenizer can produce (max id + 1): the rows the sampler may draw from. The
    model's embedding is usually padded beyond them (151936 rows for 151665 ids); with
    model_vocab_size given, a tokenizer with more ids than the model has rows is refused."""
    size = max(tokenizer.get_vocab(with_added_tokens=True).values()) + 1
    if model_vocab_size is not None and size > model_vocab_size:
        raise ValueError(f"the tokenizer has ids up to {size - 1}, the model only {model_vocab_size} embedding rows: "
                         f"the checkpoint and the tokenizer do not match")
    return size


def save_tokenizer(tokenizer: Tokenizer, out_dir) -> None:
    """tokenizer.json + tokenizer_config.json (special tokens, chat template) into out_dir."""
    os.makedirs(out_dir, exist_ok=True)
    tokenizer.save(os.path.join(out_dir, "tokenizer.json"))
    vocab = tokenizer.get_vocab(with_added_tokens=True)
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": BOS if BOS in vocab else None,
        "eos_token": EOS if EOS in vocab else None,
        "pad_token": EOS if EOS in vocab else None,
        "add_bos_token": False,  # the chat template writes the BOS
        "model_max_length": 131072,
        "chat_template": CHAT_TEMPLATE,
    }
    with open(os.path.join(out_dir, "tokenizer_config.json"), "w", encoding="utf-8") as f:
        json.dump(config, f, ensure_ascii=False, indent=2)
