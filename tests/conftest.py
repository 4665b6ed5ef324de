"""Shared test helpers: tiny random Qwen2/Qwen3 checkpoints built by transformers (the reference)."""

import os
import sys

import pytest
import torch

# Triton runs on a CPU only in its interpreter, which must be chosen before triton is imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
SHARED = os.path.join(os.path.dirname(ROOT), "shared")
BASE_MODEL_DIR = os.path.join(SHARED, "models", "deepseek-r1-distill-qwen-1.5b")


def needs_cuda(why):
    """Marks a CUDA variant of a test: skipped without a GPU, saying what it would check there.
    Tests whose names contain "cuda" are what gpu_check.sh runs (pytest -k cuda)."""
    return pytest.mark.skipif(not torch.cuda.is_available(), reason=f"needs a CUDA GPU: {why}")


def make_hf_model(model_type="qwen2", tied=False, vocab_size=320, seed=0, **overrides):
    """A tiny random transformers Qwen2/Qwen3 model (fp32, eval mode)."""
    import transformers

    torch.manual_seed(seed)
    kw = dict(vocab_size=vocab_size, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=tied,
              max_position_embeddings=512, rms_norm_eps=1e-6)
    if model_type == "qwen3":
        kw["head_dim"] = 24  # != hidden_size / heads = 16, as Qwen3 allows
        kw.update(overrides)
        model = transformers.Qwen3ForCausalLM(transformers.Qwen3Config(**kw))
    else:
        kw.update(overrides)
        model = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**kw))
    return model.eval()


def save_hf_model(model, path, max_shard_size=None):
    if max_shard_size:
        model.save_pretrained(path, max_shard_size=max_shard_size)
    else:
        model.save_pretrained(path)
    return str(path)


@pytest.fixture(params=[("qwen2", False), ("qwen2", True), ("qwen3", False)], ids=["qwen2", "qwen2-tied", "qwen3"])
def hf_checkpoint(request, tmp_path):
    """(transformers model, folder it was saved to) for each architecture variant."""
    model_type, tied = request.param
    model = make_hf_model(model_type, tied)
    return model, save_hf_model(model, tmp_path / f"{model_type}-{'tied' if tied else 'untied'}")
