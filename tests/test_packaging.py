"""The package installs what the model needs and nothing more; the extras and console scripts are wired right.

`pip install darknet53-jax` must give a working `flax_darknet` without PyTorch; the trainers' and the porting's
dependencies live in extras; README, docs and CI name the same torch versions.
"""

from __future__ import annotations

import ast
import importlib
import importlib.metadata
import re
import subprocess
import sys
from pathlib import Path

import pytest

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    tomllib = pytest.importorskip("tomli")

ROOT = Path(__file__).resolve().parent.parent
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
PROJECT = PYPROJECT["project"]

# What the model package may depend on (the team rule: flax_darknet imports only jax, flax, numpy).
CORE_DEPENDENCIES = {"numpy", "jax", "flax"}
# Must not be loaded by `import flax_darknet` plus a linen forward pass. flax's own distribution requires optax and
# orbax-checkpoint, so a core install does install those two, but `flax.linen` imports neither (`flax.nnx` does
# import optax, which is why flax_darknet loads its NNX model only on first use); the check asserts all of them,
# and would need loosening for those two only if a flax release made linen import them.
NOT_LOADED_BY_MODEL = ("torch", "orbax", "grain", "optax", "tensorboardX", "matplotlib", "PIL", "safetensors")
CONSOLE_SCRIPTS = {
    "darknet53-train": "train.flax:main",
    "darknet53-predict": "train.predict:main",
    "port-weights": "porting.cli:main",
    "darknet53-export": "porting.export_cli:main",
    "darknet53-serve-predict": "porting.serve_predict:main",
}
# Packages whose third-party imports the extras (plus the core) must cover, and the extras that serve them.
EXTRA_USERS = {"porting": ("porting",), "train": ("train", "porting", "torch_ref"), "export": ("porting",)}
# porting's files that only the export extra serves (they import onnx / onnxruntime).
EXPORT_FILES = {"export.py", "export_cli.py", "serve_predict.py"}
LOCAL_PACKAGES = {"darknet_arch", "flax_darknet", "torch_ref", "porting", "train", "bench", "tests"}
# Imported directly but installed by a declared dependency: train/data/pipeline.py parses grain's absl flags.
COMES_WITH = {"absl-py": "grain"}


def _name(requirement: str) -> str:
    """Distribution name of a requirement string, normalised (PEP 503)."""
    match = re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)", requirement)
    assert match, f"unparseable requirement {requirement!r}"
    return re.sub(r"[-_.]+", "-", match.group(1)).lower()


def _extra_names(extra: str) -> set[str]:
    """Distribution names an extra installs, following self-references such as darknet53-jax[porting]."""
    names: set[str] = set()
    for requirement in PROJECT["optional-dependencies"][extra]:
        name = _name(requirement)
        if name == _name(PROJECT["name"]):
            for inner in re.search(r"\[(.*)\]", requirement).group(1).split(","):
                names |= _extra_names(inner.strip())
        else:
            names.add(name)
    return names


def _third_party_imports(package: str, skip: set[str] = frozenset()) -> set[str]:
    """Top-level module names a local package imports (in its files but `skip`), stdlib and local ones left out."""
    found = set()
    for path in (ROOT / package).rglob("*.py"):
        if path.name in skip:
            continue
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                modules = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                modules = [node.module]
            else:
                continue
            for module in modules:
                top = module.split(".")[0]
                if top not in sys.stdlib_module_names and top not in LOCAL_PACKAGES:
                    found.add(top)
    return found


def test_core_dependencies_are_exactly_numpy_jax_flax() -> None:
    assert {_name(r) for r in PROJECT["dependencies"]} == CORE_DEPENDENCIES


def test_torch_is_only_in_extras_and_the_train_extra_includes_porting() -> None:
    assert "torch" in _extra_names("porting")
    assert _extra_names("porting") <= _extra_names("train") <= _extra_names("test")
    assert {"timm", "pytest"} <= _extra_names("test")


@pytest.mark.parametrize(("extra", "packages"), sorted(EXTRA_USERS.items()))
def test_extras_cover_every_third_party_import(extra: str, packages: tuple[str, ...]) -> None:
    declared = CORE_DEPENDENCIES | _extra_names(extra)
    to_dist = importlib.metadata.packages_distributions()
    missing = {}
    for package in packages:
        for module in _third_party_imports(package, skip=set() if extra == "export" else EXPORT_FILES):
            dists = {_name(d) for d in to_dist.get(module, [module])}
            if not any(d in declared or COMES_WITH.get(d) in declared for d in dists):
                missing[module] = (package, sorted(dists))
    assert not missing, f"imports not installed by core + [{extra}]: {missing}"


def test_console_scripts_point_to_main_functions_that_parse_help(capsys: pytest.CaptureFixture[str]) -> None:
    assert PROJECT["scripts"] == CONSOLE_SCRIPTS
    for script, target in CONSOLE_SCRIPTS.items():
        module, attr = target.split(":")
        main = getattr(importlib.import_module(module), attr)
        assert callable(main), target
        # argparse exits 0 after printing the help: the function takes argv and reaches its parser.
        with pytest.raises(SystemExit) as exit_info:
            main(["--help"])
        assert exit_info.value.code == 0, script
        assert "usage:" in capsys.readouterr().out, script


@pytest.mark.slow
def test_import_and_forward_load_no_trainer_or_torch_module() -> None:
    code = (
        "import sys\n"
        "import jax, jax.numpy as jnp\n"
        "import flax_darknet\n"
        "from darknet_arch import TINY\n"
        "model = flax_darknet.Darknet53(num_classes=3, config=TINY)\n"
        "x = jnp.zeros((1, 32, 32, 3), jnp.float32)\n"
        "logits = model.apply(model.init(jax.random.key(0), x), x)\n"
        "assert logits.shape == (1, 3), logits.shape\n"
        f"print([m for m in {NOT_LOADED_BY_MODEL!r} if m in sys.modules])\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().splitlines()[-1] == "[]", proc.stdout


def _torch_pins(text: str) -> set[str]:
    return set(re.findall(r"torch==([0-9][0-9.]*[0-9])", text))


def test_readme_docs_and_ci_name_the_same_torch_versions() -> None:
    ci = (ROOT / ".ci" / "run").read_text()
    readme = (ROOT / "README.md").read_text()
    (ci_torch,) = _torch_pins(ci)
    (ci_torchvision,) = re.findall(r"torchvision==([0-9][0-9.]*[0-9])", ci)
    main_job = next(line for line in readme.splitlines() if "python -m train.flax --data demo" in line)
    (main_job_torch,) = _torch_pins(main_job)
    assert 'pip install -e ".[train]"' in main_job, main_job
    # The README says which torch CI uses and why it differs from the main job's.
    assert f"torch=={ci_torch} torchvision=={ci_torchvision}" in readme
    allowed = {main_job_torch, ci_torch}
    for path in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        assert _torch_pins(path.read_text()) <= allowed, f"{path.name} names a torch version other than {allowed}"
