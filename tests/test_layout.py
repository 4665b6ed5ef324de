"""The layout's promises to its users: no top-level name of ours hides a package that the ecosystem
imports (a user runs transformers, TRL or our checkpoints from the project's root), and the files
that README's Layout section says can be copied alone work alone."""

import importlib.metadata
import os
import re
import subprocess
import sys

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
    import. With our kernel folder named `kernels/` (before issue 22) this failed as transformers 5.25
    with kernels 0.19.1 does: `import kernels` found our folder, and transformers' hub integration
    (`from kernels import CUDAProperties, ...`) raised ImportError: cannot import name
    'CUDAProperties' from 'kernels' (.../kernels/__init__.py)."""
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
