"""The layout's promises to its users: no top-level name of ours hides a package that the ecosystem
imports (a user runs transformers, TRL or our checkpoints from the project's root), and the files
that README's Layout section says can be copied alone work alone."""

import importlib.metadata
import os
import re
import shutil
import subprocess
import sys

import pytest

from conftest import ROOT


def top_level_names():
    """The project's importable top-level names: root *.py modules and folders with an __init__.py."""
    names = [f[:-3] for f in os.listdir(ROOT) if f.endswith(".py")]
    names += [d for d in os.listdir(ROOT) if os.path.isfile(os.path.join(ROOT, d, "__init__.py"))]
    assert {"model", "sampler", "degrpo", "logprob_kernels"} <= set(names)  # the walk finds the project
    return sorted(names)


def test_no_top_level_name_shadows_a_package():
    """From the project's root, `import X` finds our X first (the current folder leads sys.path), so a
    module or folder of ours named like a package hides that package from every library that imports
    it. Checked against three lists: the distributions installed here (their top-level import names),
    the packages transformers imports when they are present (its dependency table: `kernels` is one),
    and the standard library."""
    installed = importlib.metadata.packages_distributions()  # import name -> [distributions]
    from transformers.dependency_versions_table import deps  # distribution name -> requirement

    known = {re.split(r"[\[<>=!~ ]", d)[0].lower().replace("-", "_") for d in deps}
    for name in top_level_names():
        assert name not in installed, f"{name}: also the import name of {installed[name]} (installed here)"
        assert name.lower() not in known, f"{name}: a package that transformers imports when installed"
        assert name not in sys.stdlib_module_names, f"{name}: a standard library module"


STAND_IN = '''"""A stand-in for Hugging Face's `kernels` package: the names transformers imports, doing nothing."""
__version__ = "{version}"
STAND_IN = True


def use_kernel_forward_from_hub(*args, **kwargs):  # decorators in transformers' model files
    return lambda obj: obj


use_kernelized_func = use_kernel_forward_from_hub


def __getattr__(name):  # any other name (CUDAProperties, Mode, ...): an inert class
    return type(name, (), {{"__init__": lambda self, *args, **kwargs: None}})
'''


def test_transformers_models_import_from_the_root_with_kernels_installed(tmp_path):
    """A stand-in `kernels` distribution (at the lowest version transformers supports, so that
    transformers uses it) on PYTHONPATH, which sys.path puts after the current folder; from the
    project's root, `import kernels` must find the stand-in and transformers' Qwen2 model class must
    import. With our kernel folder named `kernels/` (before issue 22) this failed: `import kernels`
    found our folder (the first check here), and transformers' hub integration (`from kernels import
    CUDAProperties, ...`) raised ImportError: cannot import name 'CUDAProperties' from 'kernels'
    (.../kernels/__init__.py), as the issue measured with transformers 5.25 and kernels 0.19.1 (checked
    by hand with transformers 5.23 and this stand-in)."""
    from transformers.dependency_versions_table import deps

    version = re.search(r">=\s*([\d.]+)", deps["kernels"]).group(1)  # e.g. "kernels>=0.18.2,<0.19"
    site = tmp_path / "site"
    (site / "kernels").mkdir(parents=True)
    (site / "kernels" / "__init__.py").write_text(STAND_IN.format(version=version))
    info = site / f"kernels-{version}.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: kernels\nVersion: {version}\n")
    (info / "top_level.txt").write_text("kernels\n")
    code = ("import kernels, transformers\n"
            "assert getattr(kernels, 'STAND_IN', False), f'import kernels found {kernels.__file__}'\n"
            "from transformers.utils.import_utils import is_kernels_available\n"
            "assert is_kernels_available(), 'transformers does not use the stand-in: the test checks nothing'\n"
            "print(transformers.Qwen2ForCausalLM.__name__)\n")
    env = {**os.environ, "PYTHONPATH": str(site)}
    run = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0 and run.stdout.strip() == "Qwen2ForCausalLM", run.stderr[-2000:]


# -----------------------------------------------------------------------------
# Copying one file: each set README's Layout section lists, alone in an empty folder outside the project


def readme_copies():
    """README's list under Layout: "- `first` alone ..." or "- `first` with `a`, `b` ..." -> {first: [files]}."""
    text = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()
    layout = text[text.index("## Layout"):text.index("\n## ", text.index("## Layout") + 1)]
    copies = {}
    for line in layout.splitlines():
        if line.startswith("- `"):
            names = re.findall(r"`([^`]+)`", line.split("(")[0])  # the backticked names before any remark
            copies[names[0]] = names
    return copies


TINY = ("cfg = ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2, "
        "num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=64, dtype='float32')\n"
        "torch.manual_seed(0)\n"
        "net = Transformer(cfg).eval()\n")

USES = {  # a few lines of each copy, checked against plain torch or known values
    "model.py": "import torch\nfrom model import ModelConfig, Transformer\n" + TINY + (
        "net.save_pretrained('ckpt')\n"
        "again = Transformer.from_pretrained('ckpt', dtype=torch.float32)\n"
        "x = torch.randint(0, 64, (2, 7))\n"
        "with torch.no_grad():\n"
        "    assert torch.equal(net(x), again(x)) and net(x).shape == (2, 7, 64)\n"),
    "logprob_kernels/": (
        "import torch\nfrom logprob_kernels import fused_logprobs\n"
        "h, w, t = torch.randn(9, 16, dtype=torch.float64), torch.randn(50, 16, dtype=torch.float64), torch.randint(0, 50, (9,))\n"
        "naive = torch.log_softmax(h @ w.T / 0.7, -1).gather(-1, t[:, None])[:, 0]\n"
        "torch.testing.assert_close(fused_logprobs(h, w, t, temperature=0.7), naive.float())\n"),
    "rewards.py": (
        "from rewards import thinkless_reward\n"
        "assert thinkless_reward('<short>so \\\\boxed{\\\\frac{1}{2}}', '0.5') == 1.0  # math-verify's equivalence\n"
        "assert thinkless_reward('<think>long</think>\\n\\n\\\\boxed{3}', '3') == 0.5\n"
        "assert thinkless_reward('<short>\\\\boxed{4}', '3') == -1.0\n"),
    "sampler.py": "import torch\nfrom model import ModelConfig, Transformer\nfrom sampler import generate\n" + TINY + (
        "out = generate(net, [[1, 2, 3], [4]], 6, temperature=1.0, n=2, seed=0, max_batch=3)\n"
        "assert [len(c.tokens) for g in out for c in g] == [6] * 4 and all(c.finish_reason == 'length' for g in out for c in g)\n"
        "one_row = generate(net, [[1, 2, 3], [4]], 6, temperature=1.0, n=2, seed=0, max_batch=1)\n"
        "assert [c.tokens for g in one_row for c in g] == [c.tokens for g in out for c in g]  # whatever the batch\n"
        "greedy = generate(net, [[1, 2, 3]], 1, temperature=0)[0][0].tokens\n"
        "with torch.no_grad():\n"
        "    assert greedy == [net(torch.tensor([[1, 2, 3]]))[0, -1].argmax().item()]\n"),
    "degrpo.py": "import torch\nfrom model import ModelConfig, Transformer\n" + (
        "from degrpo import group_advantages, kl_k3, policy_loss, response_logprobs\n") + TINY + (
        "adv = group_advantages(torch.tensor([1.0, -1.0, 0.5, 0.5]), 2)\n"
        "assert adv.tolist() == [1.0, -1.0, 0.0, 0.0]\n"
        "logp = torch.randn(4, 5)\n"
        "loss, _ = policy_loss(logp, logp, torch.tensor([1.0, -0.5, 0.25, 0.0]), torch.ones(4, 5, dtype=torch.bool), alpha=0.001)\n"
        "assert abs(loss.item() + 1.001 * 0.1875) < 1e-6  # on-policy: -(alpha + 1) mean(A)\n"
        "assert kl_k3(logp, logp).abs().max() == 0\n"
        "with torch.no_grad():\n"
        "    lp = response_logprobs(net, [[1, 2, 3]], [[4, 5]], temperature=1.0)\n"
        "    naive = torch.log_softmax(net(torch.tensor([[1, 2, 3, 4]]))[0, 2:4], -1)[[0, 1], [4, 5]]\n"
        "torch.testing.assert_close(lp[0], naive)\n"),
}


def test_readme_lists_the_copies_tested_here():
    assert set(readme_copies()) == set(USES)


@pytest.mark.parametrize("first", sorted(USES))
def test_a_copy_works_alone(first, tmp_path):
    """The files README lists for `first`, copied into an empty folder (not under the project), run
    there by a fresh python with no PYTHONPATH: an import of any other file of ours fails."""
    folder = tmp_path / "elsewhere"
    folder.mkdir()
    assert not str(folder).startswith(ROOT)
    for name in readme_copies()[first]:
        src = os.path.join(ROOT, name.rstrip("/"))
        if os.path.isdir(src):
            shutil.copytree(src, folder / name.rstrip("/"), ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy(src, folder)
    module = first.rstrip("/").removesuffix(".py")
    code = (f"import os, {module}\n"
            f"assert os.path.dirname(os.path.abspath({module}.__file__)).startswith(os.getcwd()), {module}.__file__\n"
            + USES[first])
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    run = subprocess.run([sys.executable, "-c", code], cwd=folder, env=env, capture_output=True, text=True,
                         timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
