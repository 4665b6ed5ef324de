"""
The Qwen2 / Qwen3 decoder in one file: the model that Thinkless trains and samples from. It reads and
writes Hugging Face checkpoint folders (config.json + safetensors, sharded or not) that transformers and
vLLM load as they are; parameter names are theirs minus the leading "model.", so loading is a name map.

  token embedding -> N x [ RMSNorm -> grouped-query attention with RoPE -> residual
                           RMSNorm -> SwiGLU MLP                       -> residual ]
  -> RMSNorm -> lm_head (its own matrix, or the embedding matrix when tied)
Qwen2: q/k/v projections carry a bias. Qwen3: no biases, an RMSNorm on every query and key head
before RoPE, and an explicit head_dim that may differ from hidden_size / num_heads.

Two hooks let the rest of the project drive the model without copying it:
  - `kv_cache` + `positions` (sampler.py): a static cache, written in place (gpt-fast style), whose
    slot p of row r holds position p of that row's sequence. A query at position p attends to slots
    <= p of its row, so rows of different lengths share a batch and a finished row restarts at 0.
  - `head(hidden [B, T, H], lm_head weight [V, H])`, called instead of the lm_head: the losses compute
    fused log-probs (logprob_kernels/) without the [B, T, V] logits, inside forward() where FSDP's hooks see it.
"""

import json
import os
import re
from dataclasses import dataclass, fields

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

# -----------------------------------------------------------------------------
# Config


@dataclass
class ModelConfig:
    # The defaults are DeepSeek-R1-Distill-Qwen-1.5B's config.json, not transformers' (see from_hf).
    model_type: str = "qwen2"  # "qwen2" or "qwen3"
    vocab_size: int = 151936
    hidden_size: int = 1536
    intermediate_size: int = 8960
    num_hidden_layers: int = 28
    num_attention_heads: int = 12
    num_key_value_heads: int = 2
    head_dim: int = 128
    max_position_embeddings: int = 131072
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    tie_word_embeddings: bool = False
    attention_bias: bool = True  # Qwen2 always has q/k/v biases; Qwen3 has none
    qk_norm: bool = False  # Qwen3
    dtype: str = "bfloat16"  # the dtype the weights are stored in
    bos_token_id: int | None = None
    eos_token_id: int | list | None = None

    @classmethod
    def from_hf(cls, d: dict, source: str = "config.json") -> "ModelConfig":
        """Reads a transformers 4.x or 5.x config dict; refuses what this file does not implement."""
        model_type = d.get("model_type")
        if model_type not in ("qwen2", "qwen3"):
            raise ValueError(f"{source}: model_type {model_type!r} is not supported (qwen2 or qwen3)")
        # 4.x writes rope_theta + rope_scaling; 5.x writes rope_parameters = {rope_type, rope_theta}.
        for rope in (d.get("rope_parameters") or {}, d.get("rope_scaling") or {}):
            if (rope_type := rope.get("rope_type", rope.get("type", "default"))) != "default":
                raise ValueError(f"{source}: rope type {rope_type!r} is not supported (only 'default' RoPE)")
        if d.get("use_sliding_window"):
            raise ValueError(f"{source}: use_sliding_window=true is not supported")
        # Missing keys take transformers' defaults, not this dataclass's: 32 kv heads (null: one per head),
        # Qwen3's head_dim 128, 32768 positions, float32 without a dtype (what transformers 4.x loads).
        try:
            heads, hidden = d["num_attention_heads"], d["hidden_size"]
            head_dim = d.get("head_dim", 128 if model_type == "qwen3" else None) or hidden // heads
            return cls(
                model_type=model_type, vocab_size=d["vocab_size"], hidden_size=hidden,
                intermediate_size=d["intermediate_size"], num_hidden_layers=d["num_hidden_layers"],
                num_attention_heads=heads, num_key_value_heads=d.get("num_key_value_heads", 32) or heads,
                head_dim=head_dim, rms_norm_eps=d.get("rms_norm_eps", 1e-6),
                max_position_embeddings=d.get("max_position_embeddings", 32768),
                rope_theta=(d.get("rope_parameters") or {}).get("rope_theta", d.get("rope_theta", 10000.0)),
                tie_word_embeddings=d.get("tie_word_embeddings", False),
                attention_bias=True if model_type == "qwen2" else d.get("attention_bias", False),
                qk_norm=model_type == "qwen3", dtype=d.get("dtype") or d.get("torch_dtype") or "float32",
                bos_token_id=d.get("bos_token_id"), eos_token_id=d.get("eos_token_id"))
        except KeyError as e:
            raise ValueError(f"{source}: missing required key {e.args[0]!r}") from None

    def to_hf(self) -> dict:
        """The config.json that transformers (4.x and 5.x) reads back as the same model."""
        d = {k.name: getattr(self, k.name) for k in fields(self) if k.name != "qk_norm"}  # implied by model_type
        d["torch_dtype"] = d.pop("dtype")
        arch = {"qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}[self.model_type]
        d.update(architectures=[arch], hidden_act="silu", rope_scaling=None, use_cache=True,
                 use_sliding_window=False, attention_dropout=0.0, initializer_range=0.02)
        if self.model_type == "qwen2":
            d.pop("attention_bias")
        return d


# -----------------------------------------------------------------------------
# Building blocks


class RMSNorm(nn.Module):
    def __init__(self, dim, eps):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):  # y = x / sqrt(mean(x^2) + eps) * w, normalised in fp32, then cast (as transformers)
        return self.weight * F.rms_norm(x.float(), x.shape[-1:], eps=self.eps).to(x.dtype)


def rope_cos_sin(positions, head_dim, theta, dtype):
    """cos, sin [B, T, 1, head_dim] for integer positions [B, T] (default RoPE, computed in fp32); the
    first half of sin is negated, for apply_rope."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, device=positions.device).float() / head_dim)
    freqs = positions.float()[..., None, None] * inv_freq  # (B, T, 1, hd/2)
    cos, sin = freqs.cos(), freqs.sin()
    return torch.cat((cos, cos), -1).to(dtype), torch.cat((-sin, sin), -1).to(dtype)  # (B, T, 1, hd)


def apply_rope(x, cos, sin):
    # x (B, T, heads, hd): rotate each pair (x_i, x_{i+hd/2}) by the angle of its position, as
    # x * cos + (-x_{i+hd/2}, x_i) * sin; the roll swaps the halves, the sign is in sin.
    return x * cos + x.roll(x.shape[-1] // 2, -1) * sin


class KVCache:
    """Static key/value buffers [layers, rows, max_len, kv_heads, head_dim], written in place."""

    def __init__(self, cfg: ModelConfig, rows, max_len, dtype, device):
        shape = (cfg.num_hidden_layers, rows, max_len, cfg.num_key_value_heads, cfg.head_dim)
        self.k, self.v = (torch.zeros(shape, dtype=dtype, device=device) for _ in range(2))


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_head, self.n_kv_head, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        H, bias = cfg.hidden_size, cfg.attention_bias
        self.q_proj = nn.Linear(H, self.n_head * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(H, self.n_kv_head * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(H, self.n_kv_head * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(self.n_head * self.head_dim, H, bias=False)
        if cfg.qk_norm:
            self.q_norm, self.k_norm = (RMSNorm(self.head_dim, cfg.rms_norm_eps) for _ in range(2))

    def forward(self, x, cos, sin, cache_k=None, cache_v=None, cache_rows=None, positions=None, mask=None):
        B, T, _ = x.shape
        # q (B, T, nh, hd); k, v (B, T, nkv, hd): fewer key/value heads, each shared by nh / nkv queries
        q, k, v = (proj(x).view(B, T, -1, self.head_dim) for proj in (self.q_proj, self.k_proj, self.v_proj))
        if hasattr(self, "q_norm"):
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache_k is not None:  # write the new keys/values into the cache
            rows = torch.arange(B, device=x.device) if cache_rows is None else cache_rows
            cache_k[rows[:, None], positions], cache_v[rows[:, None], positions] = k, v
        if mask is not None:  # attend over the row's slots, the mask hiding later ones (else causal: no mask)
            k, v = (c if cache_rows is None else c[cache_rows] for c in (cache_k, cache_v))  # (B, S, nkv, hd)
        # Decoding (T = 1): the g = nh / nkv query heads of a kv head become g queries of that one head,
        # q (B, nkv, g, hd), so attention reads each cached key/value once for all g (1.8x faster on CPU).
        q = q.view(B, self.n_kv_head, -1, self.head_dim) if T == 1 else q.transpose(1, 2)  # else (B, nh, T, hd)
        y = F.scaled_dot_product_attention(q, k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask,
                                           is_causal=mask is None and T > 1, enable_gqa=True)  # flash can run
        return self.o_proj((y if T == 1 else y.transpose(1, 2)).reshape(B, T, -1))  # (B, T, nh*hd) -> (B, T, H)


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))  # SwiGLU


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x, cos, sin, *cache_args):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, *cache_args)
        return x + self.mlp(self.post_attention_layernorm(x))


# -----------------------------------------------------------------------------
# The model


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight  # one tensor, two uses
        self.gradient_checkpointing = False  # recompute each block in backward (saves activations)
        # normal(0, 0.02) for every weight and bias (transformers zeroes biases), norms at 1
        for name, p in self.named_parameters():
            if p.device.type != "meta":
                nn.init.ones_(p) if name.endswith("norm.weight") else nn.init.normal_(p, std=0.02)

    def forward(self, idx, positions=None, kv_cache: KVCache | None = None, cache_rows=None, head=None):
        """idx (B, T) token ids -> logits (B, T, V), or head(hidden (B, T, H), lm_head weight (V, H)).
        A kv_cache is written at (cache_rows[b] or b, positions[b, t]) and read through a mask; with positions
        None (0..T-1: a prefill from the start of each row) it is only written, attention is plain causal."""
        B, T = idx.shape
        mask = None  # (B, 1, T, S) with a cache and positions: a query at position p sees the slots <= p of its row
        if positions is None:
            positions = torch.arange(T, device=idx.device).expand(B, T)
        elif kv_cache is not None:
            mask = (torch.arange(kv_cache.k.shape[2], device=idx.device) <= positions[:, :, None])[:, None]
        x = self.embed_tokens(idx)  # (B, T, H)
        cos, sin = rope_cos_sin(positions, self.config.head_dim, self.config.rope_theta, x.dtype)
        for i, block in enumerate(self.layers):
            cache_args = () if kv_cache is None else (kv_cache.k[i], kv_cache.v[i], cache_rows, positions, mask)
            if self.gradient_checkpointing and self.training:
                x = torch.utils.checkpoint.checkpoint(block, x, cos, sin, *cache_args, use_reentrant=False)
            else:
                x = block(x, cos, sin, *cache_args)
        x = self.norm(x)  # (B, T, H)
        return self.lm_head(x) if head is None else head(x, self.lm_head.weight)  # (B, T, V) or head's

    # -------------------------------------------------------------------------
    # Hugging Face checkpoints

    @classmethod
    def from_pretrained(cls, path, dtype=None, device=None) -> "Transformer":
        """Loads config.json + safetensors (dtype None: the checkpoint's). Built on the meta device, each
        tensor then goes from disk straight to `device` in `dtype`: one copy of the weights, never an fp32 one."""
        cfg = load_config(path)
        dtype = dtype or getattr(torch, cfg.dtype)
        with torch.device("meta"):
            model = cls(cfg)
        expected = {k: tuple(p.shape) for k, p in model.named_parameters()}  # a tied lm_head is listed once
        state, problems = {}, []
        for file, names in _weight_files(path).items():
            try:
                with safe_open(file, framework="pt", device=str(torch.device(device or "cpu"))) as f:
                    for hf_name in names or f.keys():
                        name = hf_name.removeprefix("model.")
                        if name in expected:
                            t = f.get_tensor(hf_name)
                            if (shape := tuple(t.shape)) == expected[name]:
                                state[name] = t.to(dtype)
                            else:
                                problems.append(f"{hf_name} in {file}: shape {shape}, expected {expected[name]}")
                        elif not (cfg.tie_word_embeddings and name == "lm_head.weight"):  # a tied copy is fine
                            problems.append(f"unexpected tensor {hf_name} in {file}")
            except (SafetensorError, OSError, RuntimeError) as e:
                raise ValueError(f"{file}: cannot read safetensors file (truncated or corrupt?): {e}") from None
        problems += [f"missing tensor {'' if n == 'lm_head.weight' else 'model.'}{n} (shape {s})"
                     for n, s in expected.items() if n not in state]
        if problems:
            raise ValueError(f"{path}: weights do not match config.json:\n  " + "\n  ".join(problems))
        model.load_state_dict(state, strict=False, assign=True)
        if cfg.tie_word_embeddings:
            model.lm_head.weight = model.embed_tokens.weight
        model.config.dtype = str(dtype).removeprefix("torch.")
        return model

    def save_pretrained(self, path, state_dict=None, max_shard_bytes=4 * 2**30):
        """Writes config.json + safetensors (sharded with an index past max_shard_bytes) into the folder
        `path`, file by file: each under a temporary name, then renamed over the old one, so a crash
        leaves every file whole. Other files in `path` (a tokenizer) are kept; only the weight files of
        an earlier save that this one does not rewrite are removed (a stale index would point at them).
        state_dict (our names, full tensors) defaults to ours (FSDP gathers one)."""
        path = str(path)
        state = state_dict if state_dict is not None else self.state_dict()
        tensors = {("" if k == "lm_head.weight" else "model.") + k: v.detach().contiguous().cpu()
                   for k, v in state.items() if not (k == "lm_head.weight" and self.config.tie_word_embeddings)}
        shards, size = [{}], 0  # consecutive tensors, a new shard when the next would pass the limit
        for name, t in tensors.items():
            if shards[-1] and size + t.nbytes > max_shard_bytes:
                shards, size = shards + [{}], 0
            shards[-1][name], size = t, size + t.nbytes
        os.makedirs(path, exist_ok=True)
        n = len(shards)  # one model.safetensors, or n numbered shards and an index
        files = [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)] if n > 1 else ["model.safetensors"]
        for file, shard in zip(files, shards):
            _write_file(path, file, lambda tmp, shard=shard: save_file(shard, tmp, metadata={"format": "pt"}))
        if n > 1:
            index = {"metadata": {"total_size": sum(t.nbytes for t in tensors.values())},
                     "weight_map": {name: file for file, shard in zip(files, shards) for name in shard}}
            _write_file(path, "model.safetensors.index.json", lambda tmp: _dump_json(index, tmp))
        dtype = str(next(iter(tensors.values())).dtype).removeprefix("torch.")  # of the tensors written
        _write_file(path, "config.json", lambda tmp: _dump_json(self.config.to_hf() | {"torch_dtype": dtype}, tmp))
        written = files + (["model.safetensors.index.json"] if n > 1 else [])
        stale = [f for f in os.listdir(path) if re.fullmatch(r"model(-\d+-of-\d+)?\.safetensors(\.index\.json)?", f)
                 and f not in written]
        for f in sorted(stale, key=lambda f: not f.endswith(".json")):  # the index first: it never points at a gap
            os.remove(os.path.join(path, f))


# -----------------------------------------------------------------------------
# Files


def load_config(path) -> ModelConfig:
    file = os.path.join(str(path), "config.json")
    if not os.path.isfile(file):
        raise FileNotFoundError(f"{file}: no config.json (expected a Hugging Face checkpoint folder)")
    try:
        with open(file) as f:
            return ModelConfig.from_hf(json.load(f), source=file)
    except json.JSONDecodeError as e:
        raise ValueError(f"{file}: not valid JSON: {e}") from None


def _weight_files(path) -> dict:
    """{safetensors file: tensor names in it, or None for all}, from the index when sharded."""
    single, index = os.path.join(path, "model.safetensors"), os.path.join(path, "model.safetensors.index.json")
    if os.path.isfile(index):
        with open(index) as f:
            weight_map = json.load(f).get("weight_map")
        if not isinstance(weight_map, dict):
            raise ValueError(f"{index}: no 'weight_map' object")
        files = {}
        for name, shard in weight_map.items():
            files.setdefault(os.path.join(path, shard), []).append(name)
        if missing := [file for file in files if not os.path.isfile(file)]:
            raise FileNotFoundError(f"{index}: points at shard {missing[0]}, which does not exist")
        return files
    if os.path.isfile(single):
        return {single: None}
    raise FileNotFoundError(f"{path}: no model.safetensors or model.safetensors.index.json")


def _write_file(folder, name, write):
    """write(tmp) fills a temporary file, which is then flushed to disk and renamed to folder/name, with
    the permissions a new file gets (0644 under the usual umask: safetensors creates its files 0600, and
    a vLLM server or a colleague under another user must be able to read a checkpoint)."""
    tmp = os.path.join(folder, f".{name}.tmp")
    try:
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())  # on disk before the rename (a power loss, not only a crash)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, os.path.join(folder, name))
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _dump_json(obj, file):
    with open(file, "w") as f:
        json.dump(obj, f, indent=2)
