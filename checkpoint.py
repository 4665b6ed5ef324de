"""
Checkpoints and run folders of train.py: what a run writes, and how it continues.

    out/step_NNNNNN/          a Hugging Face folder (config.json, model.safetensors, tokenizer files)
                              that transformers, vLLM and eval.py load as they are, plus
        trainer/              sharded fp32 weights + optimizer state (torch.distributed.checkpoint)
        trainer_state.json    the step and the run's config
    out/metrics.jsonl         one line per step

A run folder belongs to one run (claim_run_folder): a new run refuses a folder that holds another
run's checkpoints or metrics, and --resume refuses a folder with nothing to resume and flags that
would not continue the saved run exactly (RESUMABLE_CHANGES lists the ones that may change). Every
rank writes its shard of a checkpoint into that one folder, so on several nodes it must be on a
filesystem they all share (check_shared_folder), and a mistake one rank finds stops them all (agree).

A run stopped by the scheduler (SIGTERM, or SIGINT: stop_on_signals) finishes its step, saves, and
exits with status PREEMPTED; --resume then continues it exactly.

Everything of a checkpoint is written into a temporary folder first and renamed at the end, so a
crash mid-save leaves the previous checkpoint intact. Weights are gathered from the FSDP shards one
tensor at a time (full_tensors), so no rank ever holds a second full copy of the model.
"""

import contextlib
import json
import os
import re
import shutil
import signal
import tempfile
import uuid

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

import chat
from model import Transformer


def full_tensors(model, dtype=None):
    """(name, full tensor) of a (possibly sharded) model, one at a time: each is a collective under
    FSDP, and only one gathered tensor (at most the embedding) is alive at once, not a whole copy.
    dtype: each shard is cast before the gather (the values of casting the gathered tensor), so that a
    bf16 copy gathers half the bytes: gloo holds the gathered shards and their concatenation at once,
    twice the tensor (a 151936 x 896 embedding: 1.0 GiB in fp32, 0.6 GiB cast first, measured)."""
    for name, tensor in model.state_dict().items():
        tensor = tensor.to(dtype) if dtype is not None else tensor
        yield name, (tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor).detach()


def save_checkpoint(out, step, policy, optimizer, tokenizer, state, keep_last, dtype=torch.float32,
                    chat_template=chat.CHAT_TEMPLATE, start_dir=None):
    """out/step_NNNNNN/: HF weights in `dtype` + tokenizer (with chat_template) + trainer/ (DCP, fp32) +
    trainer_state.json, atomically. start_dir: the run's starting checkpoint, whose
    generation_config.json (R1's sampling defaults: temperature 0.6, top_p 0.95) is carried into
    every checkpoint."""
    rank0 = not dist.is_initialized() or dist.get_rank() == 0
    final = os.path.join(out, f"step_{step:06d}")
    tmp = os.path.join(out, f".step_{step:06d}.tmp")
    # The Hugging Face weights (bf16 on a GPU by default: the released checkpoints' dtype), gathered
    # tensor by tensor into host memory on rank 0, so no GPU holds a second full copy.
    weights = {name: tensor.to("cpu") for name, tensor in full_tensors(policy, dtype) if rank0}
    if rank0:
        shutil.rmtree(tmp, ignore_errors=True)
        Transformer.save_pretrained(policy, tmp, state_dict=weights)  # policy only gives the config
        chat.save_tokenizer(tokenizer, tmp, chat_template)
        if start_dir and os.path.isfile(gen := os.path.join(start_dir, "generation_config.json")):
            shutil.copyfile(gen, os.path.join(tmp, "generation_config.json"))
    del weights
    barrier()
    with process_group():
        model_sd, optim_sd = get_state_dict(policy, optimizer)
        dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=os.path.join(tmp, "trainer"))
    barrier()
    if rank0:
        with open(os.path.join(tmp, "trainer_state.json"), "w") as f:
            json.dump(state, f, indent=2)
        replace_dir(tmp, final)  # an old folder of the same step is moved aside, not deleted first
        for old in checkpoints(out)[:-keep_last]:
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


def checkpoints(out):
    """The step_NNNNNN folders of a run, oldest first (not the temporary or moved-aside ones)."""
    names = os.listdir(out) if os.path.isdir(out) else []
    return sorted((d for d in names if re.fullmatch(r"step_\d+", d)), key=lambda d: int(d[5:]))


def latest_checkpoint(out):
    steps = checkpoints(out)
    return os.path.join(out, steps[-1]) if steps else None


def load_checkpoint(path, policy, optimizer):
    with process_group():
        model_sd, optim_sd = get_state_dict(policy, optimizer)
        state = {"model": model_sd, "optim": optim_sd}
        dcp.load(state, checkpoint_id=os.path.join(path, "trainer"))
        set_state_dict(policy, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
    return read_trainer_state(path)


def read_trainer_state(path):
    with open(os.path.join(path, "trainer_state.json")) as f:
        return json.load(f)


@contextlib.contextmanager
def process_group():
    """torch.distributed.checkpoint coordinates its ranks through a process group. A single process
    on a CPU trains without one (train.setup_distributed), so for the save or load it gets a group of
    one (an in-memory store, nothing to connect to): DCP then runs its usual path instead of the
    "uninitialized, assuming single process" fallback, and the trainer/ folder is the same either way."""
    if dist.is_initialized():
        yield
        return
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


def replace_dir(tmp, path):
    """Moves the finished folder tmp to path, the old path aside first and deleted last: a crash
    leaves a complete folder at path, or (between the renames) the old one at {path}.old-*/x."""
    for folder, _, files in os.walk(tmp):  # on disk before the rename (a power loss, not only a crash)
        for name in files:
            with open(os.path.join(folder, name), "rb") as f:
                os.fsync(f.fileno())
    old = None
    if os.path.exists(path):
        old = tempfile.mkdtemp(prefix=os.path.basename(path) + ".old-", dir=os.path.dirname(path))
        os.rename(path, os.path.join(old, "x"))
    os.rename(tmp, path)
    if old:
        shutil.rmtree(old, ignore_errors=True)


# -----------------------------------------------------------------------------
# Run folders


class RunError(Exception):
    """A mistake in the command (a used --out, nothing to resume, a bad --data file...), found before
    any model is loaded: train.main prints its one line on rank 0 and exits with status 1."""


# The flags that --resume may change. Each alters only what happens from the resumed step on, not
# the state a checkpoint holds or how the earlier steps were computed. Every other TrainConfig field
# must equal the saved run's, and so must any field added to TrainConfig later until it is listed
# here: a refused change is a message, an allowed one that was not meant would break the run silently.
RESUMABLE_CHANGES = {
    "out": "the run folder may have moved",
    "correct_think": "the official recipe raises it mid-run when training drifts to short answers",
    "steps": "rl: the run's length (rl's lr is constant; sft's cosine schedule depends on it: refused there)",
    "save_every": "when checkpoints are written",
    "keep_last": "how many are kept",
    "max_batch": "rows the sampler decodes together: its draws are keyed by (seed, sample), not by the batch",
    "micro_batch_tokens": "how a step is split for memory: the loss is normalised over the whole step, "
                          "so only float rounding changes",
    "grad_checkpointing": "recomputes activations for memory; the same arithmetic",
    "compile": "the sampler's decode step compiled: the same draws, the same tokens (tests/test_sampler.py)",
    "dist_timeout_h": "how long a rank waits for the others in a collective",
    "wandb": "where the metrics are also sent",
}


def claim_run_folder(out, resume, config: dict, defaults: dict):
    """The checkpoint to continue from (None: a new run), and the log lines of allowed changes.
    config: this command's TrainConfig as a dict; defaults: TrainConfig's defaults (for a field
    that an older run's saved config lacks). Raises RunError when the folder is not this run's."""
    used = [os.path.join(out, d) for d in checkpoints(out)]
    if os.path.exists(os.path.join(out, "metrics.jsonl")):
        used.append(os.path.join(out, "metrics.jsonl"))
    if not resume:
        if used:
            raise RunError(f"--out {out} holds another run ({', '.join(os.path.basename(u) for u in used)}): give "
                           f"--resume to continue it, or another --out to start a new one (or delete them)")
        return None, []
    ckpt = latest_checkpoint(out)
    if ckpt is None:
        raise RunError(f"--resume: no checkpoint (step_NNNNNN/) in {out} to resume from: check --out, or drop "
                       f"--resume to start a new run there" + (" after deleting its metrics.jsonl" if used else ""))
    saved = read_trainer_state(ckpt).get("config", {})  # {}: a run too old to have saved it
    notes, refused = [], []
    for name in sorted((set(saved) | set(config)) - {"resume"}):
        old, new = saved.get(name, "<absent>"), config.get(name, "<absent>")
        flag = "--" + name.replace("_", "-")
        if old == new:
            continue
        if name == "steps" and config.get("stage") == "sft":
            refused.append(f"{flag} {new}, the saved run has {old} (sft's cosine lr schedule spans --steps)")
        elif name in RESUMABLE_CHANGES:
            notes.append(f"resume: {flag} {old} -> {new} ({RESUMABLE_CHANGES[name]})")
        elif name not in saved and new == defaults.get(name):
            notes.append(f"resume: {flag} is not in the saved config (a run of an older version): "
                         f"taking its default {new}")
        elif name not in config:
            refused.append(f"{flag} was {old} in the saved run; this version has no such flag")
        else:
            refused.append(f"{flag} {new}, the saved run has {old}")
    if refused:
        raise RunError(f"--resume from {ckpt}: " + "; ".join(refused) + ". These would not continue the run "
                       f"exactly: give the saved values, or another --out for a new run")
    return ckpt, notes


def multi_rank():
    return dist.is_initialized() and dist.get_world_size() > 1


def agree(error):
    """Raises on every rank when any rank met a mistake (error: its RunError, or None): a file that one
    node lacks (--model or --data on a node-local disk) must stop every rank, not leave the others
    waiting in their first collective for --dist-timeout-h. The message is rank 0's own, or names the
    rank that failed."""
    if not multi_rank():
        if error:
            raise error
        return
    errors = [None] * dist.get_world_size()
    dist.all_gather_object(errors, str(error) if error else None)
    failed = [(r, e) for r, e in enumerate(errors) if e]
    if failed:
        r, message = failed[0]
        raise RunError(message if r == 0 else f"rank {r}: {message}")


def check_shared_folder(out):
    """On several ranks, that --out is one folder for all: every rank writes its shard of a checkpoint
    into it and rank 0 renames it into place, so on several nodes it must be on a filesystem they all
    share (NFS, Lustre...). Else each node would hold a part of every checkpoint and --resume would
    fail days later; a relative --out from different working directories is the same mistake. Rank 0
    writes a file there, every rank looks for it; the folder is left as it was."""
    if not multi_rank():
        return
    rank = dist.get_rank()
    name = [f".shared-check-{uuid.uuid4().hex}" if rank == 0 else None]
    dist.broadcast_object_list(name, src=0)
    marker, created = os.path.join(out, name[0]), not os.path.isdir(out)
    if rank == 0:
        os.makedirs(out, exist_ok=True)
        open(marker, "w").close()
    barrier()
    seen = [None] * dist.get_world_size()
    dist.all_gather_object(seen, os.path.isfile(marker))
    barrier()
    if rank == 0:
        os.remove(marker)
        if created and not os.listdir(out):
            os.rmdir(out)
    if blind := [r for r, s in enumerate(seen) if not s]:
        raise RunError(f"--out {out}: rank {blind[0]} does not see the file rank 0 wrote there ({len(blind)} of "
                       f"{len(seen)} ranks do not): every rank writes its shard of a checkpoint into --out, so it "
                       f"must be one folder on a filesystem all nodes share (an absolute path on NFS, Lustre...)")


# -----------------------------------------------------------------------------
# Stopping on a signal: a scheduler's time limit

# The exit status of a run that a signal stopped after saving its checkpoint: EX_TEMPFAIL of
# sysexits.h, "try again later" (neither 0, which would read as finished, nor 1, a mistake or a crash).
PREEMPTED = 75
_stop = {"signal": None}  # the first signal this process received since stop_on_signals began


class Preempted(Exception):
    """Raised on every rank once the checkpoint of a run stopped by a signal is written; its message
    says how to continue. train.main exits with PREEMPTED."""


@contextlib.contextmanager
def stop_on_signals(announce=True):
    """SIGTERM and SIGINT only set a flag while this is active: the step in progress finishes, then
    the ranks agree to stop (stop_requested), save, and raise Preempted. The handler never saves
    itself: a signal can arrive anywhere, a collective or a save included, and a second one only sets
    the flag again (a save interrupted otherwise, by SIGKILL, leaves the previous checkpoint intact:
    saves are atomic). System calls a signal interrupts are restarted (siginterrupt False), so that a
    collective's socket read is not broken by it. announce: write a line to stderr at the first signal."""
    def handler(signum, frame):
        if _stop["signal"] is None and announce:  # os.write: print() may not be re-entered from a handler
            with contextlib.suppress(OSError):
                os.write(2, f"{signal.Signals(signum).name}: finishing this step, then saving a checkpoint and "
                         f"stopping (SIGKILL stops at once and loses the step)\n".encode())
        _stop["signal"] = _stop["signal"] or signal.Signals(signum).name

    signals = (signal.SIGTERM, signal.SIGINT)
    previous = {sig: signal.getsignal(sig) for sig in signals}
    _stop["signal"] = None
    for sig in signals:
        signal.signal(sig, handler)
        signal.siginterrupt(sig, False)
    try:
        yield
    finally:  # a process that is stopping ignores the signals until it exits: when the first rank exits,
        for sig, old in previous.items():  # torchrun sends SIGTERM to the others, which must exit with PREEMPTED too
            signal.signal(sig, signal.SIG_IGN if _stop["signal"] else old)


def stop_requested(device):
    """Whether any rank got a signal, the same answer on every rank (a MAX over ranks, called after
    every step by all of them): a rank that stopped alone would leave the others waiting in the next
    step's collectives. The signal's name, or None."""
    got = torch.tensor([float(_stop["signal"] is not None)], device=device)
    if dist.is_initialized():
        dist.all_reduce(got, op=dist.ReduceOp.MAX)
    if got.item():  # stopping: a later signal (torchrun's, when another rank exits first) is not announced
        _stop["signal"] = _stop["signal"] or "a signal to another rank"
    return _stop["signal"] if got.item() else None


def barrier():
    if dist.is_initialized():
        dist.barrier()


def current_device():
    """The device this process trains on (cuda:LOCAL_RANK after setup, else the CPU)."""
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
