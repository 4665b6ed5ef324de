"""train.py / sft.py / degrpo.py end to end on a tiny model: normalisation, ranks, resume, checkpoints."""

import json
import os
import random
import signal
import subprocess
import sys

import pytest
import torch
from conftest import ROOT
from safetensors.torch import load_file

import checkpoint
import sft
import toy
import train
import training
from model import ModelConfig, Transformer


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    """A tiny random Qwen2 checkpoint with the toy tokenizer, SFT pairs and RL problems."""
    d = tmp_path_factory.mktemp("assets")
    tok = toy.build_tokenizer()
    cfg = ModelConfig(vocab_size=tok.get_vocab_size(), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=256,
                      tie_word_embeddings=True, dtype="float32")
    torch.manual_seed(0)
    Transformer(cfg).save_pretrained(d / "base")  # replaces the folder: the tokenizer goes in after
    toy.build_tokenizer(d / "base")
    rng = random.Random(0)
    with open(d / "sft.jsonl", "w") as f_sft, open(d / "rl.jsonl", "w") as f_rl:
        for _ in range(48):
            p = toy.make_problem(rng, rng.randint(1, 3))
            for response in (toy.think_expert(p["problem"]), toy.short_expert(p["problem"])):
                f_sft.write(json.dumps({"prompt": p["problem"], "response": response}) + "\n")
            f_rl.write(json.dumps(p) + "\n")
    return d


def run(args, nproc=1, script=os.path.join(ROOT, "train.py"), timeout=300):
    """script (train.py) in a fresh process (torchrun with gloo when nproc > 1): (returncode, output)."""
    launcher = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}"] if nproc > 1 else [sys.executable]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    proc = subprocess.Popen(launcher + [str(script)] + [str(a) for a in args], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        output, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # the launcher and its workers: a hang must not outlive the test
        pytest.fail(f"{script} hung: {proc.communicate()[0][-3000:]}")
    return proc.returncode, output


def train_py(args, nproc=1):
    """train.py, which must succeed; its output."""
    returncode, output = run(args, nproc)
    assert returncode == 0, output[-5000:]
    return output


def weights(ckpt):
    return load_file(os.path.join(ckpt, "model.safetensors"))


def assert_same_weights(a, b, atol):
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], atol=atol, rtol=0, msg=k)


def sft_args(assets, out, steps=3):
    return ["--stage", "sft", "--model", assets / "base", "--data", assets / "sft.jsonl", "--out", out,
            "--steps", steps, "--batch-size", 16, "--lr", 1e-3, "--micro-batch-tokens", 256]


def rl_args(assets, model, out, steps=2):
    # temperature 1.2 + a raised lr: a random model's samples are diverse and the update visible
    return ["--stage", "rl", "--model", model, "--data", assets / "rl.jsonl", "--out", out, "--steps", steps,
            "--batch-size", 4, "--group-size", 4, "--max-new-tokens", 16, "--lr", 1e-3, "--temperature", 1.2,
            "--updates-per-rollout", 2, "--micro-batch-tokens", 128, "--save-every", 1]


# -----------------------------------------------------------------------------


def test_sft_gradient_independent_of_micro_batches(assets):
    """One micro-batch or many: the step's loss is normalised by the step's token count, same gradient."""
    tok = toy.build_tokenizer()
    pairs = sft.read_sft_jsonl(assets / "sft.jsonl")[:12]
    import chat

    prompts = [chat.encode_prompt(tok, q) for q, _ in pairs]
    responses = [tok.encode(r, add_special_tokens=False).ids for _, r in pairs]
    grads = []
    for budget in (10_000, 40):  # 1 micro-batch vs about 6
        model = Transformer.from_pretrained(assets / "base", dtype=torch.float64)
        n_micro = len(training.micro_batches(range(12), [len(p) + len(r) for p, r in zip(prompts, responses)], budget))
        assert n_micro == 1 if budget > 1000 else n_micro >= 4
        opt = torch.optim.SGD(model.parameters(), lr=0.0)
        model.zero_grad()
        captured = {}
        opt.step = lambda: captured.update({n: p.grad.clone() for n, p in model.named_parameters()})
        sft.sft_step(model, opt, prompts, responses, budget, grad_clip=1e9)
        grads.append(captured)
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], msg=name)


def test_sft_lowers_loss(assets, tmp_path):
    args = sft_args(assets, tmp_path / "sft", steps=8)
    args[args.index("--lr") + 1] = 5e-3
    train_py(args)
    losses = [json.loads(line)["loss"] for line in open(tmp_path / "sft" / "metrics.jsonl")]
    assert len(losses) == 8 and losses[-1] < losses[0] - 0.3, losses


def test_two_ranks_equal_one_rank_sft(assets, tmp_path):
    train_py(sft_args(assets, tmp_path / "one"))
    train_py(sft_args(assets, tmp_path / "two"), nproc=2)
    assert_same_weights(tmp_path / "one" / "step_000003", tmp_path / "two" / "step_000003", atol=1e-6)


@pytest.fixture(scope="module")
def sft_model(assets, tmp_path_factory):
    out = tmp_path_factory.mktemp("sft")
    train_py(sft_args(assets, out, steps=6))
    return out / "step_000006"


@pytest.mark.parametrize("method", [[], ["--alpha", "none"]], ids=["degrpo", "vanilla-seq-mean"])
def test_two_ranks_equal_one_rank_rl(assets, sft_model, tmp_path, method):
    """DeGRPO, and vanilla GRPO's seq-mean, whose 1/n counts the responses of the whole step while
    each response's 1/(T_i+1) is its own: the same step on 2 ranks as on one, the same metrics."""
    train_py(rl_args(assets, sft_model, tmp_path / "one") + method)
    train_py(rl_args(assets, sft_model, tmp_path / "two") + method, nproc=2)
    a, b = tmp_path / "one" / "step_000002", tmp_path / "two" / "step_000002"
    assert_same_weights(a, b, atol=1e-5)
    # and the step did change the weights
    diff = max((weights(a)[k] - weights(sft_model)[k]).abs().max().item() for k in weights(a))
    assert diff > 1e-4
    # the counts, per level too (the data has levels 1-3), are summed over the ranks
    one, two = ([json.loads(line) for line in open(tmp_path / d / "metrics.jsonl")] for d in ("one", "two"))
    for m1, m2 in zip(one, two):
        for key in ("samples", "think", "malformed", "think_by_level", "samples_by_level"):
            assert m1[key] == m2[key], key
        assert set(m1["samples_by_level"]) == {"1", "2", "3"} and sum(m1["samples_by_level"].values()) == 16


def test_resume_is_exact(assets, sft_model, tmp_path):
    train_py(rl_args(assets, sft_model, tmp_path / "straight", steps=4))
    os.makedirs(tmp_path / "resumed")
    os.rename(tmp_path / "straight" / "step_000002", tmp_path / "resumed" / "step_000002")
    # the crashed run had logged steps 1..4: the resumed run replaces the lines after its checkpoint
    with open(tmp_path / "resumed" / "metrics.jsonl", "w") as f:
        f.writelines(line.replace('"reward": ', '"reward": 99, "stale": ') if '"step": 3' in line else line
                     for line in open(tmp_path / "straight" / "metrics.jsonl"))
    output = train_py(rl_args(assets, sft_model, tmp_path / "resumed", steps=4) + ["--resume"])
    assert "resumed from" in output and "rl step 3/4" in output and "rl step 1/4" not in output
    assert_same_weights(tmp_path / "straight" / "step_000004", tmp_path / "resumed" / "step_000004", atol=0)
    straight, resumed = ([json.loads(line) for line in open(tmp_path / d / "metrics.jsonl")] for d in ("straight", "resumed"))
    assert [m["step"] for m in resumed] == [1, 2, 3, 4] and "stale" not in resumed[2]
    assert [m["reward"] for m in resumed] == [m["reward"] for m in straight]


def test_rl_checkpoints_load_in_transformers(assets, sft_model, tmp_path):
    import transformers

    train_py(rl_args(assets, sft_model, tmp_path / "rl", steps=4) + ["--keep-last", 2])
    steps = sorted(d for d in os.listdir(tmp_path / "rl") if d.startswith("step_"))
    assert steps == ["step_000003", "step_000004"]  # older ones pruned
    ckpt = tmp_path / "rl" / "step_000004"
    hf = transformers.AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32).eval()
    ours = Transformer.from_pretrained(ckpt, dtype=torch.float32)
    idx = torch.randint(0, ours.config.vocab_size, (2, 9))
    with torch.no_grad():
        torch.testing.assert_close(hf(idx).logits, ours(idx), atol=1e-4, rtol=0)
    metrics = [json.loads(line) for line in open(tmp_path / "rl" / "metrics.jsonl")]
    assert [m["step"] for m in metrics] == [1, 2, 3, 4]
    for key in ("reward", "think", "short", "acc_think", "acc_short", "groups_all_correct", "groups_all_wrong",
                "response_len", "response_len_max", "truncated_frac", "clip_frac", "kl", "entropy", "grad_norm",
                "logp_gap", "rollout_time", "update_time", "malformed", "think_by_level", "samples_by_level"):
        assert key in metrics[-1], key
    assert metrics[-1]["think"] + metrics[-1]["short"] <= metrics[-1]["samples"] == 16


def test_crashed_save_keeps_previous_checkpoint(assets, sft_model, tmp_path, monkeypatch):
    out = tmp_path / "rl"
    cfg = train.parse_args([str(a) for a in rl_args(assets, sft_model, out, steps=1)])
    train.train(cfg)
    good = weights(out / "step_000001")

    def crash(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(checkpoint.dcp, "save", crash)
    cfg.steps, cfg.resume = 2, True
    with pytest.raises(OSError, match="disk full"):
        train.train(cfg)
    assert sorted(d for d in os.listdir(out) if d.startswith("step_")) == ["step_000001"]
    for k, v in weights(out / "step_000001").items():
        torch.testing.assert_close(v, good[k], atol=0, rtol=0)
    Transformer.from_pretrained(out / "step_000001")  # still a complete checkpoint


def test_nan_loss_stops_without_overwriting(assets, tmp_path, monkeypatch):
    out = tmp_path / "sft"
    cfg = train.parse_args([str(a) for a in sft_args(assets, out, steps=2)])
    real = sft.token_logprobs
    monkeypatch.setattr(sft, "token_logprobs", lambda *a, **k: tuple(x * float("nan") if x is not None else x
                                                                      for x in real(*a, **k)))
    with pytest.raises(FloatingPointError, match="non-finite SFT loss"):
        train.train(cfg)
    assert not [d for d in os.listdir(out) if d.startswith("step_")]


def test_bad_data_line_named(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a=1 b=2", "response": "<short>\\\\boxed{3}"}\n{"prompt": "x", "response": "no control"}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:2: response must start with <think> or <short>"):
        sft.read_sft_jsonl(bad)


def test_a_failing_rank_ends_the_job(assets, tmp_path):
    """Rank 1 raises in its first step while rank 0 waits in a collective: torchrun must end the
    job with rank 1's error instead of leaving rank 0 blocked."""
    script = tmp_path / "fail_rank1.py"
    script.write_text(f"""
import os, sys
sys.path.insert(0, {str(ROOT)!r})
import sft, train
real = sft.sft_step
def sft_step(*args, **kwargs):
    if os.environ["RANK"] == "1":
        raise RuntimeError("injected failure on rank 1")
    return real(*args, **kwargs)
sft.sft_step = sft_step
train.main(sys.argv[1:])
""")
    returncode, output = run(sft_args(assets, tmp_path / "out"), nproc=2, script=script, timeout=120)
    assert returncode != 0 and "injected failure on rank 1" in output
