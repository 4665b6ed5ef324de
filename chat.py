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
save_tokenizer writes tokenizer.json plus a tokenizer_config.json carrying a chat template (ours by
default), so a checkpoint folder loads in transformers / vLLM with the prompt format it was trained on.

Checkpoints trained elsewhere carry their own template (tokenizer_config.json `chat_template`):
the base R1-Distill model pre-fills `<think>\n`, the released Thinkless checkpoints end the generation
prompt with `<｜Assistant｜>\n`. apply_chat_template renders a folder's template the way transformers
and lm_eval do (jinja2's immutable sandbox, trim_blocks / lstrip_blocks, raise_exception, tojson,
strftime_now, the special tokens as variables), so a model is prompted as it was trained and
evaluated; a folder without a template gets our format (CHAT_TEMPLATE). Which stage uses which: SFT
our format (render_prompt), RL the starting checkpoint's template, eval the evaluated checkpoint's.
"""

import datetime
import functools
import json
import os
import warnings
from dataclasses import dataclass

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment
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


def encode_prompt(tokenizer: Tokenizer, question: str, instruction: bool = False, template_dir=None) -> list[int]:
    """The prompt's ids: our format (render_prompt), or with template_dir the question as one user
    message rendered by that folder's chat template with the generation prompt."""
    if instruction:
        question = INSTRUCTION + question
    text = render_prompt(question) if template_dir is None else apply_chat_template(
        template_dir, [{"role": "user", "content": question}])
    # add_special_tokens=False: the rendered text has its BOS already, the post-processor would add another
    # (transformers' apply_chat_template(tokenize=True) encodes the same way)
    return tokenizer.encode(text, add_special_tokens=False).ids


# -----------------------------------------------------------------------------
# A checkpoint's own chat template, rendered as transformers renders it


def apply_chat_template(tokenizer_dir, messages: list[dict], add_generation_prompt: bool = True) -> str:
    """The text transformers' AutoTokenizer.from_pretrained(tokenizer_dir).apply_chat_template(messages,
    add_generation_prompt=..., tokenize=False) returns; a folder without a template (chat_template.jinja
    or tokenizer_config.json's `chat_template`) gets our format (CHAT_TEMPLATE)."""
    template, tokens, _ = _chat_template(tokenizer_dir)
    try:
        return template.render(messages=messages, tools=None, documents=None,
                               add_generation_prompt=add_generation_prompt, **tokens)
    except jinja2.TemplateError as e:
        raise ValueError(f"{tokenizer_dir}: its chat template failed: {e}") from None


def chat_template(tokenizer_dir) -> str:
    """The folder's chat template source (ours when it has none): what a checkpoint trained on its
    prompts must carry on."""
    return _chat_template(tokenizer_dir)[2]


def prefilled_mode(tokenizer_dir) -> str | None:
    """The text from the control token on (e.g. "<think>\\n") when the folder's template writes
    <think> or <short> at the end of the generation prompt (the base R1-Distill model), else None:
    then the mode is the template's choice, not the model's."""
    prompt = apply_chat_template(tokenizer_dir, [{"role": "user", "content": "1+1?"}])
    tail = prompt.rstrip()
    for token in (THINK, SHORT):
        if tail.endswith(token):
            return prompt[len(tail) - len(token):]
    return None


def _special_token(value):
    # tokenizer_config.json writes a special token as a string or as an AddedToken dict
    return value.get("content") if isinstance(value, dict) else value


def _chat_template(tokenizer_dir):
    paths = [os.path.join(tokenizer_dir, name) for name in ("tokenizer_config.json", "chat_template.jinja")]
    stamps = tuple(os.stat(p).st_mtime_ns if os.path.isfile(p) else None for p in paths)
    return _compile_chat_template(*paths, stamps)


@functools.lru_cache(maxsize=8)
def _compile_chat_template(config_path, jinja_path, stamps):
    """(compiled template, special-token variables, source) of a tokenizer folder; cached per file version.
    The template is chat_template.jinja when present (what transformers 5 writes), else
    tokenizer_config.json's `chat_template`, else ours."""
    config = {}
    if stamps[0] is not None:
        with open(config_path, encoding="utf-8") as f:
            try:
                config = json.load(f)
            except json.JSONDecodeError as e:
                raise ValueError(f"{config_path}: not valid JSON ({e})") from None
    if stamps[1] is not None:
        with open(jinja_path, encoding="utf-8") as f:
            config["chat_template"] = f.read()
    source = config.get("chat_template") or CHAT_TEMPLATE
    if isinstance(source, list):  # the multi-template form: [{"name": "default", "template": ...}, ...]
        named = {t.get("name"): t.get("template") for t in source if isinstance(t, dict)}
        if "default" not in named:
            raise ValueError(f"{config_path}: chat_template is a list without a 'default' entry")
        source = named["default"]
    if not isinstance(source, str):
        raise ValueError(f"{config_path}: chat_template must be a string, got {type(source).__name__}")
    tokens = {name: _special_token(config.get(name)) for name in ("bos_token", "eos_token", "pad_token", "unk_token")}
    if config.get("chat_template") is None:  # our template, with our tokens
        tokens.update(bos_token=BOS, eos_token=EOS)
    tokens = {k: v for k, v in tokens.items() if v is not None}  # an unset token is undefined, as in transformers

    def raise_exception(message):
        raise jinja2.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    # The environment of transformers (utils/chat_template_utils.py): templates are untrusted code
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    env.filters["tojson"] = tojson  # jinja's own escapes HTML characters
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.datetime.now().strftime(fmt)
    try:
        return env.from_string(source), tokens, source
    except jinja2.TemplateSyntaxError as e:
        raise ValueError(f"{config_path}: chat_template line {e.lineno}: {e.message}") from None


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


def save_tokenizer(tokenizer: Tokenizer, out_dir, chat_template: str = CHAT_TEMPLATE) -> None:
    """tokenizer.json + tokenizer_config.json (special tokens, chat template) into out_dir. The
    template must render the prompts the checkpoint was trained on: ours after SFT, the starting
    checkpoint's after RL."""
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
        "chat_template": chat_template,
    }
    with open(os.path.join(out_dir, "tokenizer_config.json"), "w", encoding="utf-8") as f:
        json.dump(config, f, ensure_ascii=False, indent=2)
