"""Shared test settings: keep XLA and PyTorch inside the CI machine's 2 cores, and XLA's compile time small."""

import os
from pathlib import Path

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
# No test reaches the network: a Hub id is read from a cache the test lays out (children inherit this too).
os.environ["HF_HUB_OFFLINE"] = "1"
# Compilation is most of a small test's time. The tests check values, not speed, so XLA skips its expensive
# passes here (as google/flax's example tests do): the suite's CPU time fell from ~2,010 to ~1,360 CPU-seconds
# (tests/README.md). Set before jax is imported, so every child process a test starts inherits it too. The few
# tests that inspect the optimised program take the `xla_optimized` fixture; a command run at the speed a user
# sees gets `train_helpers.subprocess_env(optimized=True)`.
OPT_FLAG = "JAX_DISABLE_MOST_OPTIMIZATIONS"
os.environ.setdefault(OPT_FLAG, "1")

import jax  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(min(2, os.cpu_count() or 1))

# The longest tests, started first so that neither xdist worker is left with one of them at the end
# (tests/README.md has their times). Matched against the start of each test's node id.
LONG_FIRST = (
    "tests/test_main_job_demo.py::",
    "tests/test_porting_finetuning_doc.py::test_every_command",
    "tests/test_train_multihost.py::test_two_processes_equal",
    "tests/test_export_demo.py::",
    "tests/test_train_resume.py::",
    "tests/test_bench_quick.py::test_quick_run",
)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Long tests first, in LONG_FIRST's order, the rest as collected (a stable sort: every worker agrees)."""

    def rank(item: pytest.Item) -> int:
        return next((i for i, prefix in enumerate(LONG_FIRST) if item.nodeid.startswith(prefix)), len(LONG_FIRST))

    items.sort(key=rank)


@pytest.fixture
def xla_optimized():
    """XLA's full optimisation for this test's compilations: for tests that inspect the optimised program."""
    before = jax.config.read("jax_disable_most_optimizations")
    jax.config.update("jax_disable_most_optimizations", False)
    try:
        yield
    finally:
        jax.config.update("jax_disable_most_optimizations", before)


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory: pytest.TempPathFactory):
    """One finished tiny demo run of train.flax, trained once for every xdist worker; read it, copy it to change it."""
    from tests.train_helpers import TINY_RUN_FLAGS, once_per_session, tiny_cli_args
    from train import flax as train_flax

    def train(workdir: Path) -> None:
        assert train_flax.main(tiny_cli_args(workdir, *TINY_RUN_FLAGS)) == 0

    return once_per_session(tmp_path_factory, "tiny_run", train)
