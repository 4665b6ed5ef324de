"""Warm-up data for Thinkless (THINKLESS.md, section 3): prompts in, <think>/<short> response pairs out.

    python warmup_data.py --prompts FILE.jsonl --think-model DIR --short-model DIR --out pairs.jsonl

Two experts answer every prompt, each loaded from its own folder (config.json + safetensors +
tokenizer.json) and prompted in its own chat format:

    reasoning expert (DeepSeek-R1-Distill)   THINK_TEMPLATE: the ORIGINAL R1 template, which ends in
                                             `<｜Assistant｜><think>\\n`: the chain is forced open
    instruction expert (Qwen2.5-Instruct)    SHORT_TEMPLATE: ChatML, the \\boxed{} instruction as the
                                             system message (the Qwen2.5-Math-Instruct convention)

The R1 question is prefixed with the same instruction (as chat.py does for evaluation), so that both
experts box their final answer. The pair's prompt is the raw question: the student is trained on
chat.render_prompt(question) (no instruction, no <think>), as in RL.

Each expert has its own tokenizer (the experts are not the student: neither needs <short>), its own
stop tokens (R1: <｜end▁of▁sentence｜>; ChatML: <|im_end|>, <|endoftext|>) and its own vocabulary
size (padded embedding rows are never sampled). One sampler call per expert covers all prompts: the
continuous batch stays full, and the randomness is keyed by (seed, prompt index), so the data do not
depend on --max-batch. The experts run one after the other: only one is in memory at a time.

A prompt is kept only when BOTH responses are usable, so that the data stay 50/50 between the modes:

    think   "<think>\\n" + the expert's text; it must close the chain (`</think>`) and have a \\boxed{}
            answer after it, the format rewards.py checks (a truncated chain is a format error)
    short   "<short>\\n" + the expert's text; it must have a \\boxed{} answer
    both    generation ended on a stop token (finish_reason "length": truncated, dropped), and the
            student's sequence, prompt + response + end-of-sentence, is at most --max-len tokens

Length is counted in the student's tokenization, the way train.py counts it before its own cut:
the student's tokenizer is the reasoning expert's plus <short> as one added token (chat.py), so
len = len(chat prompt) + 1 (control token) + len(text after the control token) + 1 (end-of-sentence),
each piece encoded by the reasoning expert's tokenizer. Added tokens split the text before the BPE,
so this equals the student's count exactly.

The expert's stop token is not part of the text (train.py appends the student's end-of-sentence).
Answers are not graded: the warm-up teaches the two styles, RL then rewards the correct ones.
Output: JSONL {"prompt", "response"}, both responses of every kept prompt, written to a temporary
file and renamed (a crash never leaves half a file); it loads with sft.read_sft_jsonl.
"""

import argparse
import json
import os
import sys
import time
from collections import Counter

import torch
from tokenizers import Tokenizer

from chat import (ASSISTANT, BOS, END_THINK, EOS, INSTRUCTION, SHORT, THINK, USER, render_prompt, resolve_model,
                  tokenizer_vocab_size)
from model import Transformer
from rewards import last_boxed
from sampler import generate

THINK_TEMPLATE = BOS + USER + INSTRUCTION + "{question}" + ASSISTANT + THINK + "\n"
SHORT_TEMPLATE = ("<|im_start|>system\n" + INSTRUCTION.strip() + "<|im_end|>\n"
                  "<|im_start|>user\n{question}<|im_end|>\n<|im_start|>assistant\n")
THINK_STOPS = (EOS,)
SHORT_STOPS = ("<|im_end|>", "<|endoftext|>")
SEED = 0  # the sampler's seed: the same data for any --max-batch

# why a prompt is dropped; every reason that applies is counted, so one prompt may count under several
DROP_REASONS = ("think truncated", "think without </think>", "think without \\boxed{} after </think>",
                "short truncated", "short without \\boxed{}", "over --max-len")


def load_prompts(path) -> list[str]:
    """The `problem` strings of a JSONL file (other fields, `answer` included, are not needed)."""
    questions = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{n}: not valid JSON ({e})") from None
            if not isinstance(rec, dict) or not isinstance(rec.get("problem"), str) or not rec["problem"].strip():
                raise ValueError(f"{path}:{n}: expected an object with a non-empty string 'problem', "
                                 f"got {line.strip()[:80]!r}")
            questions.append(rec["problem"])
    if not questions:
        raise ValueError(f"{path}: no prompts")
    return questions


def load_expert_tokenizer(model_dir, stop_tokens):
    """(tokenizer, stop ids, vocab size) of an expert folder; the stop tokens found in its vocabulary."""
    path = os.path.join(model_dir, "tokenizer.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no tokenizer.json (expected a Hugging Face tokenizer file)")
    tokenizer = Tokenizer.from_file(path)
    stop_ids = [i for i in map(tokenizer.token_to_id, stop_tokens) if i is not None]
    if not stop_ids:
        raise ValueError(f"{path}: none of the stop tokens {list(stop_tokens)} is in the vocabulary: is this "
                         f"the right expert for its chat template?")
    vocab_size = tokenizer_vocab_size(tokenizer)
    return tokenizer, stop_ids, vocab_size


def run_expert(name, model_dir, template, stop_tokens, questions, max_new_tokens, temperature, top_p, max_batch):
    """Completions [(text, finish_reason)] of one expert for all questions, with the stop token dropped."""
    tokenizer, stop_ids, vocab_size = load_expert_tokenizer(model_dir, stop_tokens)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = Transformer.from_pretrained(model_dir, dtype=torch.bfloat16 if device == "cuda" else torch.float32,
                                        device=device).eval()
    if vocab_size > model.config.vocab_size:
        raise ValueError(f"{model_dir}: tokenizer has ids up to {vocab_size - 1}, the model only "
                         f"{model.config.vocab_size} embedding rows: the checkpoint and the tokenizer do not match")
    # str.replace, not str.format: the instruction's \\boxed{} holds braces. add_special_tokens=False:
    # the template writes its own BOS (R1) or none (ChatML)
    prompts = [tokenizer.encode(template.replace("{question}", q), add_special_tokens=False).ids for q in questions]
    print(f"{name}: {len(prompts)} prompts from {model_dir} ...", file=sys.stderr, flush=True)
    t0 = time.time()
    completions = [c[0] for c in generate(model, prompts, max_new_tokens, temperature=temperature, top_p=top_p,
                                          stop_ids=stop_ids, seed=SEED, vocab_size=vocab_size, max_batch=max_batch)]
    del model
    if device == "cuda":
        torch.cuda.empty_cache()
    tokens, dt = sum(len(c.tokens) for c in completions), time.time() - t0
    truncated = sum(c.finish_reason == "length" for c in completions)
    print(f"{name}: {tokens} tokens in {dt:.0f} s ({tokens / max(dt, 1e-9):.0f} tok/s), "
          f"{truncated} of {len(completions)} truncated", file=sys.stderr, flush=True)
    # the stop token is dropped by id; the control tokens, text to the student, stay in (no skipping)
    return [(tokenizer.decode(c.tokens[:-1] if c.finish_reason == "stop" else c.tokens, skip_special_tokens=False),
             c.finish_reason) for c in completions]


def build_pairs(questions, think, short, student_tokenizer, max_len):
    """Records [{"prompt", "response"}] (think then short, per kept question) and a Counter: "kept",
    "dropped" (prompts) and each of DROP_REASONS (prompts it applies to; a prompt may have several).

    think, short: [(text, finish_reason)] per question, the text without its control token."""
    def length(q, text):  # the student's sequence: prompt + control token + text + end-of-sentence
        return (len(student_tokenizer.encode(render_prompt(q), add_special_tokens=False).ids) + 1
                + len(student_tokenizer.encode("\n" + text, add_special_tokens=False).ids) + 1)

    records, counts = [], Counter()
    for q, (t_text, t_reason), (s_text, s_reason) in zip(questions, think, short):
        checks = (t_reason == "length", END_THINK not in t_text, not last_boxed(t_text.split(END_THINK, 1)[-1]),
                  s_reason == "length", not last_boxed(s_text), max(length(q, t_text), length(q, s_text)) > max_len)
        reasons = [r for r, bad in zip(DROP_REASONS, checks) if bad]
        counts.update(reasons)
        counts["dropped" if reasons else "kept"] += 1
        if not reasons:
            records += [{"prompt": q, "response": f"{THINK}\n{t_text}"},
                        {"prompt": q, "response": f"{SHORT}\n{s_text}"}]
    return records, counts


def write_jsonl_atomic(path, records):
    tmp = f"{path}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--prompts", required=True, help="JSONL with a string `problem` per line")
    ap.add_argument("--think-model", required=True, help="reasoning expert (R1-Distill style): a folder, or a Hub id "
                    "such as deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B, downloaded when no such folder exists")
    ap.add_argument("--short-model", required=True, help="instruction expert (Qwen2.5-Instruct style, ChatML): a "
                    "folder or a Hub id")
    ap.add_argument("--out", required=True, help="output JSONL of {prompt, response} pairs")
    ap.add_argument("--max-len", type=int, default=16384, help="drop a prompt when either of its student sequences "
                    "(prompt + response + end-of-sentence) is longer")
    ap.add_argument("--max-new-tokens", type=int, default=None, help="per response (default: --max-len)")
    ap.add_argument("--temperature", type=float, default=0.6)
    ap.add_argument("--top-p", type=float, default=0.95)
    ap.add_argument("--max-batch", type=int, default=64, help="rows decoded together (KV cache rows)")
    ap.add_argument("--limit", type=int, default=None, help="only the first N prompts")
    args = ap.parse_args(argv)

    try:  # bad input fails here, before a model is loaded: one line, not a traceback
        if args.max_len < 1 or (args.max_new_tokens is not None and args.max_new_tokens < 1):
            raise ValueError(f"--max-len {args.max_len} / --max-new-tokens {args.max_new_tokens}: expected >= 1")
        if args.limit is not None and args.limit < 1:
            raise ValueError(f"--limit {args.limit}: expected >= 1")
        out_dir = os.path.dirname(os.path.abspath(args.out))
        if not os.path.isdir(out_dir):
            raise FileNotFoundError(f"--out {args.out}: folder {out_dir} does not exist")
        questions = load_prompts(args.prompts)[:args.limit]
        args.think_model, args.short_model = resolve_model(args.think_model), resolve_model(args.short_model)
        for d in (args.think_model, args.short_model):  # the second expert runs after hours of the first
            if not os.path.isfile(os.path.join(d, "config.json")):
                raise FileNotFoundError(f"{d}: no config.json (expected a checkpoint folder)")
        student_tokenizer = load_expert_tokenizer(args.think_model, THINK_STOPS)[0]
        load_expert_tokenizer(args.short_model, SHORT_STOPS)
    except (OSError, ValueError) as e:  # the messages name the file (and line); open() names it as filename
        raise SystemExit(f"error: {e.filename}: {e.strerror}" if getattr(e, "filename", None) else f"error: {e}")
    print(f"warmup_data: {vars(args)}", file=sys.stderr)

    sampling = (args.max_new_tokens or args.max_len, args.temperature, args.top_p, args.max_batch)
    think = run_expert("think expert", args.think_model, THINK_TEMPLATE, THINK_STOPS, questions, *sampling)
    short = run_expert("short expert", args.short_model, SHORT_TEMPLATE, SHORT_STOPS, questions, *sampling)
    records, counts = build_pairs(questions, think, short, student_tokenizer, args.max_len)
    write_jsonl_atomic(args.out, records)
    print(f"{len(questions)} prompts: {counts['kept']} kept ({len(records)} records to {args.out}), "
          f"{counts['dropped']} dropped; why (a prompt may have several reasons): "
          + ", ".join(f"{r} {counts[r]}" for r in DROP_REASONS))
    if not records:
        print(f"warning: no pair kept, {args.out} is empty (sft.read_sft_jsonl refuses it)", file=sys.stderr)
    return counts


if __name__ == "__main__":
    main()
