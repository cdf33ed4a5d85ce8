"""Shared pieces of the training tests: a tiny network, tiny configs, and CLI runs in subprocesses.

Run as a script it does one train step and saves the result (the multi-device test starts it twice):
    python tests/train_helpers.py one-step OUT.npz
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from darknet_arch import TINY  # noqa: E402

SIZE = 32
# conftest's shared tiny run: two steps with a checkpoint at each, so that best and latest can differ.
TINY_RUN_FLAGS = ("--steps", "2", "--batch-size", "8", "--val-fraction", "0.05", "--checkpoint-every", "1")


def subprocess_env(devices: int | None = None, optimized: bool = False) -> dict[str, str]:
    """Environment for a child python: repo importable, optional fake CPU devices, XLA fully optimising if asked.

    The suite turns most of XLA's optimisation off (tests/conftest.py); `optimized` gives a child what a user's
    command gets, for a test whose command must also finish in a user's time.
    """
    env = dict(os.environ)
    if optimized:
        env.pop("JAX_DISABLE_MOST_OPTIMIZATIONS", None)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    env["JAX_PLATFORMS"] = "cpu"
    flags = [f for f in env.get("XLA_FLAGS", "").split() if "device_count" not in f]
    if devices:
        flags.append(f"--xla_force_host_platform_device_count={devices}")
    env["XLA_FLAGS"] = " ".join(flags)
    return env


def run_module(
    module: str, args: list[str], timeout: float = 240, optimized: bool = False, **kw
) -> subprocess.CompletedProcess:
    """`python -m module args` in the repo, output captured (`optimized`: see subprocess_env)."""
    return subprocess.run(
        [sys.executable, "-m", module, *args],
        cwd=REPO,
        env=subprocess_env(optimized=optimized),
        capture_output=True,
        text=True,
        timeout=timeout,
        **kw,
    )


def tiny_cli_args(workdir: Path, *extra: str) -> list[str]:
    """Flags for a tiny demo run that is quick on CI."""
    return ["--data", "demo", "--arch", "tiny", "--workdir", str(workdir), "--compile-cache", "none", *extra]


def once_per_session(tmp_path_factory: Any, name: str, build: Callable[[Path], None]) -> Path:
    """`<session temp root>/name`, made by `build(path)` once for every xdist worker of this pytest session.

    The pytest-xdist recipe: the first worker to take a lock in the session's common temp root builds it; a
    `<name>.done` marker says it finished (a worker that failed half-way leaves none, and the next starts again).
    """
    from filelock import FileLock

    base = tmp_path_factory.getbasetemp()
    root = base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base  # parent: this session's, all workers
    path, done = root / name, root / f"{name}.done"
    with FileLock(str(root / f"{name}.lock")):
        if not done.is_file():
            if path.exists():
                shutil.rmtree(path)
            build(path)
            done.touch()
    return path


def random_batch(rng: np.random.Generator, n: int, num_classes: int = 18) -> dict[str, np.ndarray]:
    return {
        "image": rng.integers(0, 256, (n, SIZE, SIZE, 3), dtype=np.uint8),
        "label": rng.integers(0, num_classes, (n,), dtype=np.int32),
    }


def one_step(out: str) -> None:
    """Init the tiny net, run one jitted, sharded step over all devices, save params and batch stats."""
    import jax
    from flax import traverse_util

    from train.distributed import make_topology, place_batch, replicate
    from train.options import TrainConfig
    from train.state import create_model, create_train_state, make_optimizer, make_schedule, train_step

    topology = make_topology()
    config = TrainConfig(data="demo", workdir="unused", lr=0.1, warmup_epochs=0.0, batch_size=8)
    model = create_model(TINY, 18, "fp32")
    tx = make_optimizer(config, make_schedule(config, 10, 10))
    state = replicate(create_train_state(jax.random.PRNGKey(0), model, SIZE, tx), topology)
    batch = place_batch(random_batch(np.random.default_rng(0), 8), topology)
    state, metrics = jax.jit(train_step, donate_argnums=0)(state, batch)
    flat = traverse_util.flatten_dict({"params": state.params, "batch_stats": state.batch_stats}, sep="/")
    np.savez(
        out,
        devices=topology.num_devices,
        loss=np.asarray(metrics["loss"]),
        **{k: np.asarray(v) for k, v in flat.items()},
    )


if __name__ == "__main__":
    if sys.argv[1] == "one-step":
        one_step(sys.argv[2])
