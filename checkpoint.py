"""
Checkpoints and run folders of train.py: what a run writes, and how it continues.

    out/step_NNNNNN/          a Hugging Face folder (config.json, model.safetensors, tokenizer files)
                              that transformers, vLLM and eval.py load as they are, plus
        trainer/              sharded fp32 weights + optimizer state (torch.distributed.checkpoint)
        trainer_state.json    the step and the run's config
    out/metrics.jsonl         one line per step

Everything of a checkpoint is written into a temporary folder first and renamed at the end, so a
crash mid-save leaves the previous checkpoint intact. Weights are gathered from the FSDP shards one
tensor at a time (full_tensors), so no rank ever holds a second full copy of the model.
"""

import json
import os
import shutil

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

import chat
from model import Transformer, replace_dir


def full_tensors(model):
    """(name, full tensor) of a (possibly sharded) model, one at a time: each is a collective under
    FSDP, and only one gathered tensor (at most the embedding) is alive at once, not a whole copy."""
    for name, tensor in model.state_dict().items():
        yield name, (tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor).detach()


def save_checkpoint(out, step, policy, optimizer, tokenizer, state, keep_last, chat_template=chat.CHAT_TEMPLATE,
                    start_dir=None):
    """out/step_NNNNNN/: HF weights + tokenizer (with chat_template) + trainer/ (DCP) + trainer_state.json,
    atomically. start_dir: the run's starting checkpoint, whose generation_config.json (R1's sampling
    defaults: temperature 0.6, top_p 0.95) is carried into every checkpoint."""
    rank0 = not dist.is_initialized() or dist.get_rank() == 0
    final = os.path.join(out, f"step_{step:06d}")
    tmp = os.path.join(out, f".step_{step:06d}.tmp")
    # The Hugging Face weights: bf16 on GPU (the released checkpoints' dtype), gathered tensor by
    # tensor into host memory on rank 0, so no GPU holds a second full copy.
    save_dtype = torch.bfloat16 if current_device().type == "cuda" else torch.float32
    weights = {name: tensor.to("cpu", save_dtype) for name, tensor in full_tensors(policy) if rank0}
    if rank0:
        shutil.rmtree(tmp, ignore_errors=True)
        Transformer.save_pretrained(policy, tmp, state_dict=weights)  # policy only gives the config
        chat.save_tokenizer(tokenizer, tmp, chat_template)
        if start_dir and os.path.isfile(gen := os.path.join(start_dir, "generation_config.json")):
            shutil.copyfile(gen, os.path.join(tmp, "generation_config.json"))
    del weights
    barrier()
    model_sd, optim_sd = get_state_dict(policy, optimizer)
    dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=os.path.join(tmp, "trainer"))
    barrier()
    if rank0:
        with open(os.path.join(tmp, "trainer_state.json"), "w") as f:
            json.dump(state, f, indent=2)
        replace_dir(tmp, final)  # an old folder of the same step is moved aside, not deleted first
        for old in sorted(d for d in os.listdir(out) if d.startswith("step_"))[:-keep_last]:
            shutil.rmtree(os.path.join(out, old), ignore_errors=True)
    barrier()
    return final


def trim_metrics(path, last_step):
    """Keeps the metrics lines of steps <= last_step (the resumed checkpoint's): the steps after it
    are run again. A line cut short by a crash is dropped. Rewritten atomically."""
    kept = []
    with open(path) as f:
        for line in f:
            try:
                if json.loads(line)["step"] <= last_step:
                    kept.append(line)
            except (json.JSONDecodeError, KeyError, TypeError):
                pass
    with open(path + ".tmp", "w") as f:
        f.writelines(kept)
    os.replace(path + ".tmp", path)


def latest_checkpoint(out):
    steps = sorted(d for d in os.listdir(out) if d.startswith("step_")) if os.path.isdir(out) else []
    return os.path.join(out, steps[-1]) if steps else None


def load_checkpoint(path, policy, optimizer):
    model_sd, optim_sd = get_state_dict(policy, optimizer)
    state = {"model": model_sd, "optim": optim_sd}
    dcp.load(state, checkpoint_id=os.path.join(path, "trainer"))
    set_state_dict(policy, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
    with open(os.path.join(path, "trainer_state.json")) as f:
        return json.load(f)


def barrier():
    if dist.is_initialized():
        dist.barrier()


def current_device():
    """The device this process trains on (cuda:LOCAL_RANK after setup, else the CPU)."""
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
