"""train.py / sft.py / degrpo.py end to end on a tiny model: normalisation, ranks, resume, checkpoints,
and the GPU's precision path (--dtype bfloat16) on CPU, with its CUDA variants skipped without a GPU."""

import dataclasses
import json
import os
import random
import signal
import subprocess
import sys
import warnings

import pytest
import torch
from conftest import BASE_MODEL_DIR, ROOT, needs_cuda
from safetensors.torch import load_file

import checkpoint
import sft
import toy
import train
import training
from model import ModelConfig, Transformer
from rehearse import saved_bytes_per_token_per_block


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    """A tiny random Qwen2 checkpoint with the toy tokenizer, SFT pairs and RL problems."""
    d = tmp_path_factory.mktemp("assets")
    tok = toy.build_tokenizer()
    cfg = ModelConfig(vocab_size=tok.get_vocab_size(), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=256,
                      tie_word_embeddings=True, dtype="float32")
    torch.manual_seed(0)
    Transformer(cfg).save_pretrained(d / "base")
    toy.build_tokenizer(d / "base")
    rng = random.Random(0)
    with open(d / "sft.jsonl", "w") as f_sft, open(d / "rl.jsonl", "w") as f_rl:
        for _ in range(48):
            p = toy.make_problem(rng, rng.randint(1, 3))
            for response in (toy.think_expert(p["problem"]), toy.short_expert(p["problem"])):
                f_sft.write(json.dumps({"prompt": p["problem"], "response": response}) + "\n")
            f_rl.write(json.dumps(p) + "\n")
    return d


def run(args, nproc=1, script=os.path.join(ROOT, "train.py"), timeout=300, device="cpu"):
    """script (train.py) in a fresh process (torchrun with gloo when nproc > 1): (returncode, output).
    device="cpu" hides any GPU, so that the CPU tests check the same thing on every machine."""
    launcher = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}"] if nproc > 1 else [sys.executable]
    env = dict(os.environ, OMP_NUM_THREADS="1")  # warnings shown: a run must print none (test_no_warnings_*)
    if device == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""
    proc = subprocess.Popen(launcher + [str(script)] + [str(a) for a in args], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        output, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # the launcher and its workers: a hang must not outlive the test
        pytest.fail(f"{script} hung: {proc.communicate()[0][-3000:]}")
    return proc.returncode, output


def train_py(args, nproc=1, device="cpu"):
    """train.py, which must succeed; its output."""
    returncode, output = run(args, nproc, device=device)
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


def test_sft_stand_in_micro_batch_costs_two_tokens(assets, monkeypatch):
    """A padding micro-batch (a rank with fewer than another, under torch.distributed) runs a forward
    and backward of two tokens, not of a real row, and leaves the loss and gradient as they were."""
    import chat

    tok = toy.build_tokenizer()
    pairs = sft.read_sft_jsonl(assets / "sft.jsonl")[:6]
    prompts = [chat.encode_prompt(tok, q) for q, _ in pairs]
    responses = [tok.encode(r, add_special_tokens=False).ids for _, r in pairs]
    runs = []
    for pad in (0, 2):
        real = training.micro_batches
        monkeypatch.setattr(sft, "micro_batches", lambda *a, **k: real(*a, **k) + [[]] * pad)
        model, tokens, captured = Transformer.from_pretrained(assets / "base", dtype=torch.float64), [], {}
        model.register_forward_pre_hook(lambda m, args: tokens.append(args[0].numel()))
        opt = torch.optim.SGD(model.parameters(), lr=0.0)
        opt.step = lambda: captured.update({n: p.grad.clone() for n, p in model.named_parameters()})
        m = sft.sft_step(model, opt, prompts, responses, 200, grad_clip=1e9)
        runs.append((m["loss"], captured, tokens))
    (loss0, grads0, tokens0), (loss1, grads1, tokens1) = runs
    assert tokens1 == tokens0 + [2, 2] and min(tokens0) > 20
    assert loss1 == pytest.approx(loss0, rel=1e-12)
    for name in grads0:
        torch.testing.assert_close(grads1[name], grads0[name], atol=1e-12, rtol=0, msg=name)


def test_default_flags_checkpoint_activations():
    """The memory plan of BENCHMARKS.md holds at the default flags: a block keeps its input only
    (hidden_size values a token: 3 kB in bf16 for the 1.5B model), not all its activations (~34x more:
    104 kB a token, 95 GB for a 32k-token micro-batch of the 1.5B model). The toy keeps them all."""
    assert train.parse_args(["--model", "m", "--data", "d"]).grad_checkpointing
    assert train.parse_args(["--model", "m", "--data", "d", "--no-grad-checkpointing"]).grad_checkpointing is False
    for preset in toy.PRESETS.values():
        assert preset.sft["grad_checkpointing"] is False and preset.rl["grad_checkpointing"] is False
    cfg = ModelConfig(vocab_size=64, hidden_size=64, intermediate_size=224, num_hidden_layers=1, num_attention_heads=4,
                      num_key_value_heads=2, head_dim=16, dtype="float32")
    default = train.parse_args(["--model", "m", "--data", "d"]).grad_checkpointing
    assert saved_bytes_per_token_per_block(cfg, default) == cfg.hidden_size * 4  # the block input, fp32
    assert saved_bytes_per_token_per_block(cfg, False) > 20 * cfg.hidden_size * 4


def test_memory_plan_terms():
    """rehearse.plan (BENCHMARKS.md's memory plan as code) at a small shape: its terms against the same
    arithmetic done here from the config (parameters counted by hand, KV cache, states per rank)."""
    import rehearse

    cfg = ModelConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                      num_key_value_heads=2, head_dim=8, tie_word_embeddings=True, dtype="float32")
    H, I, V, L = 32, 64, 128, 3
    q, kv = 4 * 8, 2 * 8  # query and key/value widths
    block = (H * q + q) + 2 * (H * kv + kv) + q * H + 3 * H * I + 2 * H  # q (+bias), k, v (+bias), o, MLP, 2 norms
    P = L * block + V * H + H  # blocks, the tied embedding, the final norm
    plan = rehearse.plan(cfg, world=2, rows=8, slots=100, tokens=256, act_bytes=0)
    assert plan[("rl", "sample")]["KV cache"] == L * 2 * 2 * 8 * 2 * 8 * 100  # layers x k,v x heads x dim x bf16 x rows x slots
    assert plan[("rl", "sample")]["sampler copy, bf16"] == 2 * P
    assert plan[("sft", "step")]["Adam m and v, sharded"] == 8 * P / 2
    assert plan[("rl", "update")]["root gathered, bf16"] == 2 * (V * H + H)
    assert set(plan) == {(s, p) for s in ("sft", "rl") for p in ("step", "save", "sample", "update", "refresh")
                         if (s, p) not in {("sft", "sample"), ("sft", "update"), ("sft", "refresh"), ("rl", "step")}}


def test_process_group_timeout_is_a_flag(monkeypatch):
    """Ranks sample on their own and meet at the first collective after the rollout: the group's
    timeout (default 3 h, not torch's 30 min) must cover one rank's longest rollout."""
    got = {}
    monkeypatch.setattr(train.dist, "init_process_group", lambda backend, timeout: got.update(timeout=timeout))
    monkeypatch.setattr(train.torch.cuda, "is_available", lambda: False)
    for key, value in dict(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0").items():
        monkeypatch.setenv(key, value)
    cfg = train.parse_args(["--model", "m", "--data", "d"])
    train.setup_distributed(timeout_h=cfg.dist_timeout_h)
    assert got["timeout"].total_seconds() == 3 * 3600
    train.setup_distributed(timeout_h=train.parse_args(["--model", "m", "--data", "d", "--dist-timeout-h", "0.5"]).dist_timeout_h)
    assert got["timeout"].total_seconds() == 1800


def test_sft_lowers_loss(assets, tmp_path):
    args = sft_args(assets, tmp_path / "sft", steps=8)
    args[args.index("--lr") + 1] = 5e-3
    train_py(args)
    losses = [json.loads(line)["loss"] for line in open(tmp_path / "sft" / "metrics.jsonl")]
    assert len(losses) == 8 and losses[-1] < losses[0] - 0.3, losses


def test_two_ranks_equal_one_rank_sft(assets, tmp_path):
    output = train_py(sft_args(assets, tmp_path / "one"))
    assert "Warning" not in output, output  # e.g. DCP's "assuming single process" at the save
    output = train_py(sft_args(assets, tmp_path / "two"), nproc=2)
    assert "Warning" not in output, output  # e.g. FSDP2's "returned a view tensor", once per rank
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
    output = train_py(rl_args(assets, sft_model, tmp_path / "two") + method, nproc=2)
    assert "Warning" not in output, output
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


def test_rl_uses_and_carries_the_starting_checkpoints_template(assets, sft_model, tmp_path, monkeypatch):
    """RL from a checkpoint with its own template (here: a space after <｜Assistant｜>, as the released
    warm-up model's newline): its prompts are rendered by it, its template and generation_config.json
    are carried into the checkpoints, and AdamW runs with the official actor's betas (0.9, 0.95)."""
    import shutil

    import chat
    import degrpo

    start = tmp_path / "start"
    shutil.copytree(sft_model, start)
    spaced = chat.CHAT_TEMPLATE.replace("<｜Assistant｜>{% endif %}", "<｜Assistant｜> {% endif %}")
    chat.save_tokenizer(toy.build_tokenizer(), start, chat_template=spaced)
    generation = {"do_sample": True, "temperature": 0.6, "top_p": 0.95, "eos_token_id": 3}
    (start / "generation_config.json").write_text(json.dumps(generation))
    seen = []

    def rl_step(policy, sampler_model, ref_model, optimizer, prompt_ids, *args, **kwargs):
        seen.append((prompt_ids, [g["betas"] for g in optimizer.param_groups]))
        return real_rl_step(policy, sampler_model, ref_model, optimizer, prompt_ids, *args, **kwargs)

    real_rl_step = degrpo.rl_step
    monkeypatch.setattr(degrpo, "rl_step", rl_step)
    out = tmp_path / "rl"
    ckpt = train.train(train.parse_args([str(a) for a in rl_args(assets, start, out, steps=1)]))
    tok = toy.build_tokenizer()
    problems = [json.loads(line)["problem"] for line in open(assets / "rl.jsonl")]
    expected = {tuple(tok.encode(f"{chat.BOS}{chat.USER}{q}{chat.ASSISTANT} ", add_special_tokens=False).ids)
                for q in problems}
    (prompts, betas), = seen
    assert len(prompts) == 4 and all(tuple(p) in expected for p in prompts)
    assert betas == [(0.9, 0.95)]
    assert chat.chat_template(ckpt) == spaced
    assert json.loads((out / "step_000001" / "generation_config.json").read_text()) == generation


def test_rl_refuses_a_template_that_prefills_the_mode(assets, sft_model, tmp_path):
    import shutil

    import chat

    start = tmp_path / "start"
    shutil.copytree(sft_model, start)
    chat.save_tokenizer(toy.build_tokenizer(), start, chat_template=chat.CHAT_TEMPLATE.replace(
        "<｜Assistant｜>{% endif %}", "<｜Assistant｜><think>{% endif %}"))
    with pytest.raises(checkpoint.RunError, match="ends the generation prompt with '<think>'; RL needs the model to choose"):
        train.train(train.parse_args([str(a) for a in rl_args(assets, start, tmp_path / "rl", steps=1)]))


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


def test_bad_dtype_refused(capsys):
    with pytest.raises(SystemExit):
        train.parse_args(["--model", "m", "--data", "d", "--dtype", "fp16"])
    assert "--dtype must be bfloat16 or float32, got 'fp16'" in capsys.readouterr().err


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


# -----------------------------------------------------------------------------
# Run folders, mistakes in the command, warnings


def run_main(args, capsys):
    """train.main in this process: (exit status, printed output)."""
    try:
        train.main([str(a) for a in args])
        status = 0
    except SystemExit as e:
        status = e.code
    return status, capsys.readouterr().out


def test_rerun_into_a_used_out_is_refused(assets, tmp_path, capsys):
    out = tmp_path / "sft"
    train.train(train.parse_args([str(a) for a in sft_args(assets, out, steps=2)]))
    capsys.readouterr()
    before = sorted(os.listdir(out)), (out / "metrics.jsonl").read_text()
    status, output = run_main(sft_args(assets, out, steps=1), capsys)
    assert status == 1 and output == (f"error: --out {out} holds another run (step_000002, metrics.jsonl): give "
                                      f"--resume to continue it, or another --out to start a new one (or delete them)\n")
    assert (sorted(os.listdir(out)), (out / "metrics.jsonl").read_text()) == before  # nothing lost


def test_resume_with_nothing_to_resume_stops(assets, tmp_path, capsys):
    status, output = run_main(sft_args(assets, tmp_path / "typo") + ["--resume"], capsys)
    assert status == 1 and output.startswith(f"error: --resume: no checkpoint (step_NNNNNN/) in {tmp_path / 'typo'}")
    assert not (tmp_path / "typo").exists()


def test_resume_refuses_a_changed_batch_size(assets, tmp_path, capsys):
    out = tmp_path / "sft"
    train.train(train.parse_args([str(a) for a in sft_args(assets, out, steps=2) + ["--save-every", 1]]))
    checkpoint.shutil.rmtree(out / "step_000002")  # the run stopped after step 1's checkpoint
    metrics = (out / "metrics.jsonl").read_text()
    capsys.readouterr()
    args = sft_args(assets, out, steps=2) + ["--save-every", 1, "--resume"]
    args[args.index("--batch-size") + 1] = 8
    status, output = run_main(args, capsys)
    assert status == 1 and "--batch-size 8, the saved run has 16" in output, output
    assert (out / "metrics.jsonl").read_text() == metrics and checkpoint.checkpoints(out) == ["step_000001"]


def test_resume_with_a_changed_correct_think(assets, sft_model, tmp_path, capsys):
    """The official recipe trains with correct_think 0.5, then resumes with 0.8 (and more steps)."""
    out = tmp_path / "rl"
    train.train(train.parse_args([str(a) for a in rl_args(assets, sft_model, out, steps=1)]))
    capsys.readouterr()
    status, output = run_main(rl_args(assets, sft_model, out, steps=2) + ["--correct-think", 0.8, "--resume"], capsys)
    assert status == 0 and "resume: --correct-think 0.5 -> 0.8" in output and "resume: --steps 1 -> 2" in output, output
    assert "rl step 2/2" in output and "rl step 1/2" not in output
    assert checkpoint.read_trainer_state(out / "step_000002")["config"]["correct_think"] == 0.8


def test_resume_compares_every_config_field(tmp_path):
    """Every TrainConfig field must equal the saved run's unless checkpoint.RESUMABLE_CHANGES lists
    it: a field added to TrainConfig later is refused by default, and a field an older run's saved
    config lacks is accepted only at its default."""
    ckpt = tmp_path / "step_000004"
    os.makedirs(ckpt)

    def claim(saved, new, defaults=dataclasses.asdict(train.TrainConfig())):
        (ckpt / "trainer_state.json").write_text(json.dumps({"step": 4, "config": saved}))
        return checkpoint.claim_run_folder(str(tmp_path), True, new, defaults)

    cfg = dataclasses.asdict(train.parse_args(["--model", "m", "--data", "d", "--out", str(tmp_path), "--steps", "8"]))
    assert claim(cfg, dict(cfg, resume=True)) == (str(ckpt), [])
    path, notes = claim(cfg, dict(cfg, steps=20, keep_last=9, max_batch=4))
    assert path == str(ckpt) and [n.split(" (")[0] for n in notes] == [
        "resume: --keep-last 3 -> 9", "resume: --max-batch 64 -> 4", "resume: --steps 8 -> 20"]
    for change, message in ((dict(lr=1e-5), "--lr 1e-05, the saved run has None"),
                            (dict(group_size=4), "--group-size 4, the saved run has 8"),
                            (dict(data="other.jsonl"), "--data other.jsonl, the saved run has d")):
        with pytest.raises(checkpoint.RunError, match=message):
            claim(cfg, dict(cfg, **change))
    with pytest.raises(checkpoint.RunError, match="sft's cosine lr schedule"):  # --steps: rl only
        claim(dict(cfg, stage="sft"), dict(cfg, stage="sft", steps=20))
    # a field this version has and the saved run lacks (say a flag added later): its default, or refused
    defaults = dict(dataclasses.asdict(train.TrainConfig()), new_flag=False)
    assert "--new-flag is not in the saved config" in claim(cfg, dict(cfg, new_flag=False), defaults)[1][0]
    with pytest.raises(checkpoint.RunError, match="--new-flag True, the saved run has <absent>"):
        claim(cfg, dict(cfg, new_flag=True), defaults)
    with pytest.raises(checkpoint.RunError, match="--old-flag was 1 in the saved run; this version has no such flag"):
        claim(dict(cfg, old_flag=1), cfg)


def test_data_is_checked_before_a_model_loads(assets, tmp_path, monkeypatch):
    def load(*args, **kwargs):
        raise AssertionError("a model was loaded before the data were read")

    monkeypatch.setattr(train.Transformer, "from_pretrained", load)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"problem": "a=1 b=2", "answer": "3"}\nnot json\n')
    cfg = train.parse_args([str(a) for a in rl_args(assets, assets / "base", tmp_path / "rl")])
    cfg.data = str(bad)
    with pytest.raises(checkpoint.RunError, match=r"bad.jsonl:2: not valid JSON"):
        train.train(cfg)


def test_bad_data_path_under_torchrun_is_one_line(assets, tmp_path):
    args = sft_args(assets, tmp_path / "out")
    args[args.index("--data") + 1] = tmp_path / "nope.jsonl"
    returncode, output = run(args, nproc=2, timeout=120)
    assert returncode != 0
    # once (rank 0), no traceback of ours; torchrun adds its own summary of the failed ranks
    assert [line for line in output.splitlines() if "nope.jsonl" in line] == [
        f"error: {tmp_path / 'nope.jsonl'}: No such file or directory"], output
    assert 'train.py", line' not in output


def test_single_process_checkpoint_warns_nothing_and_is_readable(assets, tmp_path):
    """A save and a load without a process group (one process on a CPU) print no warning (DCP's
    "assuming single process"), restore the state exactly, and give others read access."""
    policy = Transformer.from_pretrained(assets / "base", dtype=torch.float32)
    optimizer = torch.optim.AdamW(policy.parameters(), lr=1e-2)
    policy(torch.tensor([[1, 2, 3]])).float().pow(2).mean().backward()
    optimizer.step()
    old = os.umask(0o022)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            ckpt = checkpoint.save_checkpoint(str(tmp_path), 1, policy, optimizer, toy.build_tokenizer(),
                                              {"step": 1}, keep_last=3)
            fresh = Transformer.from_pretrained(assets / "base", dtype=torch.float32)
            fresh_opt = torch.optim.AdamW(fresh.parameters(), lr=1e-2)
            assert checkpoint.load_checkpoint(ckpt, fresh, fresh_opt) == {"step": 1}
    finally:
        os.umask(old)
    for a, b in zip(policy.parameters(), fresh.parameters()):
        torch.testing.assert_close(a, b, atol=0, rtol=0)
    state, fresh_state = optimizer.state_dict()["state"], fresh_opt.state_dict()["state"]
    torch.testing.assert_close(fresh_state[0]["exp_avg_sq"], state[0]["exp_avg_sq"], atol=0, rtol=0)
    for folder, _, files in os.walk(ckpt):
        assert os.stat(folder).st_mode & 0o777 == 0o755, folder
        for f in files:
            assert os.stat(os.path.join(folder, f)).st_mode & 0o777 == 0o644, os.path.join(folder, f)


HUB_ID = "deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B"


def test_model_given_as_a_hub_id(assets, tmp_path, monkeypatch):
    """No such local folder: the checkpoint is fetched with huggingface_hub.snapshot_download (replaced
    here: no network), and the run's config keeps the id as given."""
    import huggingface_hub

    calls = []

    def download(repo_id, **kwargs):
        calls.append(repo_id)
        return str(assets / "base")  # the folder in the Hub cache

    monkeypatch.setattr(huggingface_hub, "snapshot_download", download)
    monkeypatch.chdir(tmp_path)  # no folder named like the id here
    args = sft_args(assets, tmp_path / "sft", steps=1)
    args[args.index("--model") + 1] = HUB_ID
    ckpt = train.train(train.parse_args([str(a) for a in args]))
    assert calls and set(calls) == {HUB_ID}
    assert checkpoint.read_trainer_state(ckpt)["config"]["model"] == HUB_ID


def test_hub_download_failure_is_one_clear_line(assets, tmp_path, monkeypatch, capsys):
    import huggingface_hub

    def offline(repo_id, **kwargs):
        raise huggingface_hub.errors.LocalEntryNotFoundError("cannot reach the Hub: check your internet connection")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit:
        train.main(["--stage", "sft", "--model", "someone/no-such-model", "--data", str(assets / "sft.jsonl"),
                    "--out", str(tmp_path / "out")])
    assert exit.value.code == 1
    assert capsys.readouterr().out == ("error: someone/no-such-model: no such local folder, and fetching it from the "
                                       "Hugging Face Hub failed (LocalEntryNotFoundError: cannot reach the Hub: check "
                                       "your internet connection)\n")
    # a path (not an owner/name id) is never sent to the Hub
    with pytest.raises(FileNotFoundError, match="no such checkpoint folder"):
        train.chat.resolve_model(str(tmp_path / "runs" / "sft" / "step_000001"))


def test_rl_progress_line_counts_malformed_samples_and_small_gradients():
    m = dict(reward=-1.0, think=0, short=0, samples=16, acc_think=0.0, acc_short=0.0, malformed=16, response_len=8.0,
             kl=0.0, clip_frac=0.0, grad_norm=1e-5)
    line = train.progress("rl", m)
    assert "think 0/16" in line and "short 0 " in line and "malformed 16" in line and "grad 1e-05" in line, line


def readme_block(heading):
    """The commands of the first bash block after `heading` in README.md, continuation lines joined."""
    text = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()
    block = text[text.index(heading):].split("```bash\n", 1)[1].split("```", 1)[0]
    lines = [line for line in block.replace("\\\n", " ").splitlines() if line.strip() and not line.startswith("#")]
    return [line.split() for line in lines]


@pytest.mark.skipif(not os.path.isfile(os.path.join(BASE_MODEL_DIR, "tokenizer.json")),
                    reason=f"no tokenizer.json in {BASE_MODEL_DIR} (the real R1-Distill tokenizer)")
def test_readme_dry_run_with_the_real_tokenizer(tmp_path):
    """README's dry run as written (its runs/dry folder moved to a temporary one): a random checkpoint
    with the real R1-Distill tokenizer, one SFT step, one RL step, an evaluation."""
    commands = readme_block("### A dry run on a CPU")
    assert [c[:2] for c in commands] == [["python", "make_random_checkpoint.py"], ["python", "train.py"],
                                         ["python", "train.py"], ["python", "eval.py"]]
    for command in commands:
        command = [sys.executable] + [a.replace("runs/dry", str(tmp_path / "dry")) for a in command[1:]]
        proc = subprocess.run(command, cwd=ROOT, env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True,
                              text=True, timeout=300)
        assert proc.returncode == 0, " ".join(command) + "\n" + proc.stdout[-3000:] + proc.stderr[-3000:]
        assert "Warning" not in proc.stdout + proc.stderr, proc.stdout + proc.stderr
    metrics = [json.loads(line) for line in open(tmp_path / "dry" / "rl" / "metrics.jsonl")]
    assert [m["step"] for m in metrics] == [1] and metrics[0]["samples"] == 4
    import chat

    tok = chat.load_tokenizer(tmp_path / "dry" / "rl" / "step_000001")
    assert tok.token_to_id(chat.SHORT) == 151650 and tok.get_vocab_size() == 151665
    summary = json.load(open(tmp_path / "dry" / "eval" / "summary.json"))
    assert summary["results"]["aime24"]["samples"] == 2
# The GPU's precision path: --dtype bfloat16 (FSDP2 computes in bf16 over fp32 master weights; the
# sampler and reference copies and the saved weights are bf16), on CPU with gloo, and on a GPU.

# The mean |trainer - sampler| log-prob of the same tokens (the logp_gap metric), both in bf16,
# before any update. Both compute the logits in bf16 and the log-softmax in fp32, but along
# different paths (the sampler one token at a time from a bf16 KV cache, the trainer the whole
# sequence, through FSDP2 and the fused kernel), so they round differently: bf16 keeps 8
# significant bits, an error of up to 2^-8 |z| per rounding. This model's logits are of order 1
# (near uniform: entropy ~3.5 nats), so that is ~4e-3 per rounding, partly cancelling; measured
# 1.4e-4 to 1.9e-4 on CPU. 0.01 leaves room for a GPU's other kernels and still fails on a different
# distribution (a temperature or vocabulary cut that differs, a mis-indexed KV cache: gaps of
# order 0.1 to 1).
BF16_LOGP_GAP = 0.01


def test_bf16_rl_step_two_ranks_matches_fp32(assets, sft_model, tmp_path):
    """One RL step (two optimizer updates) on 2 gloo ranks with --dtype bfloat16, and the same step in
    float32 on the same rollout (sampled by the bf16 sampler copy): the gradient each update steps
    with agrees within 5% (relative L2). Why 5%: the bf16 forward and backward round every
    activation and gradient to 8 significant bits (2^-8 = 0.4% per rounding) through two blocks,
    the loss and the fused log-probs, about 1% in all (measured 0.6%); 5% is a margin over that, and a wrong
    step (a dropped micro-batch, a missing rank's gradient, the wrong normalisation) is off by
    tens of percent."""
    script = tmp_path / "bf16_vs_fp32.py"
    script.write_text(f"""
import json, os, sys
sys.path.insert(0, {str(ROOT)!r})
import torch, torch.distributed as dist
import degrpo, train
rollouts, grads = [], {{}}
real_sample, real_step = degrpo.sample_rollouts, degrpo.clip_and_step
def sample_rollouts(*args, **kwargs):  # the bf16 run samples; the fp32 run steps on the same tokens
    if not rollouts:
        rollout = real_sample(*args, **kwargs)
        # rewards that differ inside every group (this model's answers are all wrong), so that the
        # policy term has a gradient, not only the KL and entropy terms
        rollout.rewards = torch.tensor([1.0 if (i + len(r)) % 2 else -1.0 for i, r in enumerate(rollout.responses)])
        rollouts.append(rollout)
    return rollouts[0]
def clip_and_step(model, optimizer, grad_clip):  # the full gradient of every update (a collective)
    grads.setdefault(dtype, []).append(torch.cat([p.grad.full_tensor().flatten() for p in model.parameters()]))
    return real_step(model, optimizer, grad_clip)
degrpo.sample_rollouts, degrpo.clip_and_step = sample_rollouts, clip_and_step
out = sys.argv[1]
for dtype in ("bfloat16", "float32"):
    train.train(train.parse_args(sys.argv[2:] + ["--dtype", dtype, "--out", os.path.join(out, dtype)]))
if dist.get_rank() == 0:
    rel = [((a - b).norm() / b.norm()).item() for a, b in zip(grads["bfloat16"], grads["float32"])]
    with open(os.path.join(out, "result.json"), "w") as f:
        json.dump({{"rel": rel, "grad_norm": [g.norm().item() for g in grads["float32"]]}}, f)
dist.destroy_process_group()
""")
    out = tmp_path / "out"
    args = [out] + rl_args(assets, sft_model, out, steps=1) + ["--lr", 1e-6]  # the official RL lr
    returncode, output = run(args, nproc=2, script=script)
    assert returncode == 0, output[-5000:]
    result = json.load(open(out / "result.json"))
    assert len(result["rel"]) == 2 and min(result["grad_norm"]) > 0.1, result  # the KL and entropy terms alone: ~1e-4
    assert max(result["rel"]) < 0.05, result
    assert min(result["rel"]) > 1e-4, result  # the bf16 run did compute in bf16 (float32 twice: exactly 0)
    bf16, fp32 = ([json.loads(line) for line in open(out / d / "metrics.jsonl")] for d in ("bfloat16", "float32"))
    assert bf16[0]["reward"] == fp32[0]["reward"]  # one rollout
    assert bf16[0]["logp_gap"] < BF16_LOGP_GAP, bf16  # bf16 trainer vs bf16 sampler
    assert 0 < fp32[0]["logp_gap"] < BF16_LOGP_GAP, fp32  # fp32 trainer vs bf16 sampler
    saved = weights(out / "bfloat16" / "step_000001")
    assert {t.dtype for t in saved.values()} == {torch.bfloat16}
    assert json.load(open(out / "bfloat16" / "step_000001" / "config.json"))["torch_dtype"] == "bfloat16"
    assert {t.dtype for t in weights(out / "float32" / "step_000001").values()} == {torch.float32}


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=needs_cuda(
    "train.py on one GPU: a process group of one over NCCL, bf16, the compiled Triton kernel, save and --resume"))])
def test_bf16_group_of_one_save_and_resume(assets, sft_model, tmp_path, device):
    """python train.py (no torchrun) with --dtype bfloat16: a process group of one (gloo on CPU,
    NCCL on a GPU), FSDP2 in bf16, bf16 checkpoints that transformers loads, and --resume from step
    1 ending where the straight run ends. The CPU is deterministic: the weights agree exactly. On a
    GPU the backward's atomic adds may order sums differently from run to run: the resumed weights
    may then differ by a rounding of the fp32 master weights, one bf16 step (2^-7 relative) at most."""
    import transformers

    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    args = ["--dtype", "bfloat16", "--updates-per-rollout", "1"]  # one update: logp_gap is measured before it
    train_py(rl_args(assets, sft_model, straight) + args, device=device)
    os.makedirs(resumed)
    os.rename(straight / "step_000001", resumed / "step_000001")
    output = train_py(rl_args(assets, sft_model, resumed) + args + ["--resume"], device=device)
    assert "resumed from" in output and "rl step 1/2" not in output
    a, b = weights(straight / "step_000002"), weights(resumed / "step_000002")
    assert max((a[k].float() - v.float()).abs().max().item() for k, v in weights(sft_model).items()) > 1e-3
    for k in a:
        assert a[k].dtype == torch.bfloat16
        torch.testing.assert_close(b[k].float(), a[k].float(), atol=0, rtol=0 if device == "cpu" else 2**-7, msg=k)
    metrics = [json.loads(line) for line in open(straight / "metrics.jsonl")]
    assert all(0 < m["logp_gap"] < BF16_LOGP_GAP for m in metrics), metrics
    hf = transformers.AutoModelForCausalLM.from_pretrained(straight / "step_000002").eval()
    assert hf.dtype == torch.bfloat16
    ours = Transformer.from_pretrained(straight / "step_000002")
    idx = torch.randint(0, ours.config.vocab_size, (2, 9))
    with torch.no_grad():
        torch.testing.assert_close(hf(idx).logits.float(), ours(idx).float(), atol=0.05, rtol=0)


def test_train_frees_its_models_when_it_returns(assets, sft_model, tmp_path, monkeypatch):
    """Once train() returns, its models are gone, even those a reference cycle holds (an exception caught
    anywhere below keeps its frames, and their locals, until the garbage collector runs): a sharded
    model holds the process group, and one still alive at the interpreter's exit aborted a rank there
    ("terminate called without an active exception": gloo's threads; 3 of 26 runs of two train()
    calls on 2 ranks in bf16). It also frees the memory for the next run in the same process (toy.py)."""
    import gc
    import weakref

    made, real = [], Transformer.from_pretrained.__func__

    def from_pretrained(cls, *args, **kwargs):
        model = real(cls, *args, **kwargs)
        made.append(weakref.ref(model))
        return model

    monkeypatch.setattr(Transformer, "from_pretrained", classmethod(from_pretrained))
    gc.collect()
    gc.disable()  # only train()'s own collection may free them
    try:
        train.train(train.parse_args([str(a) for a in rl_args(assets, sft_model, tmp_path / "rl", steps=1)]))
        assert len(made) == 3 and [ref() for ref in made] == [None] * 3  # policy, sampler and reference copies
    finally:
        gc.enable()
