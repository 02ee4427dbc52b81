"""The core install (`pip install -e .`) runs the plain examples; a technique that needs an extra says which.

CI installs every extra (`.[dev]` includes `.[all]`), so the core install is simulated: in a fresh interpreter
`sys.modules[name] = None` makes `import name` fail and `importlib.util.find_spec(name)` return None, which is
how transformers, accelerate and PEFT decide that a package is not installed.
"""

import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from conftest import SCRIPTS, script_env
from hftrain.errors import UserError
from hftrain.extras import EXTRAS, check_training_extras, require_extra

# As if only the core install were there: none of the extras' packages can be found.
CORE_ONLY = f"import sys\nfor name in {sorted(EXTRAS)!r}:\n    sys.modules[name] = None\n"


def run_core(code: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", CORE_ONLY + code], cwd=cwd, env=script_env(), capture_output=True, text=True, timeout=300
    )


def run_script_core(script: str, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    code = f"import runpy\nsys.argv = {[str(SCRIPTS / script), *args]!r}\nrunpy.run_path(sys.argv[0], run_name='__main__')\n"
    return run_core(code, cwd)


def test_every_module_and_script_imports_without_the_extras(tmp_path):
    """No module of hftrain and no script imports an optional package at module level (each script is loaded
    as a module, not run): without the extras, the scripts start and say what is missing instead of a traceback."""
    modules = sorted(p.stem for p in (SCRIPTS / "hftrain").glob("*.py") if p.stem != "__init__")
    scripts = sorted(str(p) for p in SCRIPTS.glob("**/*.py") if "hftrain" not in p.parts)
    code = (
        "import importlib, importlib.util, runpy\n"
        f"assert all(importlib.util.find_spec(name) is None for name in {sorted(EXTRAS)!r})\n"
        f"for m in {modules!r}:\n    importlib.import_module('hftrain.' + m)\n"
        f"for s in {scripts!r}:\n    runpy.run_path(s, run_name='loaded_not_run')\n"
        "print('imported', len(sys.modules))\n"
    )
    proc = run_core(code, tmp_path)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "imported" in proc.stdout
    assert len(modules) > 10 and len(scripts) > 15


def test_getting_started_trains_on_the_core_install(workdir, tmp_path):
    """The quick start's run needs none of the extras, and without bitsandbytes the CPU 4-bit kernel warning
    ("Failed to load CPU gemm_4bit_forward from kernels-community") is not printed."""
    out = tmp_path / "gs"
    proc = run_script_core(
        "trainer/getting_started.py", "--max_steps", "3", "--save_strategy", "no", "--output_dir", str(out), cwd=workdir
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert (out / "metrics.json").exists()
    assert "done: 3 steps" in proc.stdout
    assert "gemm_4bit_forward" not in proc.stdout + proc.stderr


@pytest.mark.parametrize(
    "script, args, sentence",
    [
        ("trainer/qlora.py", [], 'error: qlora.py needs bitsandbytes: pip install -e ".[quant]"'),
        (
            "trainer/sharded/zero.py",
            [],
            'error: zero.py with --deepspeed deepspeed_config.json needs deepspeed: pip install -e ".[deepspeed]"',
        ),
    ],
)
def test_a_script_says_which_extra_it_needs_before_any_work(workdir, tmp_path, script, args, sentence):
    out = tmp_path / "out"
    proc = run_script_core(script, *args, "--output_dir", str(out), cwd=workdir)
    assert proc.returncode == 1, proc.stderr[-4000:]
    assert proc.stderr.strip().splitlines()[-1] == sentence
    assert not out.exists()  # nothing was written: not even the run lock


@pytest.mark.parametrize(
    "flags, sentence",
    [
        (dict(optim="adamw_bnb_8bit"), 'galore.py with --optim adamw_bnb_8bit needs bitsandbytes: pip install -e ".[quant]"'),
        (dict(optim="paged_adamw_8bit"), 'galore.py with --optim paged_adamw_8bit needs bitsandbytes: pip install -e ".[quant]"'),
        (dict(optim="galore_adamw"), 'galore.py with --optim galore_adamw needs galore-torch: pip install -e ".[galore]"'),
        (dict(optim="adamw_torch_8bit"), 'galore.py with --optim adamw_torch_8bit needs torchao: pip install -e ".[fp8]"'),
        (dict(use_liger_kernel=True), 'galore.py with --use_liger_kernel needs liger-kernel: pip install -e ".[liger]"'),
        (dict(deepspeed="ds.json"), 'galore.py with --deepspeed ds.json needs deepspeed: pip install -e ".[deepspeed]"'),
    ],
)
def test_the_missing_extra_sentence(monkeypatch, flags, sentence):
    """In-process: find_spec says the optional packages are missing, the Trainer flags that need them are refused."""
    import importlib.util

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name in EXTRAS else real_find_spec(name, *a))
    monkeypatch.setattr(sys, "argv", ["scripts/trainer/galore.py"])
    monkeypatch.delenv("ACCELERATE_USE_DEEPSPEED", raising=False)
    args = SimpleNamespace(**{"deepspeed": None, "use_liger_kernel": False, "optim": "adamw_torch", **flags})
    with pytest.raises(UserError) as err:
        check_training_extras(args)
    assert str(err.value) == f"error: {sentence}"
    check_training_extras(SimpleNamespace(deepspeed=None, use_liger_kernel=False, optim="adamw_torch"))  # core: nothing needed
    with pytest.raises(UserError, match=r'^error: galore.py needs bitsandbytes: pip install -e "\.\[quant\]"$'):
        require_extra("bitsandbytes")
