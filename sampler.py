"""
Batched sampling from a Transformer with a static KV cache: prompts in, completions out.

Rollouts are most of the cost of RL training, so this file is about keeping the decode batch full:

- One static KVCache (model.py) of `max_batch` rows, written in place (gpt-fast style): slot p of row r
  holds position p of the row's sequence and a query at position p sees slots <= p of its row only, so
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
- Reproducible whatever max_batch is: token t of sample j of prompt i is drawn by inverse-CDF sampling
  with the uniform number hash(seed, first_index + i, j, t) (a counter-based hash), not from one global
  random stream. A row's numbers for all its steps are computed on the device when it is admitted, so
  sampling needs no host sync; the host reads the rows' state back once every `sync_every` steps.

`compile=True` compiles the decode step with torch.compile for a GPU: dynamic shapes (the rows and
slots decoded vary), CUDA graphs (a decode step of the 1.5B model is ~1,200 small ops: launching
them costs more CPU time than the GPU needs to run them), the rows and slots rounded up to a few
buckets so that each recorded graph is replayed. A CPU test checks that it samples the eager tokens.

The sections split the work as nano-vllm does: the sampling math; the Scheduler (host-side lists: which
sequence holds which row); the Runner (the device: cache, rows' state, prefill, decode steps); generate().
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
    logprobs: list[float]  # log-prob of each token under the (top-k / top-p cut) distribution it was drawn from
    finish_reason: str  # "stop" (a stop id was generated) or "length" (max_new_tokens or the context)


# -----------------------------------------------------------------------------
# The sampling math: random numbers from a counter-based hash (host and device agree); logits -> a token


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


# -----------------------------------------------------------------------------
# The scheduler: which sequence each row decodes, in host-side lists; the runner does the device work


class Scheduler:
    """A sequence (prompt i, sample j) waits, takes a free row of the decode batch (admit), may move to a
    lower free row (pack), and leaves its row when it finishes (finish)."""

    def __init__(self, prompts, n, rows, stop_ids):
        self.prompts, self.stop_ids = prompts, set(stop_ids)
        self.waiting = [(i, j) for i in range(len(prompts)) for j in range(n)][::-1]  # pop() takes the next
        self.seq = [None] * rows  # (prompt index, sample index) decoded in each row, None when free
        self.pos = [0] * rows  # each busy row's next position, advanced per window (no device read)
        self.results = [[None] * n for _ in prompts]  # results[i][j]: a Completion once finished

    def busy(self):
        return [r for r, s in enumerate(self.seq) if s is not None]

    def admit(self):
        """Waiting sequences into free rows -> new [(row, i, j)], prefill {i: row}, copies [(from row, row, slots)]."""
        free = [r for r, s in enumerate(self.seq) if s is None]
        live = {s[0]: r for r, s in enumerate(self.seq) if s is not None}  # prompt -> a row holding it
        new, prefill, copies = [], {}, []
        for r in free[:len(self.waiting)]:
            i, j = self.waiting.pop()
            new.append((r, i, j))
            self.seq[r], self.pos[r] = (i, j), len(self.prompts[i]) - 1
            src = live.get(i, prefill.get(i))  # prefix sharing: a row that holds prompt i, or will
            if src is None:
                prefill[i] = r
            else:
                copies.append((src, r, len(self.prompts[i]) - 1))
        return new, prefill, copies

    def pack(self):
        """Busy rows past the first len(busy) into free rows below -> (sources, destinations, slots written)."""
        busy = self.busy()
        src = [r for r in busy if r >= len(busy)]
        dst = [r for r in range(len(busy)) if self.seq[r] is None]
        used = max(self.pos[a] for a in src)
        for a, b in zip(src, dst):
            self.seq[b], self.seq[a] = self.seq[a], None
            self.pos[b] = self.pos[a]
        return src, dst, used

    def next_window(self, steps):
        """The busy rows, and the slots they reach within `steps` decode steps; advances their positions."""
        busy = self.busy()
        reach = max(self.pos[r] for r in busy) + steps
        for r in busy:
            self.pos[r] += steps
        return busy, reach

    def finish(self, outputs):
        """outputs {row: (tokens, log-probs)} of the rows that stopped: their Completions; frees the rows."""
        for r, (tokens, logprobs) in outputs.items():
            i, j = self.seq[r]
            self.results[i][j] = Completion(tokens, logprobs, "stop" if tokens[-1] in self.stop_ids else "length")
            self.seq[r] = None


# -----------------------------------------------------------------------------
# The runner: the KV cache and the rows' state on the device; prefill, prefix copies, decode steps


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


class Runner:
    """The scheduler's decisions carried out on the device: row r of the cache and of every tensor below is
    the scheduler's row r. A row fed token t at position p samples the token at p + 1."""

    def __init__(self, model, cache, prompts, rows, max_len, max_new_tokens, sampling, stop_ids, seed, first_index,
                 compile):
        cfg, device = model.config, cache.k.device
        self.model, self.cache, self.prompts, self.rows, self.max_len = model, cache, prompts, rows, max_len
        self.max_new_tokens, self.sampling, self.seed, self.first_index = max_new_tokens, sampling, seed, first_index
        self.device, self.context, self.compiled = device, cfg.max_position_embeddings, compile
        self.steps = self.row_steps = 0  # decode steps, and rows decoded summed over them (stats)
        # (rows,) each: the input token, its position, tokens generated, their limit; and not finished
        self.tok, self.pos, self.count, self.limit, self.alive = (torch.zeros(rows, dtype=dtype, device=device)
                                                                  for dtype in 4 * (torch.long,) + (torch.bool,))
        # (rows, max_new_tokens + 1) each, per row and step: token, log-prob, uniform; one spare column: a
        # finished row keeps writing at its count, past its last token
        self.out_tok, self.out_lp, self.draws = (torch.zeros(rows, max_new_tokens + 1, dtype=dtype, device=device)
                                                 for dtype in (torch.long, torch.float32, torch.float64))
        self.is_stop = torch.zeros(cfg.vocab_size, dtype=torch.bool, device=device)  # (V,) a lookup, not a search
        self.is_stop[stop_ids] = True
        self.step_fn = decode_step
        if compile:  # one dynamic graph for all the shapes (CUDA graphs are recorded per bucket)
            cuda = device.type == "cuda"
            self.step_fn = torch.compile(decode_step, dynamic=True, mode="reduce-overhead" if cuda else None)
            if cuda:  # the cache is written in place inside the graph, at a fixed address
                torch._dynamo.mark_static_address(cache.k), torch._dynamo.mark_static_address(cache.v)

    def admit(self, new, prefill, copies):
        """Readies the rows of newly admitted sequences (Scheduler.admit's three lists)."""
        if not new:
            return
        self.prefill(prefill)
        if copies:  # all shared prefixes in one indexed copy; the slots past a prompt are don't-care
            src, dst, slots = zip(*copies)
            self.copy_cache_rows(src, dst, max(slots))
        state = torch.tensor([[r, self.prompts[i][-1], len(self.prompts[i]) - 1,
                               min(self.max_new_tokens, self.context - len(self.prompts[i])),
                               sequence_key(self.seed, self.first_index + i, j)] for r, i, j in new]).to(self.device)
        r = state[:, 0]  # (new,): the rows; then each row's first input token, its position, limit, random stream
        self.tok[r], self.pos[r], self.limit[r], self.count[r], self.alive[r] = *state[:, 1:4].T, 0, True
        self.draws[r] = uniform(state[:, 4:], torch.arange(self.max_new_tokens + 1, device=self.device))  # all steps

    def prefill(self, rows_of):
        """prompt[:-1] of each prompt i into cache row rows_of[i], in chunks of about PREFILL_TOKENS."""
        todo = sorted(((len(self.prompts[i]) - 1, i, r) for i, r in rows_of.items()), reverse=True)
        while todo and todo[0][0] > 0:  # a one-token prompt has nothing to prefill
            T = todo[0][0]  # longest first: a chunk pads to its first prompt
            chunk, todo = todo[:max(1, PREFILL_TOKENS // T)], todo[max(1, PREFILL_TOKENS // T):]
            idx = torch.zeros(len(chunk), T, dtype=torch.long)  # (chunk, T)
            for b, (L, i, _) in enumerate(chunk):
                idx[b, :L] = torch.tensor(self.prompts[i][:-1])
            # Positions 0..T-1 (None): causal attention over the chunk, no mask. Padding continues the
            # positions past the prompt: it writes slots that the row's own decode overwrites before any
            # query can see them. The head returns nothing: no logits.
            rows = torch.tensor([r for _, _, r in chunk], device=self.device)
            self.model(idx.to(self.device), kv_cache=window(self.cache, self.rows, T), cache_rows=rows,
                       head=lambda h, w: None)

    def copy_cache_rows(self, src, dst, slots):
        s, d = torch.tensor(src, device=self.device), torch.tensor(dst, device=self.device)
        for t in (self.cache.k, self.cache.v):
            t[:, d, :slots] = t[:, s, :slots]

    def move(self, src, dst, slots):
        """Rows src -> rows dst (Scheduler.pack): their first `slots` cache slots and their state."""
        self.copy_cache_rows(src, dst, slots)
        s, d = torch.tensor(src, device=self.device), torch.tensor(dst, device=self.device)
        for t in (self.tok, self.pos, self.count, self.limit, self.alive, self.out_tok, self.out_lp, self.draws):
            t[d] = t[s]

    def decode_window(self, busy, reach, steps):
        """`steps` decode steps of rows 0..busy[-1] over the slots they reach (< reach), with no host sync, then
        the window's one read -> {row: (tokens, log-probs)} of the busy rows that stopped. Slots come in blocks
        of 64, rows and blocks in buckets when compiled: fewer shapes."""
        rows, slots = busy[-1] + 1, -(-reach // 64)
        if self.compiled:
            rows, slots = min(self.rows, bucket(rows)), bucket(slots)
        slots = min(self.max_len, 64 * slots)
        row_ids = torch.arange(rows, device=self.device)
        # the state of the decoded rows: views, so the in-place updates below write the full tensors
        tok, pos, count, limit, alive = (t[:rows] for t in (self.tok, self.pos, self.count, self.limit, self.alive))
        pos.clamp_(max=slots - 1)  # free rows decode garbage, inside the window (live ones are < slots)
        for _ in range(steps):
            nxt, lp = self.step_fn(self.model, self.cache, slots, tok, pos, self.draws[row_ids, count], *self.sampling)
            self.out_tok[row_ids, count], self.out_lp[row_ids, count] = nxt, lp
            count += alive
            alive &= (count < limit) & ~self.is_stop[nxt]
            tok.copy_(nxt)
            pos += alive  # finished and free rows stay where they are, inside the window
        self.steps, self.row_steps = self.steps + steps, self.row_steps + steps * rows
        running = self.alive[:rows].tolist()  # the window's one host read
        done = [r for r in busy if not running[r]]
        if not done:
            return {}
        d = torch.tensor(done, device=self.device)  # a second read, of the columns written only
        counts = self.count[d].tolist()
        tokens, logprobs = self.out_tok[d, :max(counts)].tolist(), self.out_lp[d, :max(counts)].tolist()
        return {r: (t[:c], lp[:c]) for r, c, t, lp in zip(done, counts, tokens, logprobs)}


# -----------------------------------------------------------------------------
# generate(): the scheduler decides, the runner carries it out, one window of decode steps at a time


def check_inputs(model, prompts, stop_ids, vocab_size, n, max_new_tokens, max_batch, temperature, top_p, top_k,
                 sync_every, first_index, seed):
    """Bad input, refused before any work, naming what was expected."""
    if not isinstance(prompts, (list, tuple)) or not prompts:
        raise ValueError("prompts: expected a non-empty list of token-id lists")
    V, context = model.config.vocab_size, model.config.max_position_embeddings
    if not 0 < vocab_size <= V:
        raise ValueError(f"vocab_size={vocab_size}: expected 1..{V} (the model's vocab_size)")
    not_ids = lambda ids: [t for t in ids if not (isinstance(t, int) and 0 <= t < V)]  # noqa: E731
    for i, p in enumerate(prompts):
        if len(p) == 0:
            raise ValueError(f"prompts[{i}] is empty: expected at least one token id")
        if len(p) >= context:
            raise ValueError(f"prompts[{i}] has {len(p)} tokens: the model's context is {context} "
                             f"(max_position_embeddings), which leaves no room for a new token")
        if not_ids(p):
            raise ValueError(f"prompts[{i}] holds token id {not_ids(p)[0]!r}: expected ints in [0, {V})")
    if not_ids(stop_ids):
        raise ValueError(f"stop_ids holds {not_ids(stop_ids)[0]!r}: expected ints in [0, {V})")
    is_int = lambda x, low: isinstance(x, int) and x >= low  # noqa: E731
    for name, value, ok, expected in (
            ("n", n, is_int(n, 1), "an int >= 1 (samples per prompt)"),
            ("max_new_tokens", max_new_tokens, is_int(max_new_tokens, 1), "an int >= 1"),
            ("max_batch", max_batch, is_int(max_batch, 1), "an int >= 1"),
            ("temperature", temperature, temperature >= 0, ">= 0 (0 = greedy)"),
            ("top_p", top_p, 0 < top_p <= 1, "a value in (0, 1]"),
            ("top_k", top_k, is_int(top_k, 0), "an int >= 0 (0 = no top-k)"),
            ("sync_every", sync_every, sync_every is None or is_int(sync_every, 1), "an int >= 1 (steps per read)"),
            ("first_index", first_index, is_int(first_index, 0), "an int >= 0"),
            ("seed", seed, seed is None or isinstance(seed, int), "an int or None")):
        if not ok:
            raise ValueError(f"{name}={value!r}: expected {expected}")


def check_cache(cache, model, rows, slots):
    k, w, cfg = cache.k, model.embed_tokens.weight, model.config
    layers, kv, hd = cfg.num_hidden_layers, cfg.num_key_value_heads, cfg.head_dim  # as new_cache allocates
    if not (k.dim() == 5 and (k.shape[0], *k.shape[3:]) == (layers, kv, hd) and k.shape[1] >= rows
            and k.shape[2] >= slots and k.dtype == w.dtype and k.device == w.device):
        raise ValueError(f"cache.k is {tuple(k.shape)} {k.dtype} on {k.device}: expected ({layers}, >= {rows} rows, >= "
                         f"{slots} slots, {kv}, {hd}) {w.dtype} on {w.device} (see new_cache)")


@torch.inference_mode()  # no autograd bookkeeping at all: cheaper than no_grad for small decode ops
def generate(model: Transformer, prompts: list[list[int]], max_new_tokens: int, temperature=1.0, top_p=1.0,
             top_k=0, stop_ids=(), n=1, seed=None, vocab_size=None, max_batch=64, refill=True,
             sync_every=None, compile=False, stats=None, first_index=0, cache=None) -> list[list[Completion]]:
    """Samples n completions of each prompt; result[i][j] is the j-th completion of prompts[i].

    temperature 0 is greedy. Log-probs are those of the distribution each token was drawn from:
    log_softmax(logits / temperature) over the kept set (ids < vocab_size, top_k, top_p), renormalised over it.
    With top_k=0, top_p=1 that is the tempered log-softmax over the real vocabulary, what an RL trainer computes
    (degrpo.py samples so); with top_k or top_p < 1 it is NOT the trainer's log-prob of the same token (it is
    larger: the kept mass is < 1). Greedy reports log_softmax(logits) at the token.
    vocab_size: ids >= vocab_size (padded embedding rows) are never sampled; default all rows.
    seed: the same seed gives the same tokens for any max_batch and refill, if the model gives the same logits
    (log-probs may differ in the last bits: matmuls round differently for other batch shapes). seed=None draws
    a seed from torch's global RNG: ranks sample different numbers unless seeded alike; pass them one seed.
    max_batch: rows decoded together (the KV cache has max_batch rows of the longest prompt + max_new_tokens
    slots). refill=False admits a new batch only once every row has finished (the static batching baseline of
    the benchmark). sync_every: decode steps between host reads of the rows' state (default 1 on CPU, 8 on CUDA;
    a finished row idles until the next read).
    compile: the decode step compiled (module docstring), for a GPU: on a CPU the eager step is faster.
    stats: a dict, if given, receives steps, row_steps (rows decoded, summed over steps), tokens.
    first_index: the index of prompts[0] in a larger batch split over calls (or ranks): prompt i draws its
    numbers as prompt first_index + i, so a split batch samples what the whole batch would.
    cache: a KVCache from new_cache() with at least min(max_batch, len(prompts) * n) rows and the slots of the
    longest prompt + max_new_tokens - 1, reused (its old contents are never read); default: a new one.
    """
    cfg, device = model.config, model.embed_tokens.weight.device
    vocab_size = cfg.vocab_size if vocab_size is None else vocab_size
    stop_ids = [stop_ids] if isinstance(stop_ids, int) else list(stop_ids)
    check_inputs(model, prompts, stop_ids, vocab_size, n, max_new_tokens, max_batch, temperature, top_p, top_k,
                 sync_every, first_index, seed)
    seed = int(torch.randint(0, 2**31, ())) if seed is None else seed  # torch's global RNG: see the docstring
    sync_every = (8 if device.type == "cuda" else 1) if sync_every is None else sync_every
    rows, longest = min(max_batch, len(prompts) * n), max(len(p) for p in prompts)
    max_len = min(longest + max_new_tokens - 1, cfg.max_position_embeddings)  # the last new token is never fed
    cache = new_cache(model, rows, longest, max_new_tokens) if cache is None else cache
    check_cache(cache, model, rows, max_len)
    scheduler = Scheduler(prompts, n, rows, stop_ids)
    runner = Runner(model, cache, prompts, rows, max_len, max_new_tokens, (temperature, top_p, top_k, vocab_size),
                    stop_ids, seed, first_index, compile)
    while scheduler.waiting or scheduler.busy():
        if scheduler.waiting and (refill or not scheduler.busy()):
            runner.admit(*scheduler.admit())
        elif not scheduler.waiting and scheduler.busy()[-1] >= 2 * len(scheduler.busy()):  # sparse: pack
            runner.move(*scheduler.pack())
        busy, reach = scheduler.next_window(sync_every)
        scheduler.finish(runner.decode_window(busy, reach, sync_every))
    if stats is not None:
        stats.update(steps=runner.steps, row_steps=runner.row_steps,
                     tokens=sum(len(c.tokens) for group in scheduler.results for c in group))
    return scheduler.results
