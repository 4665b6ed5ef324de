"""model.py against transformers' Qwen2/Qwen3: logits (and in bf16 on a GPU), checkpoint round trips, bad inputs."""

import copy
import json
import os

import pytest
import torch
from conftest import BASE_MODEL_DIR, make_hf_model, needs_cuda, save_hf_model

from model import KVCache, ModelConfig, Transformer, load_config


def _batch(vocab=320, B=3, T=19, seed=1):
    return torch.randint(0, vocab, (B, T), generator=torch.Generator().manual_seed(seed))


def test_logits_match_transformers(hf_checkpoint):
    hf, path = hf_checkpoint
    ours = Transformer.from_pretrained(path, dtype=torch.float32)
    for idx in (_batch(), _batch(T=1)):  # T = 1 takes the folded (decode) attention path
        with torch.no_grad():
            expected, got = hf(idx).logits, ours(idx)
        assert expected.std() > 0.05  # random weights give non-trivial logits
        torch.testing.assert_close(got, expected, atol=1e-4, rtol=0)


@needs_cuda("our bf16 logits on the GPU against transformers' fp32 ones, as close as transformers' own bf16")
def test_logits_match_transformers_cuda_bf16(hf_checkpoint):
    """No fixed tolerance suits bf16 (8 significant bits; the error grows with the logits), so the
    yardstick is transformers' own bf16 model on the same GPU: our error against the fp32 truth is
    at most twice its error (the two round at different points: RoPE, the decode attention's
    folded heads, RMSNorm), or twice one bf16 rounding of the largest logit (2^-8), if larger."""
    hf, path = hf_checkpoint
    hf32 = hf.to("cuda")
    hf16 = copy.deepcopy(hf32).to(torch.bfloat16)
    ours = Transformer.from_pretrained(path, dtype=torch.bfloat16, device="cuda")
    assert ours.embed_tokens.weight.is_cuda and ours.embed_tokens.weight.dtype == torch.bfloat16
    for idx in (_batch(), _batch(T=1)):  # T = 1 takes the folded (decode) attention path
        idx = idx.cuda()
        with torch.no_grad():
            truth, theirs, got = hf32(idx).logits, hf16(idx).logits.float(), ours(idx).float()
        bound = 2 * max((theirs - truth).abs().max().item(), 2**-8 * truth.abs().max().item())
        assert (got - truth).abs().max().item() <= bound


def test_sharded_checkpoint(tmp_path):
    hf = make_hf_model("qwen3")
    path = save_hf_model(hf, tmp_path / "sharded", max_shard_size="40KB")
    assert os.path.isfile(os.path.join(path, "model.safetensors.index.json"))
    ours = Transformer.from_pretrained(path, dtype=torch.float32)
    idx = _batch()
    with torch.no_grad():
        torch.testing.assert_close(ours(idx), hf(idx).logits, atol=1e-4, rtol=0)


@pytest.mark.parametrize("shard_bytes", [None, 50_000])
def test_round_trip_through_transformers(hf_checkpoint, tmp_path, shard_bytes):
    import transformers

    hf, path = hf_checkpoint
    ours = Transformer.from_pretrained(path, dtype=torch.float32)
    out = tmp_path / "ours"
    ours.save_pretrained(out, **({"max_shard_bytes": shard_bytes} if shard_bytes else {}))
    files = os.listdir(out)
    assert ("model.safetensors.index.json" in files) == bool(shard_bytes)
    assert not [f for f in os.listdir(tmp_path) if ".tmp-" in f or ".old-" in f]  # nothing left behind
    reloaded_hf = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    reloaded_ours = Transformer.from_pretrained(out, dtype=torch.float32)
    idx = _batch()
    with torch.no_grad():
        expected = hf(idx).logits
        torch.testing.assert_close(reloaded_hf(idx).logits, expected, atol=1e-4, rtol=0)
        torch.testing.assert_close(reloaded_ours(idx), expected, atol=1e-4, rtol=0)
    if hf.config.tie_word_embeddings:
        from safetensors import safe_open

        for file in [f for f in files if f.endswith(".safetensors")]:
            with safe_open(os.path.join(out, file), "pt") as f:
                assert "lm_head.weight" not in f.keys()


def test_bf16_load_and_tied_weights(tmp_path):
    hf = make_hf_model("qwen2", tied=True)
    path = save_hf_model(hf, tmp_path / "m")
    ours = Transformer.from_pretrained(path, dtype=torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in ours.parameters())
    assert ours.lm_head.weight is ours.embed_tokens.weight
    assert ours.lm_head.weight.data_ptr() == ours.embed_tokens.weight.data_ptr()
    # dtype=None keeps the checkpoint's dtype (fp32 here)
    assert Transformer.from_pretrained(path).embed_tokens.weight.dtype == torch.float32


def test_kv_cache_matches_full_forward(tmp_path):
    """Prefill into chosen cache rows, then decode token by token: same logits as one full forward."""
    hf = make_hf_model("qwen3")
    ours = Transformer.from_pretrained(save_hf_model(hf, tmp_path / "m"), dtype=torch.float32)
    idx = _batch(B=2, T=12)
    with torch.no_grad():
        full = ours(idx)
        cache = KVCache(ours.config, rows=4, max_len=32, dtype=torch.float32, device="cpu")
        rows = torch.tensor([3, 1])
        out = ours(idx[:, :5], positions=torch.arange(5).expand(2, 5), kv_cache=cache, cache_rows=rows)
        torch.testing.assert_close(out, full[:, :5], atol=1e-5, rtol=0)
        for t in range(5, 12):
            out = ours(idx[:, t:t + 1], positions=torch.full((2, 1), t), kv_cache=cache, cache_rows=rows)
            torch.testing.assert_close(out[:, 0], full[:, t], atol=1e-5, rtol=0)


def test_prefill_from_position_0_is_causal_without_a_mask(tmp_path, monkeypatch):
    """positions=None with a cache (a prefill from the start of each row, as the sampler's): the same
    keys/values and logits as the masked path, through SDPA with is_causal and no mask (flash attention
    refuses any mask; without it, a GQA prefill falls back to the math kernel's fp32 [rows, heads, T, T])."""
    ours = Transformer.from_pretrained(save_hf_model(make_hf_model("qwen2"), tmp_path / "m"), dtype=torch.float32)
    idx, rows = _batch(B=2, T=12), torch.tensor([2, 0])
    caches = [KVCache(ours.config, rows=3, max_len=12, dtype=torch.float32, device="cpu") for _ in range(2)]
    with torch.no_grad():
        masked = ours(idx, positions=torch.arange(12).expand(2, 12), kv_cache=caches[0], cache_rows=rows)
        calls, sdpa = [], torch.nn.functional.scaled_dot_product_attention
        monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention",
                            lambda *a, **k: calls.append((k["attn_mask"], k["is_causal"])) or sdpa(*a, **k))
        causal = ours(idx, kv_cache=caches[1], cache_rows=rows)
    assert calls == [(None, True)] * ours.config.num_hidden_layers
    torch.testing.assert_close(causal, masked, atol=1e-5, rtol=0)
    torch.testing.assert_close(caches[1].k, caches[0].k, atol=1e-6, rtol=0)
    torch.testing.assert_close(caches[1].v, caches[0].v, atol=1e-6, rtol=0)
    assert caches[1].k[:, 1].abs().sum() == 0 and caches[1].k[:, rows].abs().sum() > 0  # only the given rows


def test_head_hook_gets_hidden_and_lm_head(tmp_path):
    ours = Transformer.from_pretrained(save_hf_model(make_hf_model("qwen2"), tmp_path / "m"), dtype=torch.float32)
    idx = _batch()
    hidden, weight = ours(idx, head=lambda h, w: (h, w))
    assert hidden.shape == (3, 19, 64) and weight is ours.lm_head.weight
    torch.testing.assert_close(hidden @ weight.T, ours(idx))


# -----------------------------------------------------------------------------
# Bad input: each a clear error naming the file and the problem


@pytest.fixture
def saved(tmp_path):
    return save_hf_model(make_hf_model("qwen2"), tmp_path / "m")


def _edit_config(path, **changes):
    file = os.path.join(path, "config.json")
    with open(file) as f:
        cfg = json.load(f)
    cfg.update(changes)
    with open(file, "w") as f:
        json.dump(cfg, f)


def test_missing_config(saved):
    os.remove(os.path.join(saved, "config.json"))
    with pytest.raises(FileNotFoundError, match="config.json"):
        Transformer.from_pretrained(saved)


def test_missing_weights(saved):
    os.remove(os.path.join(saved, "model.safetensors"))
    with pytest.raises(FileNotFoundError, match="no model.safetensors"):
        Transformer.from_pretrained(saved)


def test_unsupported_model_type(saved):
    _edit_config(saved, model_type="llama")
    with pytest.raises(ValueError, match="model_type 'llama'"):
        Transformer.from_pretrained(saved)


@pytest.mark.parametrize("rope", [{"rope_parameters": {"rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0}},
                                  {"rope_scaling": {"type": "linear", "factor": 2.0}}])
def test_unsupported_rope(saved, rope):
    _edit_config(saved, **rope)
    with pytest.raises(ValueError, match="rope type '(yarn|linear)'"):
        Transformer.from_pretrained(saved)


def test_wrong_missing_unexpected_tensors(saved):
    from safetensors.torch import load_file, save_file

    file = os.path.join(saved, "model.safetensors")
    state = load_file(file)
    state["model.norm.weight"] = torch.ones(7)  # wrong shape
    del state["model.layers.1.mlp.up_proj.weight"]  # missing
    state["model.layers.0.extra.weight"] = torch.ones(3)  # unexpected
    save_file(state, file)
    with pytest.raises(ValueError) as err:
        Transformer.from_pretrained(saved)
    msg = str(err.value)
    assert "model.norm.weight" in msg and "(7,)" in msg and "(64,)" in msg
    assert "missing tensor model.layers.1.mlp.up_proj.weight (shape (96, 64))" in msg
    assert "unexpected tensor model.layers.0.extra.weight" in msg


def test_truncated_safetensors(saved):
    file = os.path.join(saved, "model.safetensors")
    data = open(file, "rb").read()
    with open(file, "wb") as f:
        f.write(data[: len(data) // 2])
    with pytest.raises(ValueError, match="model.safetensors: cannot read safetensors"):
        Transformer.from_pretrained(saved)


def test_corrupt_safetensors_header(saved):
    with open(os.path.join(saved, "model.safetensors"), "wb") as f:
        f.write(b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all!")
    with pytest.raises(ValueError, match="cannot read safetensors"):
        Transformer.from_pretrained(saved)


def test_index_points_at_missing_shard(tmp_path):
    path = save_hf_model(make_hf_model("qwen2"), tmp_path / "s", max_shard_size="40KB")
    shard = sorted(f for f in os.listdir(path) if f.endswith(".safetensors"))[-1]
    os.remove(os.path.join(path, shard))
    with pytest.raises(FileNotFoundError, match=f"points at shard .*{shard}"):
        Transformer.from_pretrained(path)


def test_failed_save_keeps_previous_checkpoint(saved, monkeypatch):
    import model as model_module

    ours = Transformer.from_pretrained(saved, dtype=torch.float32)
    ours.save_pretrained(saved)  # overwrite in place works
    before = ours(_batch()).detach()

    def crash(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(model_module, "save_file", crash)
    with torch.no_grad():
        ours.embed_tokens.weight.add_(1.0)
    with pytest.raises(RuntimeError, match="disk full"):
        ours.save_pretrained(saved)
    torch.testing.assert_close(Transformer.from_pretrained(saved, dtype=torch.float32)(_batch()), before)
    assert not [f for f in os.listdir(os.path.dirname(saved)) if ".tmp-" in f]


def test_save_into_a_folder_keeps_its_other_files(saved):
    """A user puts the tokenizer in first: saving the weights must not delete it."""
    for name in ("tokenizer.json", "notes.txt"):
        with open(os.path.join(saved, name), "w") as f:
            f.write(name)
    ours = Transformer.from_pretrained(saved, dtype=torch.float32)
    ours.save_pretrained(saved)
    for name in ("tokenizer.json", "notes.txt"):
        assert open(os.path.join(saved, name)).read() == name
    files = set(os.listdir(saved))  # transformers' generation_config.json too
    assert {"config.json", "model.safetensors", "notes.txt", "tokenizer.json"} <= files, files
    assert not [f for f in files if f.startswith(".")]  # no temporary file left
    with torch.no_grad():
        torch.testing.assert_close(Transformer.from_pretrained(saved, dtype=torch.float32)(_batch()), ours(_batch()))


def test_save_over_a_sharded_checkpoint_removes_its_stale_weight_files(tmp_path):
    """Sharded, then single file, then sharded again: the files of the earlier save that this one does
    not rewrite are removed (a stale index would load the old shards), everything else is kept."""
    ours = Transformer.from_pretrained(save_hf_model(make_hf_model("qwen2"), tmp_path / "hf"), dtype=torch.float32)
    out = tmp_path / "ours"
    os.makedirs(out)
    (out / "tokenizer.json").write_text("{}")
    for shard_bytes, expected in ((50_000, "index"), (None, "single"), (50_000, "index")):
        with torch.no_grad():
            ours.embed_tokens.weight.add_(0.01)  # new weights every time
        ours.save_pretrained(out, **({"max_shard_bytes": shard_bytes} if shard_bytes else {}))
        files = sorted(os.listdir(out))
        weight_files = [f for f in files if f.startswith("model")]
        if expected == "single":
            assert weight_files == ["model.safetensors"], files
        else:
            n = len(weight_files) - 1
            assert n > 1 and weight_files == [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)] + [
                "model.safetensors.index.json"], files
        assert "tokenizer.json" in files and not [f for f in files if f.startswith(".")]
        with torch.no_grad():
            torch.testing.assert_close(Transformer.from_pretrained(out, dtype=torch.float32)(_batch()), ours(_batch()))


def test_saved_checkpoint_is_readable_by_other_users(tmp_path):
    """Folders 0755, files 0644 under the usual umask 022 (a vLLM server under another user reads them);
    safetensors alone would create model.safetensors 0600."""
    ours = Transformer(ModelConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                   num_attention_heads=2, num_key_value_heads=1, head_dim=8))
    old = os.umask(0o022)
    try:
        ours.save_pretrained(tmp_path / "new" / "ckpt")
        ours.save_pretrained(tmp_path / "new" / "ckpt")  # and over an existing one
    finally:
        os.umask(old)
    for folder, _, files in os.walk(tmp_path / "new"):
        assert os.stat(folder).st_mode & 0o777 == 0o755, folder
        for f in files:
            assert os.stat(os.path.join(folder, f)).st_mode & 0o777 == 0o644, f


# -----------------------------------------------------------------------------
# The real base model's config


def test_real_config_parses_and_builds_on_meta():
    if not os.path.isdir(BASE_MODEL_DIR):
        pytest.skip(f"{BASE_MODEL_DIR} not present (../shared is not beside this checkout)")
    cfg = load_config(BASE_MODEL_DIR)
    assert (cfg.model_type, cfg.num_hidden_layers, cfg.hidden_size) == ("qwen2", 28, 1536)
    assert (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim) == (12, 2, 128)
    assert (cfg.vocab_size, cfg.intermediate_size, cfg.tie_word_embeddings) == (151936, 8960, False)
    assert cfg.rope_theta == 10000 and cfg.dtype == "bfloat16"
    with torch.device("meta"):
        model = Transformer(cfg)
    assert all(p.device.type == "meta" for p in model.parameters())
    n_params = sum(p.numel() for p in model.parameters())
    assert 1.7e9 < n_params < 1.8e9  # 1.78B with the untied 151936 x 1536 lm_head
    assert model.lm_head.weight.shape == (151936, 1536)


def test_transformers_5_config_keys(tmp_path):
    cfg = ModelConfig.from_hf({"model_type": "qwen3", "vocab_size": 10, "hidden_size": 8, "intermediate_size": 16,
                               "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 1,
                               "head_dim": 6, "rope_parameters": {"rope_type": "default", "rope_theta": 5e5},
                               "dtype": "bfloat16"})
    assert (cfg.rope_theta, cfg.dtype, cfg.head_dim, cfg.qk_norm, cfg.attention_bias) == (5e5, "bfloat16", 6, True, False)


@pytest.mark.parametrize("model_type", ["qwen2", "qwen3"])
def test_missing_keys_take_transformers_defaults(model_type):
    import transformers

    d = {"model_type": model_type, "vocab_size": 10, "hidden_size": 64, "intermediate_size": 16,
         "num_hidden_layers": 1, "num_attention_heads": 4}
    ref = transformers.AutoConfig.for_model(**d)
    cfg = ModelConfig.from_hf(d)
    ref_head_dim = getattr(ref, "head_dim", None) or ref.hidden_size // ref.num_attention_heads
    assert (cfg.num_key_value_heads, cfg.head_dim) == (ref.num_key_value_heads, ref_head_dim)
    assert (cfg.max_position_embeddings, cfg.rms_norm_eps) == (ref.max_position_embeddings, ref.rms_norm_eps)
    cfg = ModelConfig.from_hf(d | {"num_key_value_heads": None})  # null: one kv head per query head
    assert cfg.num_key_value_heads == transformers.AutoConfig.for_model(**d, num_key_value_heads=None).num_key_value_heads
