"""The built distribution holds every package under the names users import, the Triton kernels'
import name (`ratpt_kernels`) cannot be shadowed by Hugging Face's unrelated `kernels` package, and
importing ratpt loads no compiler until something compiles."""

import os
import shutil
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def declared_packages() -> list[str]:
    return tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]


def test_every_package_folder_is_declared():
    folders = {
        ".".join(init.parent.relative_to(REPO).parts)
        for top in ("ratpt", "data_prep")
        for init in (REPO / top).rglob("__init__.py")
    }
    assert set(declared_packages()) == folders | {"ratpt_kernels"}


def test_wheel_installs_the_kernels_as_ratpt_kernels(tmp_path):
    source = tmp_path / "source"  # a copy: setuptools leaves build/ and *.egg-info in the folder it builds
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, source)
    for folder in ("ratpt", "data_prep", "kernels"):
        shutil.copytree(REPO / folder, source / folder, ignore=shutil.ignore_patterns("__pycache__"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(tmp_path),
                    str(source)], check=True, capture_output=True)
    (wheel,) = tmp_path.glob("ratpt-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    kernel_files = {f"ratpt_kernels/{p.name}" for p in (REPO / "kernels").iterdir() if p.suffix in (".py", ".json")}
    assert kernel_files <= names
    assert not any(name.startswith("kernels/") for name in names)
    top_levels = {name.split("/")[0] for name in names if not name.startswith("ratpt-")}
    assert top_levels == {"ratpt", "data_prep", "ratpt_kernels"}


def test_a_foreign_kernels_package_does_not_shadow_ratpts(tmp_path):
    foreign = tmp_path / "kernels"
    foreign.mkdir()
    (foreign / "__init__.py").write_text("FOREIGN = True\n")
    probe = ("import importlib, ratpt, kernels, ratpt_kernels.autograd\n"
             "m = importlib.import_module('ratpt.ops.rat_mixing')\n"
             "print(kernels.FOREIGN, m.split_projection is ratpt_kernels.autograd.split_projection)")
    out = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, check=True, capture_output=True, text=True)
    assert out.stdout.split() == ["True", "True"]


def test_the_kernel_folder_refuses_to_import_as_kernels_and_registers_nothing_twice():
    """transformers probes `from kernels import ...` (its hub package); from the repository root that
    would find kernels/ under the wrong name and register ratpt's custom ops a second time."""
    probe = ("import ratpt_kernels, torch\n"
             "try:\n    import kernels\nexcept ImportError as err:\n    print('refused', 'ratpt_kernels' in str(err))\n"
             "q = torch.zeros(1, 4); cache = torch.zeros(1, 1, 2, 4)\n"
             "ratpt_kernels.rat_decode(q, q, q, q, torch.zeros(4), cache, cache.clone(), q.clone(), q.clone(),\n"
             "                         torch.tensor([1]), 2, 4, 10000.0)\n"
             "print('decoded')")
    out = subprocess.run([sys.executable, "-c", probe], cwd=REPO, check=True, capture_output=True, text=True,
                         env={**os.environ, "TRITON_INTERPRET": "1"})
    assert out.stdout.split() == ["refused", "True", "decoded"]


def test_from_the_repository_root_importing_ratpt_hides_the_kernel_folder_from_transformers_probe():
    """Newer transformers import whatever `importlib.util.find_spec("kernels")` finds, without catching
    the ImportError kernels/ raises under that name; after `import ratpt` the probe must find nothing."""
    probe = ("import importlib.util\nprint(importlib.util.find_spec('kernels') is not None)\n"
             "import ratpt\nprint(importlib.util.find_spec('kernels') is not None)")
    out = subprocess.run([sys.executable, "-c", probe], cwd=REPO, check=True, capture_output=True, text=True)
    assert out.stdout.split() == ["True", "False"]


def test_importing_the_trainer_loads_no_compiler_backend():
    """Every `ratpt` process (each rank, each CLI command) pays for what importing it loads: inductor, two
    seconds, only once something compiles."""
    probe = "import sys, ratpt.train.trainer, ratpt.generate; print('torch._inductor.compile_fx' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", probe], cwd=REPO, capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "False"


@pytest.mark.parametrize("command", [["evaluate", "--tasks", "arc_easy"], ["evaluate-long"],
                                     ["export-hf", "--out", "x"]], ids=lambda c: c[0])
def test_a_missing_model_folder_is_named_before_the_evaluation_libraries_load(command, tmp_path):
    missing = str(tmp_path / "no_such_export")
    probe = ("import sys\nfrom ratpt.cli import main\ntry:\n    main(sys.argv[1:])\nexcept SystemExit as exit:\n"
             "    print(exit.code, 'transformers' in sys.modules, 'lm_eval' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", probe, command[0], missing, *command[1:]], cwd=REPO,
                          capture_output=True, text=True, check=True)
    assert done.stdout.split()[-3:] == ["2", "False", "False"], done.stdout + done.stderr
    assert f"pretrained folder {missing} does not exist" in done.stderr


def test_the_command_line_loads_the_data_loaders_libraries_only_for_a_command_that_reads_data():
    """mosaicml-streaming (which imports transformers) costs seconds at start-up: `ratpt export` and
    `ratpt generate` do without it, and `ratpt train` reports a mistake in its config before loading it."""
    probe = ("import sys\nfrom ratpt.cli import main\ncode = main(['train', 'no_such_config.yaml'])\n"
             "print(code, 'streaming' in sys.modules, 'transformers' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", probe], cwd=REPO, capture_output=True, text=True, check=True)
    assert done.stdout.split()[-3:] == ["2", "False", "False"], done.stdout + done.stderr
