"""sampler.py against transformers: greedy tokens equal to HF generate, log-probs equal to HF's full
forward, sampled tokens inside the top-k / top-p / vocabulary set computed from HF's logits; the
same tokens whatever the batch, refill and sync_every; greedy on a GPU (skipped without one)."""

import copy
import math

import pytest
import torch
from conftest import make_hf_model, needs_cuda, save_hf_model

from model import KVCache, ModelConfig, Transformer
from sampler import bucket, generate, hash32, new_cache, sample, sequence_key, uniform


def random_prompts(lengths, vocab, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (L,), generator=g).tolist() for L in lengths]


@pytest.fixture(scope="module", params=["qwen2", "qwen3"])
def models(request, tmp_path_factory):
    """(transformers model, our model loaded from its checkpoint in fp32)."""
    hf = make_hf_model(request.param)
    # A random init gives near-uniform logits (near-ties everywhere); sharpen them so that the
    # sampling tests see a distribution with a head and a tail, in both models alike.
    with torch.no_grad():
        hf.lm_head.weight.mul_(40)
    path = save_hf_model(hf, tmp_path_factory.mktemp(request.param) / "ckpt")
    return hf, Transformer.from_pretrained(path, dtype=torch.float32)


def hf_logits(hf, prompt, tokens):
    """HF full forward over prompt + tokens -> (len(tokens), V) fp64 logits that predicted each token."""
    with torch.no_grad():
        logits = hf(torch.tensor([prompt + tokens])).logits[0].double()
    return logits[len(prompt) - 1:len(prompt) - 1 + len(tokens)]


PROMPTS = random_prompts([1, 5, 17, 3, 30], 320)


@pytest.mark.parametrize("max_batch,sync_every", [(2, 1), (16, 1), (3, 4)], ids=["refill", "one-batch", "sync4"])
def test_greedy_matches_transformers(models, max_batch, sync_every):
    """48+ tokens (past the 64-slot attention window) on prompts of 1 to 30 tokens."""
    hf, ours = models
    got = generate(ours, PROMPTS, 48, temperature=0, n=2, max_batch=max_batch, sync_every=sync_every)
    hf.generation_config.eos_token_id = None  # never stop early: 48 tokens each
    for p, group in zip(PROMPTS, got):
        x = torch.tensor([p])  # an explicit mask: a prompt token equal to pad_token_id stays visible
        ref = hf.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=48, do_sample=False,
                          pad_token_id=0)[0, len(p):]
        for c in group:  # both samples of a group (one prefilled, one copied) are greedy
            assert c.tokens == ref.tolist()
            assert c.finish_reason == "length" and len(c.logprobs) == 48


@needs_cuda("greedy tokens on the GPU (fp32, the CUDA default sync_every=8) equal to transformers' generate")
def test_greedy_matches_transformers_cuda(models):
    hf, ours = (copy.deepcopy(m).cuda() for m in models)
    got = generate(ours, PROMPTS, 48, temperature=0, n=2, max_batch=3)  # refill; sync_every defaults to 8
    hf.generation_config.eos_token_id = None
    for p, group in zip(PROMPTS, got):
        x = torch.tensor([p], device="cuda")
        ref = hf.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=48, do_sample=False,
                          pad_token_id=0)[0, len(p):]
        for c in group:
            assert c.tokens == ref.tolist() and c.finish_reason == "length"


@needs_cuda("greedy tokens of our bf16 sampler on the GPU against transformers' fp32 logits")
def test_greedy_bf16_cuda(models):
    """In bf16 a near-tie between the two largest logits may resolve either way, so a sequence may
    leave transformers' fp32 one: each of our tokens is checked instead against transformers' fp32
    logits of our own sequence (teacher forcing): its logit is within bf16 noise of the largest,
    the noise being twice transformers' own bf16-vs-fp32 logit error on that sequence (or twice one
    bf16 rounding, 2^-8, of the largest logit, if larger)."""
    hf32 = copy.deepcopy(models[0]).cuda()
    hf16 = copy.deepcopy(hf32).to(torch.bfloat16)
    ours = copy.deepcopy(models[1]).to("cuda", torch.bfloat16)
    got = generate(ours, PROMPTS, 48, temperature=0, max_batch=3)
    for p, (c,) in zip(PROMPTS, got):
        assert len(c.tokens) == 48 and c.finish_reason == "length"
        with torch.no_grad():
            x = torch.tensor([p + c.tokens], device="cuda")
            z32, z16 = (m(x).logits[0, len(p) - 1:-1].double() for m in (hf32, hf16))  # (48, V)
        noise = 2 * max((z16 - z32).abs().max().item(), 2**-8 * z32.abs().max().item())
        chosen = z32.gather(-1, torch.tensor(c.tokens, device="cuda")[:, None])[:, 0]
        assert (z32.max(-1).values - chosen).max().item() <= noise


@pytest.mark.parametrize("temperature,top_k,top_p,vocab_size", [(1.0, 0, 1.0, None), (0.7, 0, 1.0, None),
                                                                  (0.8, 7, 1.0, 300), (1.3, 0, 0.6, None),
                                                                  (0.0, 0, 1.0, 300)])
def test_logprobs_equal_full_forward(models, temperature, top_k, top_p, vocab_size):
    """Every token's log-prob is HF's log-softmax at it, after the same temperature / top-k / top-p /
    vocabulary cut; stop ids make rows end at different times (refill)."""
    hf, ours = models
    got = generate(ours, PROMPTS, 24, temperature=temperature, top_k=top_k, top_p=top_p, stop_ids=(7, 11, 13),
                   n=3, seed=5, vocab_size=vocab_size, max_batch=4)
    for p, group in zip(PROMPTS, got):
        for c in group:
            z = hf_logits(hf, p, c.tokens)  # (T, V)
            if vocab_size:
                z[:, vocab_size:] = -math.inf
            z = z / (temperature or 1.0)
            if top_k:
                z[z < z.topk(top_k, -1).values[:, -1:]] = -math.inf
            if top_p < 1:
                s, order = z.sort(-1, descending=True)
                pr = s.softmax(-1)
                s[pr.cumsum(-1) - pr >= top_p] = -math.inf
                z = torch.empty_like(z).scatter_(-1, order, s)
            ref = z.log_softmax(-1).gather(-1, torch.tensor(c.tokens)[:, None])[:, 0]
            torch.testing.assert_close(torch.tensor(c.logprobs, dtype=torch.float64), ref, atol=1e-4, rtol=0)
            assert ref.isfinite().all()  # so every token was inside the allowed set
            if temperature == 0:
                assert c.tokens == z.argmax(-1).tolist()
            stopped = [t for t in c.tokens if t in (7, 11, 13)]
            assert stopped == ([c.tokens[-1]] if c.finish_reason == "stop" else [])
            assert c.finish_reason == "stop" or len(c.tokens) == 24


def test_top_k_top_p_vocab_never_leave_the_allowed_set(models):
    """Many draws (64 samples x 16 tokens per setting); the allowed set is computed from HF's logits
    in fp64, with 1e-6 of slack in the top-p mass for the fp32 rounding of our sampler."""
    hf, ours = models
    prompt = PROMPTS[2]
    for kw in (dict(top_k=3), dict(top_p=0.5), dict(top_k=20, top_p=0.3), dict(vocab_size=100)):
        got = generate(ours, [prompt], 16, temperature=1.5, n=64, seed=1, max_batch=32, **kw)[0]
        for c in got:
            z = hf_logits(hf, prompt, c.tokens) / 1.5  # (T, V)
            chosen = z.gather(-1, torch.tensor(c.tokens)[:, None])  # (T, 1)
            larger = z > chosen  # tokens ranked above the chosen one
            if "top_k" in kw:
                assert (larger.sum(-1) < kw["top_k"]).all()
            if "top_p" in kw:  # the mass above the chosen token has not reached top_p yet
                pr = z.softmax(-1)
                assert ((pr * larger).sum(-1) < kw["top_p"] + 1e-6).all()
            if "vocab_size" in kw:
                assert max(c.tokens) < kw["vocab_size"]


def test_padded_rows_never_sampled(tmp_path):
    """Make the padded rows (ids 300..319) the most likely tokens by far: never emitted anyway."""
    ours = Transformer.from_pretrained(save_hf_model(make_hf_model("qwen2"), tmp_path / "m"), dtype=torch.float32)
    with torch.no_grad():
        ours.lm_head.weight[300:] = ours.lm_head.weight[:20] * 200  # logits 200x those of ids 0..19
    free = generate(ours, PROMPTS, 8, temperature=1.0, n=4, seed=0)
    assert sum(t >= 300 for g in free for c in g for t in c.tokens) > 0.5 * 8 * 4 * len(PROMPTS)
    for temperature in (0.0, 1.0, 3.0):
        got = generate(ours, PROMPTS, 8, temperature=temperature, n=4, seed=0, vocab_size=300)
        assert all(t < 300 for g in got for c in g for t in c.tokens)


def test_stop_ids_end_rows_and_are_included(models):
    _, ours = models
    free = generate(ours, PROMPTS, 40, temperature=0)
    toks = free[4][0].tokens
    k = next(k for k in range(5, 40) if toks[k] not in toks[:k])  # first time some token appears
    got = generate(ours, PROMPTS, 40, temperature=0, stop_ids=[toks[k]], max_batch=2)
    assert got[4][0].tokens == toks[:k + 1] and got[4][0].finish_reason == "stop"
    for f, g in zip(free, got):  # every row stops at the first occurrence, or runs to the length
        t = f[0].tokens
        end = t.index(toks[k]) + 1 if toks[k] in t else 40
        assert g[0].tokens == t[:end]
        assert g[0].finish_reason == ("stop" if toks[k] in t else "length")


def test_same_seed_same_completions_whatever_the_batch(models):
    _, ours = models
    kw = dict(temperature=1.0, top_p=0.9, stop_ids=(3, 4, 5), n=3, seed=123)
    runs = [generate(ours, PROMPTS, 70, max_batch=b, refill=r, sync_every=s, **kw)
            for b, r, s in ((1, True, 1), (4, True, 1), (4, False, 1), (64, True, 1), (4, True, 5))]
    tokens = [[(c.tokens, c.finish_reason) for g in run for c in g] for run in runs]
    for run, t in zip(runs[1:], tokens[1:]):  # log-probs carry the batch shape's fp32 rounding
        assert t == tokens[0]
        for a, b in zip(sum(run, []), sum(runs[0], [])):
            torch.testing.assert_close(a.logprobs, b.logprobs, atol=1e-4, rtol=0)
    other = generate(ours, PROMPTS, 70, **{**kw, "seed": 124})
    assert [(c.tokens, c.finish_reason) for g in other for c in g] != tokens[0]
    assert len({tuple(c.tokens) for c in runs[0][1]}) == 3  # the samples of a group differ
    torch.manual_seed(0)  # seed=None draws the seed from torch's RNG
    a = generate(ours, PROMPTS, 5, seed=None)
    torch.manual_seed(0)
    assert generate(ours, PROMPTS, 5, seed=None) == a


def test_sync_every_8_same_tokens_as_1(models):
    """sync_every=8 (the CUDA default: the host reads the rows' state every 8 steps) against 1: rows
    that stop mid-window idle until the read, and the refill then puts new sequences in their rows;
    none of it may change a token or add one past a stop."""
    _, ours = models
    kw = dict(temperature=1.0, stop_ids=tuple(range(0, 320, 10)), n=3, seed=7, max_batch=4)  # 1 id in 10 stops
    one, stats = generate(ours, PROMPTS, 40, sync_every=1, **kw), {}
    eight = generate(ours, PROMPTS, 40, sync_every=8, stats=stats, **kw)
    assert [(c.tokens, c.finish_reason) for g in eight for c in g] == [(c.tokens, c.finish_reason)
                                                                        for g in one for c in g]
    for a, b in zip(sum(eight, []), sum(one, [])):
        torch.testing.assert_close(a.logprobs, b.logprobs, atol=1e-4, rtol=0)
    lengths = [len(c.tokens) for g in one for c in g]
    assert sum(L % 8 != 0 and L < 40 for L in lengths) >= 10  # rows did stop mid-window, and were refilled
    assert stats["steps"] % 8 == 0


def test_long_tail_packs_rows(models):
    """Three rows end early (their prompts fill the context), the fourth (last row) runs on: it is
    moved to row 0 and decoded alone, with the same tokens and HF's log-probs."""
    hf, ours = models
    prompts = random_prompts([500, 501, 502, 3], 320, seed=1)
    stats = {}
    got = generate(ours, prompts, 40, seed=3, max_batch=4, stats=stats)
    assert [len(g[0].tokens) for g in got] == [12, 11, 10, 40]
    assert stats["row_steps"] < 4 * 12 + 28 + 4  # four rows for at most 12 steps, one row after
    solo = generate(ours, prompts, 40, seed=3, max_batch=1)[3][0]  # one row: never packed
    assert got[3][0].tokens == solo.tokens
    ref = hf_logits(hf, prompts[3], solo.tokens).log_softmax(-1).gather(-1, torch.tensor(solo.tokens)[:, None])[:, 0]
    torch.testing.assert_close(torch.tensor(got[3][0].logprobs, dtype=torch.float64), ref, atol=1e-4, rtol=0)


def test_a_given_cache_is_reused(models):
    """One cache, larger than needed and holding another call's keys/values, serves call after call:
    the same completions as a fresh cache each time. One too small (or of another dtype) is refused."""
    _, ours = models
    kw = dict(temperature=1.0, stop_ids=(3, 4, 5), n=3, seed=7, max_batch=4)
    fresh = generate(ours, PROMPTS, 30, **kw)
    cache = new_cache(ours, 6, 40, 30)
    torch.nn.init.normal_(cache.k, std=100), torch.nn.init.normal_(cache.v, std=100)  # stale contents
    for _ in range(2):
        assert generate(ours, PROMPTS, 30, cache=cache, **kw) == fresh
    wrong_dtype = KVCache(ours.config, 6, 69, torch.float64, "cpu")
    for bad in (new_cache(ours, 6, 29, 30), new_cache(ours, 3, 40, 30), wrong_dtype):
        with pytest.raises(ValueError, match=r"cache.k is \(2, \d, \d+, 2, \d+\) torch.float\d+ on cpu: expected"):
            generate(ours, PROMPTS, 30, cache=bad, **kw)


def test_compiled_decoding_equals_eager(monkeypatch):
    """compile=True: the decode step traced by torch.compile (dynamic shapes, the cache written in place
    inside the graph, rows and slots bucketed) samples the eager tokens. The backend is aot_eager (the
    graph dynamo and AOTAutograd capture, run op by op): inductor's code generation takes minutes on
    this CPU and is torch's to test, the capture is ours. One layer: tracing time grows with the layers.
    A cache with spare rows keeps the rows decoded below its size (no recompile for a duck-sized shape)."""
    import functools

    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=4,
                      num_key_value_heads=2, head_dim=8, max_position_embeddings=64, dtype="float32")
    model = Transformer(cfg).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(20)  # peaked distributions: a wrong logit would change tokens
    torch._dynamo.reset()
    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend="aot_eager"))
    prompts = random_prompts([3, 9, 1], 64)
    kw = dict(temperature=1.0, stop_ids=(3, 4, 5), n=2, seed=11, max_batch=5)
    eager = generate(model, prompts, 12, **kw)
    compiled = generate(model, prompts, 12, compile=True, cache=new_cache(model, 8, 30, 12), **kw)
    assert [[c.tokens for c in g] for g in compiled] == [[c.tokens for c in g] for g in eager]
    assert len({len(c.tokens) for g in eager for c in g}) > 2  # rows end at different steps: several shapes
    for a, b in zip(sum(compiled, []), sum(eager, [])):
        torch.testing.assert_close(a.logprobs, b.logprobs, atol=1e-4, rtol=0)
    assert [bucket(n) for n in range(1, 14)] == [1, 2, 3, 4, 6, 6, 8, 8, 12, 12, 12, 12, 16]


def test_context_limit_ends_with_length(models):
    _, ours = models
    prompt = random_prompts([505], 320)[0]  # max_position_embeddings is 512
    got = generate(ours, [prompt, [1, 2]], 48, temperature=0)
    assert len(got[0][0].tokens) == 7 and got[0][0].finish_reason == "length"
    assert len(got[1][0].tokens) == 48


def test_sampling_follows_softmax():
    """The hashed uniforms give token frequencies of softmax(logits / T) (a chi-square bound), are
    uniform themselves, and differ between sequences and steps."""
    torch.manual_seed(0)
    logits = torch.randn(1, 10) * 1.5
    N = 40000
    keys = torch.tensor([sequence_key(0, i, 0) for i in range(N)])
    toks, lp = sample(logits.expand(N, 10), uniform(keys, torch.zeros(N, dtype=torch.long)), 0.8, 1.0, 0, 10)
    expected = torch.softmax(logits[0] / 0.8, -1) * N
    chi2 = ((torch.bincount(toks, minlength=10) - expected) ** 2 / expected).sum()
    assert chi2 < 33.7  # the 0.9999 quantile of chi-square with 9 degrees of freedom
    torch.testing.assert_close(lp, torch.log_softmax(logits[0] / 0.8, -1)[toks])
    u = uniform(keys[:1].expand(N), torch.arange(N))  # one sequence, N steps
    counts = torch.histc(u.float(), 20, 0, 1)
    assert ((counts - N / 20) ** 2 / (N / 20)).sum() < 43.8  # 0.9999 quantile, 19 degrees of freedom
    xs = [0, 1, 2, 12345, 2**31 - 1, 2**31, 2**32 - 1]  # the hash is exact in int64 (no overflow)
    assert hash32(torch.tensor(xs)).tolist() == [hash32(x) for x in xs]
    assert (u > 0).all() and (u < 1).all() and len(set(uniform(keys, torch.zeros(N, dtype=torch.long)).tolist())) == N


@pytest.mark.parametrize("kw,match", [
    (dict(prompts=[[1, 2], []]), r"prompts\[1\] is empty"),
    (dict(prompts=[list(range(100)) * 6]), r"prompts\[0\] has 600 tokens.*context is 512"),
    (dict(prompts=[[1, 320]]), r"prompts\[0\] holds token id 320"),
    (dict(prompts=[[1, -1]]), r"prompts\[0\] holds token id -1"),
    (dict(n=0), r"n=0"),
    (dict(top_p=0.0), r"top_p=0.0"),
    (dict(top_p=1.5), r"top_p=1.5"),
    (dict(temperature=-1), r"temperature=-1"),
    (dict(vocab_size=400), r"vocab_size=400"),
    (dict(stop_ids=[999]), r"stop_ids holds 999"),
    (dict(prompts=[]), r"non-empty list"),
    (dict(sync_every=0), r"sync_every=0"),  # would decode no step per window: a hang
    (dict(first_index=-1), r"first_index=-1"),
    (dict(seed=1.5), r"seed=1.5"),
])
def test_bad_input(models, kw, match):
    _, ours = models
    args = dict(prompts=[[1, 2, 3]], max_new_tokens=4)
    args.update(kw)
    with pytest.raises(ValueError, match=match):
        generate(ours, **args)
