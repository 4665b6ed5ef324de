"""
Batched sampling from a Transformer with a static KV cache: prompts in, completions out.

Rollouts are most of the cost of RL training, so this file is about keeping the decode batch full:

- One static KVCache (model.py) of `max_batch` rows, written in place (gpt-fast style). Row r, slot
  p holds the key/value of position p of the sequence that row r is decoding; positions start at 0
  in every row, and the model's mask lets a query at position p see slots <= p of its row only. So
  rows of different lengths decode together, and a finished row is reused by starting again at 0.
- Continuous refill (nano-vllm style): a waiting sequence takes a row as soon as one is free, so one
  long response does not hold the rest of the batch idle. When nothing is left to admit, live rows
  are packed to the front of the cache and only the first rows are decoded.
- Prefix sharing for sample groups (nanochat style): the n samples of a prompt share one prefill;
  its keys/values are copied into the rows of the siblings (from any live row of the same prompt).
- The prefill covers prompt[:-1] only and computes no logits (the lm_head is skipped); the last
  prompt token is the first input of the decode step. So every sampled token, the first included,
  comes out of one code path, and a prefill never builds a [tokens, vocab] tensor. Its rows start at
  position 0: plain causal attention, no mask (so flash attention can run).
- The cache can be passed in (new_cache): a trainer allocates it once, for its longest prompt and
  response, and every rollout reuses it.
- Reproducible whatever max_batch is: token t of sample j of prompt i is drawn by inverse-CDF
  sampling with the uniform number hash(seed, first_index + i, j, t) (a counter-based hash; see
  generate() for first_index), not from one global random stream. A row's numbers for all its steps
  are computed on the device when it is admitted, so a decode step reads one of them and sampling
  needs no host sync; the host reads the rows' state back once every `sync_every` steps.
- Padded vocabulary rows (ids >= vocab_size) are cut off the logits before anything else.

`compile=True` compiles the decode step with torch.compile for a GPU: dynamic shapes (the rows and
slots decoded vary), CUDA graphs (a decode step of the 1.5B model is ~1,200 small ops: launching
them costs more CPU time than the GPU needs to run them), the rows and slots rounded up to a few
buckets so that each recorded graph is replayed. A CPU test checks that it samples the eager tokens.
"""

import copy
import math
from dataclasses import dataclass

import torch

from model import KVCache, Transformer

PREFILL_TOKENS = 8192  # padded prompt tokens per prefill forward: bounds its activations and mask
M32 = 0xFFFFFFFF


@dataclass
class Completion:
    tokens: list[int]  # generated ids, the stop token included when one ended the row
    logprobs: list[float]  # log-prob of each token under the distribution it was sampled from (see generate)
    finish_reason: str  # "stop" (a stop id was generated) or "length" (max_new_tokens or the context)


# -----------------------------------------------------------------------------
# Randomness: a counter-based hash, identical on the host (Python ints) and the device (int64 tensors)


def hash32(x):
    """A 32-bit integer bijection with good avalanche (Wellons' lowbias32, second version); x in
    [0, 2^32). Both multipliers are below 2^31, so every product stays below 2^63: int64 tensors
    compute it exactly, with no overflow, and give the same bits as Python ints."""
    x = x ^ (x >> 16)
    x = (x * 0x21F0AAAD) & M32
    x = x ^ (x >> 15)
    x = (x * 0x735A2D97) & M32
    return x ^ (x >> 15)


def sequence_key(seed, prompt_index, sample_index):
    return hash32(hash32(hash32(seed & M32) ^ prompt_index) ^ sample_index)


def uniform(keys, steps):
    """keys, steps int64 (broadcast together) -> fp64 uniforms in (0, 1), a pure function of (key, step)."""
    bits = hash32(hash32(keys ^ hash32(steps)) ^ 0x5BD1E995)  # two rounds: one stream per sequence
    return (bits.double() + 0.5) / 2**32


# -----------------------------------------------------------------------------
# One decode step: last tokens in, next tokens and their log-probs out (all on the device)


def sample(logits, u, temperature, top_p, top_k, vocab_size):
    """logits (B, V), uniforms u (B,) fp64 in (0, 1) -> tokens (B,), logprobs (B,) fp32.

    greedy (temperature 0): token = argmax(logits); logprob = log_softmax(logits) at the token.
    otherwise: logp = log_softmax(z / temperature) over the kept set (ids < vocab_size, the top_k
    largest, the smallest set of largest whose mass reaches top_p), -inf elsewhere;
    token = the first id whose cumulative probability exceeds u * total: inverse-CDF sampling, one
    random number per row (a token of probability 0 is never chosen: the cumulative sum does not
    rise at it); logprob = logp at the token.
    """
    z = logits[:, :vocab_size].float()  # (B, vocab_size): the padded rows of the embedding are cut off
    if temperature == 0:
        tokens = z.argmax(-1)  # (B,)
        return tokens, torch.log_softmax(z, -1).gather(-1, tokens[:, None])[:, 0]
    z = z / temperature
    if top_k > 0 and top_k < vocab_size:
        kth = torch.topk(z, top_k, dim=-1).values[:, -1:]  # (B, 1)
        z = z.masked_fill(z < kth, -math.inf)
    if top_p < 1:
        sorted_z, order = z.sort(-1, descending=True)  # (B, V)
        p = torch.softmax(sorted_z, -1)
        drop = p.cumsum(-1) - p >= top_p  # mass of the larger tokens already reaches top_p
        z = z.scatter(-1, order, sorted_z.masked_fill(drop, -math.inf))
    logp = torch.log_softmax(z, -1)  # (B, V), renormalised over the kept set
    cdf = logp.exp().double().cumsum(-1)  # (B, V), in fp64 so that its rounding is far below 1/V
    x = u[:, None] * cdf[:, -1:]  # (B, 1), strictly below the total
    tokens = torch.searchsorted(cdf, x, right=True)[:, 0]  # (B,) number of entries <= x
    return tokens, logp.gather(-1, tokens[:, None])[:, 0]


def decode_step(model, cache, slots, tok, pos, u, temperature, top_p, top_k, vocab_size):
    """tok, pos, u (B,) for the first B rows of `cache`, attending over its first `slots` slots -> next
    tokens, logprobs (B,). The whole cache comes in and the window is cut here: under CUDA graphs the
    cache is one static input, written in place, never copied into the graph's own buffers."""
    logits = model(tok[:, None], pos[:, None], kv_cache=window(cache, tok.shape[0], slots))[:, -1]  # (B, V)
    return sample(logits, u, temperature, top_p, top_k, vocab_size)


def window(cache, rows, slots):
    """The cache restricted to its first rows and slots: the same buffers (views), written in place.
    Attention then reads the slots that some row has reached, not all of them."""
    view = copy.copy(cache)
    view.k, view.v = cache.k[:, :rows, :slots], cache.v[:, :rows, :slots]
    return view


def bucket(n):
    """n rounded up to the next of 1, 2, 3, 4, 6, 8, 12, 16, 24, ... (at most 1/3 more): the decode shapes
    of a compiled step, so that a few CUDA graphs are recorded and then replayed."""
    p = 1 << (n - 1).bit_length()  # the next power of two
    return 3 * p // 4 if n <= 3 * p // 4 else p


def new_cache(model: Transformer, rows, prompt_len, max_new_tokens) -> KVCache:
    """A cache for `rows` sequences of prompts up to prompt_len tokens and max_new_tokens new ones, in
    the model's dtype, for generate(cache=...): allocated once and reused by every call, it stays one
    block of device memory instead of a new one of a new size each time (which training, between
    calls, fragments). A row needs prompt_len + max_new_tokens - 1 slots: the last token is never fed."""
    cfg, w = model.config, model.embed_tokens.weight
    return KVCache(cfg, rows, min(prompt_len + max_new_tokens - 1, cfg.max_position_embeddings), w.dtype, w.device)


# -----------------------------------------------------------------------------
# The scheduler


@torch.inference_mode()  # no autograd bookkeeping at all: cheaper than no_grad for small decode ops
def generate(model: Transformer, prompts: list[list[int]], max_new_tokens: int, temperature=1.0, top_p=1.0,
             top_k=0, stop_ids=(), n=1, seed=None, vocab_size=None, max_batch=64, refill=True,
             sync_every=None, compile=False, stats=None, first_index=0, cache=None) -> list[list[Completion]]:
    """Samples n completions of each prompt; result[i][j] is the j-th completion of prompts[i].

    temperature 0 is greedy. Log-probs are those of the distribution each token was drawn from:
    log_softmax(logits / temperature) restricted to the kept set (ids < vocab_size, top_k, top_p) and
    renormalised over it; with top_k=0, top_p=1 that is the plain tempered log-softmax over the real
    vocabulary. Greedy reports log_softmax(logits) (temperature 1) at the chosen token.
    vocab_size: ids >= vocab_size (padded embedding rows) are never sampled; default all rows.
    seed: the same seed gives the same tokens for any max_batch and refill (None: drawn from torch's
    RNG), as long as the model gives the same logits; log-probs may differ in the last bits, as
    matmuls round differently for different batch shapes.
    max_batch: rows decoded together (the KV cache has max_batch rows of the longest prompt +
    max_new_tokens slots). refill=False admits a new batch only once every row has finished (the
    static batching baseline of the benchmark). sync_every: decode steps between host reads of the
    rows' state (default 1 on CPU, 8 on CUDA; a finished row idles until the next read).
    compile: torch.compile the decode step, with CUDA graphs on a GPU (mode "reduce-overhead": a step
    is hundreds of small kernels); the rows and slots decoded are then rounded up by bucket(), so that
    a few shapes recur. Meant for a GPU: on a CPU the eager step is faster.
    stats: a dict, if given, receives steps, row_steps (rows decoded, summed over steps), tokens.
    first_index: the index of prompts[0] in a larger batch split over calls (or ranks): prompt i draws
    its numbers as prompt first_index + i, so a split batch samples what the whole batch would.
    cache: a KVCache from new_cache() with at least min(max_batch, len(prompts) * n) rows and the slots
    of the longest prompt + max_new_tokens - 1, reused (its old contents are never read); default: a new one.
    """
    cfg, device = model.config, model.embed_tokens.weight.device
    context = cfg.max_position_embeddings
    vocab_size = cfg.vocab_size if vocab_size is None else vocab_size
    stop_ids = [stop_ids] if isinstance(stop_ids, int) else list(stop_ids)
    # -- bad input, before any work
    if not isinstance(prompts, (list, tuple)) or not prompts:
        raise ValueError("prompts: expected a non-empty list of token-id lists")
    if not 0 < vocab_size <= cfg.vocab_size:
        raise ValueError(f"vocab_size={vocab_size}: expected 1..{cfg.vocab_size} (the model's vocab_size)")
    for i, p in enumerate(prompts):
        if len(p) == 0:
            raise ValueError(f"prompts[{i}] is empty: expected at least one token id")
        if len(p) >= context:
            raise ValueError(f"prompts[{i}] has {len(p)} tokens: the model's context is {context} "
                             f"(max_position_embeddings), which leaves no room for a new token")
        bad = [t for t in p if not (isinstance(t, int) and 0 <= t < cfg.vocab_size)]
        if bad:
            raise ValueError(f"prompts[{i}] holds token id {bad[0]!r}: expected ints in [0, {cfg.vocab_size})")
    bad = [t for t in stop_ids if not (isinstance(t, int) and 0 <= t < cfg.vocab_size)]
    if bad:
        raise ValueError(f"stop_ids holds {bad[0]!r}: expected ints in [0, {cfg.vocab_size})")
    if not (isinstance(n, int) and n >= 1):
        raise ValueError(f"n={n!r}: expected an int >= 1 (samples per prompt)")
    if not (isinstance(max_new_tokens, int) and max_new_tokens >= 1):
        raise ValueError(f"max_new_tokens={max_new_tokens!r}: expected an int >= 1")
    if not (isinstance(max_batch, int) and max_batch >= 1):
        raise ValueError(f"max_batch={max_batch!r}: expected an int >= 1")
    if not temperature >= 0:
        raise ValueError(f"temperature={temperature}: expected >= 0 (0 = greedy)")
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p={top_p}: expected a value in (0, 1]")
    if not (isinstance(top_k, int) and top_k >= 0):
        raise ValueError(f"top_k={top_k!r}: expected an int >= 0 (0 = no top-k)")
    if not (sync_every is None or isinstance(sync_every, int) and sync_every >= 1):
        raise ValueError(f"sync_every={sync_every!r}: expected an int >= 1 (decode steps between host reads)")
    if not (isinstance(first_index, int) and first_index >= 0):
        raise ValueError(f"first_index={first_index!r}: expected an int >= 0")
    if not (seed is None or isinstance(seed, int)):
        raise ValueError(f"seed={seed!r}: expected an int or None")
    if seed is None:
        seed = int(torch.randint(0, 2**31, ()))
    if sync_every is None:
        sync_every = 8 if device.type == "cuda" else 1

    # -- the cache and the rows' state. A row fed token t at position p samples the token at p + 1;
    # the last generated token is never fed, so a row needs len(prompt) + max_new_tokens - 1 slots.
    B = min(max_batch, len(prompts) * n)
    longest = max(len(p) for p in prompts)
    if cache is None:
        cache = new_cache(model, B, longest, max_new_tokens)
    max_len = min(longest + max_new_tokens - 1, context)
    k, dtype, layers, kv, hd = cache.k, cache.k.dtype, cfg.num_hidden_layers, cfg.num_key_value_heads, cfg.head_dim
    if not (k.dim() == 5 and (k.shape[0], *k.shape[3:]) == (layers, kv, hd) and k.shape[1] >= B
            and k.shape[2] >= max_len and dtype == model.embed_tokens.weight.dtype and k.device == device):
        raise ValueError(f"cache.k is {tuple(k.shape)} {dtype} on {k.device}: expected ({layers}, >= {B} rows, >= "
                         f"{max_len} slots, {kv}, {hd}) {model.embed_tokens.weight.dtype} on {device} (see new_cache)")
    # per row: input token, its position, tokens generated, their limit
    tok, pos, count, limit = (torch.zeros(B, dtype=torch.long, device=device) for _ in range(4))  # (B,)
    alive = torch.zeros(B, dtype=torch.bool, device=device)  # (B,)
    # one spare column: a finished row keeps writing at its count, past its last token
    out_tok = torch.zeros(B, max_new_tokens + 1, dtype=torch.long, device=device)  # (B, max_new_tokens + 1)
    out_lp = torch.zeros(B, max_new_tokens + 1, dtype=torch.float32, device=device)  # (B, max_new_tokens + 1)
    draws = torch.zeros(B, max_new_tokens + 1, dtype=torch.float64, device=device)  # uniform of each step
    is_stop = torch.zeros(cfg.vocab_size, dtype=torch.bool, device=device)  # (V,) a lookup, not a search
    is_stop[stop_ids] = True
    if compile:  # dynamic: one compiled graph for all the shapes (CUDA graphs are recorded per bucket)
        step_fn = torch.compile(decode_step, dynamic=True, mode="reduce-overhead" if device.type == "cuda" else None)
        if device.type == "cuda":  # the cache is written in place inside the graph, at a fixed address
            torch._dynamo.mark_static_address(cache.k)
            torch._dynamo.mark_static_address(cache.v)
    else:
        step_fn = decode_step
    sampling = (temperature, top_p, top_k, vocab_size)

    waiting = [(i, j) for i in range(len(prompts)) for j in range(n)][::-1]  # pop() takes the next
    row_seq = [None] * B  # (prompt index, sample index) decoded in each row, None when free
    row_pos = [0] * B  # host copy of each busy row's next position (advanced per window, no sync)
    results = [[None] * n for _ in prompts]
    steps = row_steps = 0

    def admit():
        """Puts waiting sequences into the free rows: prefill new prompts, copy shared prefixes."""
        free = [r for r in range(B) if row_seq[r] is None]
        if not free:
            return
        live = {row_seq[r][0]: r for r in range(B) if row_seq[r] is not None}  # prompt -> a row holding it
        new, prefill, copies = [], {}, []  # (row, i, j); prompt -> row to prefill; (src, dst, slots)
        for r in free[:len(waiting)]:
            i, j = waiting.pop()
            new.append((r, i, j))
            row_seq[r] = (i, j)
            src = live.get(i, prefill.get(i))
            if src is None:
                prefill[i] = r
            else:
                copies.append((src, r, len(prompts[i]) - 1))
        # prefill prompt[:-1] of each new prompt into its row, in chunks of about PREFILL_TOKENS
        todo = sorted(((len(prompts[i]) - 1, i, r) for i, r in prefill.items() if len(prompts[i]) > 1), reverse=True)
        while todo:
            T = todo[0][0]  # longest first: a chunk pads to its first prompt
            chunk, todo = todo[:max(1, PREFILL_TOKENS // T)], todo[max(1, PREFILL_TOKENS // T):]
            idx = torch.zeros(len(chunk), T, dtype=torch.long)
            for b, (L, i, _) in enumerate(chunk):
                idx[b, :L] = torch.tensor(prompts[i][:-1])
            # Positions 0..T-1 (None): causal attention over the chunk, no mask. Padding continues the
            # positions past the prompt: it writes slots that the row's own decode overwrites before any
            # query can see them. The head returns nothing: no logits.
            rows = torch.tensor([r for _, _, r in chunk], device=device)
            model(idx.to(device), kv_cache=window(cache, B, T), cache_rows=rows, head=lambda h, w: None)
        if copies:  # all shared prefixes in one indexed copy; the slots past a prompt are don't-care
            copy_slots = max(s for _, _, s in copies)
            src = torch.tensor([s for s, _, _ in copies], device=device)
            dst = torch.tensor([d for _, d, _ in copies], device=device)
            if copy_slots > 0:
                cache.k[:, dst, :copy_slots] = cache.k[:, src, :copy_slots]
                cache.v[:, dst, :copy_slots] = cache.v[:, src, :copy_slots]
        state = torch.tensor([[r, prompts[i][-1], len(prompts[i]) - 1, min(max_new_tokens, context - len(prompts[i])),
                               sequence_key(seed, first_index + i, j)] for r, i, j in new], dtype=torch.long).to(device)
        r = state[:, 0]
        for row, i, _ in new:
            row_pos[row] = len(prompts[i]) - 1
        tok[r], pos[r], limit[r] = state[:, 1], state[:, 2], state[:, 3]
        draws[r] = uniform(state[:, 4:], torch.arange(max_new_tokens + 1, device=device))  # (new, max_new + 1)
        count[r] = 0
        alive[r] = True

    def pack():
        """Moves the live rows to the front of the cache, so that fewer rows are decoded."""
        live = [r for r in range(B) if row_seq[r] is not None]
        src = [r for r in live if r >= len(live)]
        dst = [r for r in range(len(live)) if row_seq[r] is None]
        s, d = torch.tensor(src, device=device), torch.tensor(dst, device=device)
        used = max(row_pos[a] for a in src)  # slots written so far by the moved rows: the rest is don't-care
        for t in (cache.k, cache.v):
            t[:, d, :used] = t[:, s, :used]
        for t in (tok, pos, count, limit, alive, out_tok, out_lp, draws):
            t[d] = t[s]
        for a, b in zip(src, dst):
            row_seq[b], row_seq[a] = row_seq[a], None
            row_pos[b] = row_pos[a]

    def busy():
        return [r for r in range(B) if row_seq[r] is not None]

    while waiting or busy():
        if waiting and (refill or not busy()):
            admit()
        elif not waiting and busy()[-1] >= 2 * len(busy()):
            pack()
        rows_used = 1 + busy()[-1]  # decode only the rows up to the last busy one
        # and only the slots that the busy rows reach in this window (rounded up: fewer shapes)
        slots = -(-(max(row_pos[r] for r in busy()) + sync_every) // 64)  # in blocks of 64
        if compile:
            rows_used, slots = min(B, bucket(rows_used)), bucket(slots)
        slots = min(max_len, 64 * slots)
        row_ids = torch.arange(rows_used, device=device)
        # the state of the decoded rows: views, so the in-place updates below write the full tensors
        tok_w, pos_w, count_w, limit_w, alive_w = (t[:rows_used] for t in (tok, pos, count, limit, alive))
        pos_w.clamp_(max=slots - 1)  # free rows decode garbage, inside the window (live ones are < slots)
        for _ in range(sync_every):
            nxt, lp = step_fn(model, cache, slots, tok_w, pos_w, draws[row_ids, count_w], *sampling)
            out_tok[row_ids, count_w], out_lp[row_ids, count_w] = nxt, lp
            count_w += alive_w
            alive_w &= (count_w < limit_w) & ~is_stop[nxt]
            tok_w.copy_(nxt)
            pos_w += alive_w  # finished and free rows stay where they are, inside the window
            steps, row_steps = steps + 1, row_steps + rows_used
        for r in busy():
            row_pos[r] += sync_every
        # one host sync: collect the rows that finished
        done = [r for r, a in enumerate(alive[:rows_used].tolist()) if not a and row_seq[r] is not None]
        if done:
            d = torch.tensor(done, device=device)
            counts = count[d].tolist()  # read back only the columns written (not max_new_tokens + 1)
            toks, lps = out_tok[d, :max(counts)].tolist(), out_lp[d, :max(counts)].tolist()
            for r, c, t, l in zip(done, counts, toks, lps):
                i, j = row_seq[r]
                reason = "stop" if t[c - 1] in stop_ids else "length"
                results[i][j] = Completion(t[:c], l[:c], reason)
                row_seq[r] = None
    if stats is not None:
        stats.update(steps=steps, row_steps=row_steps,
                     tokens=sum(len(c.tokens) for group in results for c in group))
    return results
