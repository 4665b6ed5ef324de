"""Evaluate a checkpoint like the paper (THINKLESS.md, section 5): benchmark JSONL -> the table.

    python eval.py --model DIR --data ../shared/data/math500.jsonl [more files] [--samples 5] [--max-new-tokens N]

For every problem, `samples` completions are drawn with our sampler, one pass over the whole
benchmark per seed 0..samples-1 (as the paper's five runs), at temperature 0.6 and top-p 0.95, from
the prompt `instruction + question` rendered by the checkpoint's own chat template (chat.py; the
base R1-Distill model's pre-fills `<think>\n`, which then counts as the start of the response).
Each response is decoded with its control tokens kept and scored twice:

    official  the official scripts' scoring (official_score.py): last \boxed{} anywhere, else answer
              tags, else the last number; no format check; tokens = the templated conversation,
              prompt included; think = `<think>` anywhere. The paper's table is this column.
    strict    what the RL reward sees (rewards.py): control token first, chain closed, \boxed{} in
              the answer part; tokens = generated tokens (end-of-sentence excluded); think = the
              first token is <think>.

Per benchmark: Pass@1 (mean accuracy over all samples), mean tokens, think ratio for each, and for
the strict reading the accuracy per mode, the share of format errors and of truncated samples; the
same per `level` when the problems carry one. Every generation with both scores goes to a JSONL
file, written as each seed finishes, so a long run that stops keeps what it did. Grading runs in a
few threads (rewards.py bounds each call with worker processes), after each seed.

One sampler call per seed covers the whole benchmark, so the continuous batch stays full: it drains
to a few long rows once, at the end, not once per chunk. So progress is reported once per seed.
"""

import argparse
import contextlib
import json
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import torch

import official_score
from chat import (control_ids, decode_response, encode_prompt, load_tokenizer, prefilled_mode, resolve_model,
                  tokenizer_vocab_size)
from model import Transformer, load_config
from rewards import reward_details, score
from sampler import generate


def score_official(response: str, ground_truth) -> bool:
    """The official scripts' verdict: last \\boxed{} anywhere (then answer tags, then the last number),
    normalised or symbolically equal to the ground truth; no format check (official_score.py)."""
    return official_score.is_correct(response, ground_truth)[1]


def score_strict(response: str, ground_truth) -> bool:
    """The RL reward's verdict (rewards.py): control token first, chain closed, \\boxed{} in the answer."""
    return reward_details(response, ground_truth).correct


def load_problems(path, skip_unanswered=False) -> list[dict]:
    """JSONL (one object a line) or JSON (a list of objects) with `problem` (str) and `answer`
    (str, number, or a non-empty list of them). Other fields (`level`, ...) are kept.
    skip_unanswered: drop (and name) the records whose answer is null or empty instead of refusing
    the file; training sets have a few (math_train.jsonl: 2), and no response can be graded on them."""
    with open(path, encoding="utf-8") as f:
        if str(path).endswith(".json"):
            data = json.load(f)
            if not isinstance(data, list):
                raise ValueError(f"{path}: expected a JSON list of problems, got {type(data).__name__}")
            records = [(f"{path}: record {i}", r) for i, r in enumerate(data)]
        else:
            records = []
            for n, line in enumerate(f, 1):
                if line.strip():
                    try:
                        records.append((f"{path}:{n}", json.loads(line)))
                    except json.JSONDecodeError as e:
                        raise ValueError(f"{path}:{n}: not valid JSON ({e})") from None
    problems, skipped = [], []
    for where, r in records:
        if not isinstance(r, dict) or not isinstance(r.get("problem"), str) or not r["problem"].strip():
            raise ValueError(f"{where}: expected an object with a non-empty string 'problem'")
        answer = r.get("answer")
        if skip_unanswered and answer in (None, "", []):
            skipped.append(where)
            continue
        answers = answer if isinstance(answer, list) else [answer]
        if not answers or not all(isinstance(a, (str, int, float)) and not isinstance(a, bool) for a in answers):
            raise ValueError(f"{where}: 'answer' must be a string, a number or a non-empty list of them, "
                             f"got {answer!r:.100}")
        answers = [str(a) for a in answers]
        problems.append({**r, "answer": answers if isinstance(answer, list) else answers[0]})
    if skipped:
        print(f"{path}: skipped {len(skipped)} problems without an answer: {', '.join(skipped[:5])}"
              f"{' ...' if len(skipped) > 5 else ''}")
    if not problems:
        raise ValueError(f"{path}: no problems")
    return problems


def summarize(records: list[dict]) -> dict:
    """Strict metrics under the plain names (what RL optimises), the official ones prefixed `official_`."""
    def mean(rs, key):
        return sum(r[key] for r in rs) / len(rs) if rs else None

    think = [r for r in records if r["mode"] == "think"]
    short = [r for r in records if r["mode"] == "short"]
    return {
        "samples": len(records),
        "pass@1": mean(records, "correct"),
        "mean_tokens": mean(records, "tokens"),
        "think_ratio": len(think) / len(records),
        "think_acc": mean(think, "correct"),
        "short_acc": mean(short, "correct"),
        "format_error_rate": sum(not r["format_ok"] for r in records) / len(records),
        "truncated_rate": sum(r["finish_reason"] == "length" for r in records) / len(records),
        "official_pass@1": mean(records, "official_correct"),
        "official_tokens": mean(records, "official_tokens"),
        "official_think_ratio": mean(records, "official_think"),
    }


def evaluate(model, tokenizer, problems, samples=5, max_new_tokens=32768, temperature=0.6, top_p=0.95,
             max_batch=64, is_equivalent=None, instruction=True, out_jsonl=None, force_mode=None,
             progress=True, template_dir=None, compile=False) -> dict:
    """Samples and grades `samples` completions per problem; returns summarize() of them all, with a
    "levels" dict of per-level summaries when the problems have a `level` field.
    template_dir: prompts rendered by that folder's chat template (the checkpoint's); None: our format.
    force_mode "think" or "short" writes that control token as the first response token (the
    always-think / always-short baselines) instead of letting the model choose; it counts as one of the
    max_new_tokens, as the chosen one would. A template that pre-fills a mode does the same.
    compile: the sampler's compiled decode step (CUDA graphs on a GPU)."""
    prefill = prefilled_mode(template_dir) if template_dir is not None else None
    if prefill and force_mode:
        raise ValueError(f"force_mode={force_mode!r}: the chat template of {template_dir} pre-fills {prefill!r} already")
    if force_mode not in (None, "think", "short"):
        raise ValueError(f"force_mode={force_mode!r}: expected None, 'think' or 'short'")
    if not isinstance(samples, int) or samples < 1:
        raise ValueError(f"samples={samples!r}: expected an int >= 1")
    if not problems:
        raise ValueError("problems: expected a non-empty list")
    for i, p in enumerate(problems):
        if not (isinstance(p, dict) and isinstance(p.get("problem"), str) and "answer" in p):
            raise ValueError(f"problems[{i}]: expected a dict with 'problem' (str) and 'answer' (see load_problems)")
    ids = control_ids(tokenizer)
    vocab_size = tokenizer_vocab_size(tokenizer, model.config.vocab_size)
    forced = [getattr(ids, force_mode)] if force_mode else []
    prompts = [encode_prompt(tokenizer, p["problem"], instruction, template_dir) for p in problems]
    if prefill:  # the template's control token (and what follows it) becomes the response's start
        forced = tokenizer.encode(prefill, add_special_tokens=False).ids
        if any(p[-len(forced):] != forced for p in prompts):
            raise ValueError(f"{template_dir}: the prompts do not end with the ids of {prefill!r}")
        prompts = [p[:-len(forced)] for p in prompts]
    if forced and max_new_tokens <= len(forced):
        raise ValueError(f"max_new_tokens={max_new_tokens}: a forced mode needs >= {len(forced) + 1} "
                         f"(the pre-filled tokens {forced} and one more)")
    prompts = [p + forced for p in prompts]
    records, start = [], time.time()
    with (open(out_jsonl, "w", encoding="utf-8") if out_jsonl else contextlib.nullcontext()) as out, \
            ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as graders:
        for seed in range(samples):
            t0 = time.time()
            completions = generate(model, prompts, max_new_tokens - len(forced), temperature=temperature, top_p=top_p,
                                   stop_ids=(ids.eos,), n=1, seed=seed, vocab_size=vocab_size, max_batch=max_batch,
                                   compile=compile)
            for c in completions:  # the forced control token counts as the response's first token
                c[0].tokens = forced + c[0].tokens
            responses = [decode_response(tokenizer, c[0].tokens) for c in completions]
            details = list(graders.map(lambda rp: reward_details(rp[0], rp[1]["answer"], is_equivalent),
                                       zip(responses, problems)))
            official = list(graders.map(lambda rp: official_score.is_correct(rp[0], rp[1]["answer"], is_equivalent),
                                        zip(responses, problems)))
            for i, (p, c, text, d, (o_answer, o_correct)) in enumerate(zip(problems, completions, responses, details,
                                                                            official)):
                c = c[0]
                rec = {"index": i, "seed": seed, "level": p.get("level"), "answer": p["answer"],
                       "mode": d.mode, "format_ok": d.format_ok, "extracted": d.answer, "correct": d.correct,
                       "reward": score(d), "error": d.error,
                       "tokens": len(c.tokens) - (c.finish_reason == "stop"),  # the stop token is not counted
                       # the templated conversation: prompt + response, its closing end-of-sentence included
                       "official_tokens": len(prompts[i]) - len(forced) + len(c.tokens),
                       "official_extracted": o_answer, "official_correct": o_correct,
                       "official_think": official_score.thinks(text),
                       "finish_reason": c.finish_reason, "response": text}
                records.append(rec)
                if out:
                    out.write(json.dumps(rec, ensure_ascii=False) + "\n")
            if out:
                out.flush()
            so_far = summarize(records)
            new_tokens = sum(len(c[0].tokens) for c in completions)
            if progress:
                print(f"  seed {seed + 1}/{samples}: {len(problems)} problems, {new_tokens} tokens in "
                      f"{time.time() - t0:.0f} s ({new_tokens / max(time.time() - t0, 1e-9):.0f} tok/s); "
                      f"pass@1 so far {so_far['official_pass@1']:.4f} official, {so_far['pass@1']:.4f} strict, "
                      f"think {so_far['think_ratio']:.0%}, "
                      f"elapsed {time.time() - start:.0f} s", file=sys.stderr, flush=True)
    metrics = summarize(records)
    levels = sorted({r["level"] for r in records if r["level"] is not None}, key=str)
    if levels:
        metrics["levels"] = {str(lv): summarize([r for r in records if r["level"] == lv]) for lv in levels}
    return metrics


@torch.no_grad()
def mode_probabilities(model, tokenizer, problems, temperature=0.6, instruction=True, template_dir=None,
                       batch=256) -> list[tuple[float, float]]:
    """[(p(<think>), p(<short>))] per problem: the exact probability that the first response token is
    each control token, softmax(logits / temperature) over the sampler's rows (ids < the tokenizer's
    size) at the prompt's last position. One forward pass per `batch` prompts, no sampling, so the
    think share it gives has no sampling noise (a sampled think ratio on n problems moves in steps of
    1/n). The prompts are right-padded: under causal attention a prompt's last position sees no padding."""
    if not temperature > 0:
        raise ValueError(f"temperature={temperature!r}: expected > 0 (greedy has no probabilities to report)")
    ids = control_ids(tokenizer)
    vocab_size = tokenizer_vocab_size(tokenizer, model.config.vocab_size)
    prompts = [encode_prompt(tokenizer, p["problem"], instruction, template_dir) for p in problems]
    device = next(model.parameters()).device
    out = []
    for start in range(0, len(prompts), batch):
        rows = prompts[start: start + batch]
        idx = torch.tensor([p + [0] * (max(map(len, rows)) - len(p)) for p in rows], device=device)  # (B, T)
        last = torch.tensor([len(p) - 1 for p in rows], device=device)  # (B,)
        # the lm_head on the last prompt position only: (B, V), never (B, T, V)
        logits = model(idx, head=lambda h, w: h[torch.arange(len(rows), device=device), last] @ w.T)
        probs = torch.softmax(logits[:, :vocab_size].float() / temperature, dim=-1)  # (B, V_real)
        out += list(zip(probs[:, ids.think].tolist(), probs[:, ids.short].tolist()))
    return out


def format_table(results: dict) -> str:
    """{benchmark: evaluate() metrics} -> a text table, one row per benchmark (and per level)."""
    def pct(x):
        return "-" if x is None else f"{100 * x:.1f}%"

    three = f"{'pass@1':>7} {'tokens':>8} {'think%':>6}"
    head = f"{'benchmark':<24} {'samples':>7} | {three} | {three} {'acc think':>9} {'acc short':>9} {'fmt err':>7} {'trunc':>6}"
    groups = f"{'':<32} | {'official (the paper)':<23} | strict (the RL reward)"
    lines = [groups, head, "-" * len(head)]
    for name, m in results.items():
        rows = [(name, m)] + [(f"  {lv}" if lv.lower().startswith("level") else f"  level {lv}", lm)
                              for lv, lm in m.get("levels", {}).items()]
        for label, r in rows:
            lines.append(f"{label:<24} {r['samples']:>7} | {r['official_pass@1']:>7.4f} {r['official_tokens']:>8.1f} "
                         f"{pct(r['official_think_ratio']):>6} | {r['pass@1']:>7.4f} {r['mean_tokens']:>8.1f} "
                         f"{pct(r['think_ratio']):>6} {pct(r['think_acc']):>9} {pct(r['short_acc']):>9} "
                         f"{pct(r['format_error_rate']):>7} {pct(r['truncated_rate']):>6}")
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True, help="checkpoint folder (config.json, safetensors, tokenizer.json) or a "
                    "Hugging Face Hub id, downloaded when no such folder exists; its chat template renders the prompts")
    ap.add_argument("--data", required=True, nargs="+", help="benchmark JSONL/JSON files (problem, answer)")
    ap.add_argument("--samples", type=int, default=5,
                    help="completions per problem, seeds 0..samples-1 (default %(default)s, the paper's)")
    ap.add_argument("--max-new-tokens", type=int, default=32768, help="per completion (default %(default)s, the "
                    "paper's: hours on a CPU, give a small value for a dry run)")
    ap.add_argument("--temperature", type=float, default=0.6, help="default %(default)s")
    ap.add_argument("--top-p", type=float, default=0.95, help="default %(default)s")
    ap.add_argument("--max-batch", type=int, default=64,
                    help="rows decoded together; the KV cache holds max_batch x (prompt + max_new_tokens) tokens, "
                         "28 KiB each for the 1.5B model in bf16: 64 x 33k = 60 GB (default %(default)s)")
    ap.add_argument("--limit", type=int, default=None, help="only the first N problems of each file (default: all)")
    ap.add_argument("--no-instruction", action="store_true", help="raw question as the prompt (as in RL)")
    ap.add_argument("--out-dir", default="eval_out", help="writes <benchmark>.jsonl and summary.json here "
                    "(default %(default)s)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                    help="default %(default)s")
    ap.add_argument("--dtype", default=None, help="bfloat16, float32, ... (default: bfloat16 on cuda, float32 on cpu)")
    ap.add_argument("--compile", action="store_true",
                    help="torch.compile the decode step, with CUDA graphs (for a GPU; slower on a CPU)")
    args = ap.parse_args(argv)

    try:  # every input checked before the model is loaded; a mistake is one line, not a traceback
        benchmarks = {}
        for path in args.data:
            name = os.path.splitext(os.path.basename(path))[0]
            benchmarks[name] = load_problems(path)[:args.limit]
        model_dir = resolve_model(args.model)
        load_config(model_dir)
        tokenizer = load_tokenizer(model_dir)
    except (OSError, ValueError) as e:  # the messages name the file (and line); open() names it as filename
        raise SystemExit(f"error: {e.filename}: {e.strerror}" if getattr(e, "filename", None) else f"error: {e}")
    dtype = getattr(torch, args.dtype or ("bfloat16" if args.device.startswith("cuda") else "float32"))
    model = Transformer.from_pretrained(model_dir, dtype=dtype, device=args.device).eval()
    os.makedirs(args.out_dir, exist_ok=True)
    print(f"eval: {vars(args)}", file=sys.stderr)

    results = {}
    with torch.inference_mode():
        for name, problems in benchmarks.items():
            print(f"{name}: {len(problems)} problems x {args.samples} samples", file=sys.stderr, flush=True)
            results[name] = evaluate(model, tokenizer, problems, samples=args.samples,
                                     max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                                     top_p=args.top_p, max_batch=args.max_batch,
                                     instruction=not args.no_instruction, template_dir=model_dir,
                                     out_jsonl=os.path.join(args.out_dir, f"{name}.jsonl"), compile=args.compile)
    with open(os.path.join(args.out_dir, "summary.json"), "w") as f:
        json.dump({"args": vars(args), "results": results}, f, indent=2)
    print(format_table(results))
    return results


if __name__ == "__main__":
    main()
