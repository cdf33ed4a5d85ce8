"""Multi-process launch: flag validation, cluster detection, an unreachable coordinator, a real 2-process run."""

import os
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from train.distributed import DistributedError, DistributedOptions, detect_cluster, validate, wait_for_coordinator

REPO_ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize(
    ("opts", "needle"),
    [
        (DistributedOptions(coordinator="127.0.0.1:1234"), "missing ['--num-processes', '--process-id']"),
        (DistributedOptions("127.0.0.1", 2, 0), "HOST:PORT"),
        (DistributedOptions("127.0.0.1:99999", 2, 0), "HOST:PORT"),
        (DistributedOptions("127.0.0.1:1234", 0, 0), "--num-processes must be >= 1"),
        (DistributedOptions("127.0.0.1:1234", 2, 2), "--process-id must be in 0..1"),
        (DistributedOptions("127.0.0.1:1234", 2, -1), "--process-id must be in 0..1"),
        (DistributedOptions("127.0.0.1:1234", 2, 0, timeout_s=0), "timeout must be positive"),
    ],
)
def test_inconsistent_flags_are_refused(opts, needle):
    with pytest.raises(DistributedError) as err:
        validate(opts)
    assert needle in str(err.value)


def test_no_flags_means_single_process():
    validate(DistributedOptions())
    assert not DistributedOptions().explicit


def test_cluster_detection_needs_a_multi_task_launch():
    assert detect_cluster({"SLURM_JOB_ID": "7", "SLURM_NTASKS": "4"}) == "slurm"
    assert detect_cluster({"SLURM_JOB_ID": "7", "SLURM_NTASKS": "1"}) is None
    assert detect_cluster({"OMPI_COMM_WORLD_SIZE": "2", "OMPI_COMM_WORLD_RANK": "1"}) == "ompi"
    assert detect_cluster({}) is None
    assert detect_cluster({"SLURM_JOB_ID": "7", "SLURM_NTASKS": " 2\n"}) == "slurm"  # as int() reads it
    assert detect_cluster({"SLURM_JOB_ID": "7", "SLURM_NTASKS": "two"}) is None


def test_unreachable_coordinator_fails_within_timeout():
    port = free_port()  # nothing listens here
    start = time.monotonic()
    with pytest.raises(DistributedError, match=rf"process 1: the coordinator at 127.0.0.1:{port} did not answer"):
        wait_for_coordinator(f"127.0.0.1:{port}", 1.5, process_id=1)
    assert time.monotonic() - start < 10


WORKER = textwrap.dedent(
    """
    import sys
    import numpy as np
    from train.distributed import DistributedOptions, initialize
    initialize(DistributedOptions(sys.argv[1], 2, int(sys.argv[2]), timeout_s=60))
    import jax, jax.numpy as jnp
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
    mesh = Mesh(np.array(jax.devices()), ("data",))
    local = np.full((2,), jax.process_index() + 1, np.float32)  # 2 local devices, one row each
    x = jax.make_array_from_process_local_data(NamedSharding(mesh, P("data")), local)
    total = jax.jit(jnp.sum, out_shardings=NamedSharding(mesh, P()))(x)
    print("RESULT", jax.process_count(), jax.device_count(), float(total), flush=True)
    """
)


@pytest.mark.slow
def test_two_processes_see_four_devices_and_reduce_across_them(tmp_path):
    port = free_port()
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    env = {
        **os.environ,
        "XLA_FLAGS": "--xla_force_host_platform_device_count=2",
        "JAX_PLATFORMS": "cpu",
        "PYTHONPATH": str(REPO_ROOT),
    }
    procs = [
        subprocess.Popen(
            [sys.executable, str(script), f"127.0.0.1:{port}", str(i)],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=env,
        )
        for i in range(2)
    ]
    try:
        outputs = [p.communicate(timeout=120)[0] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    for p, out in zip(procs, outputs, strict=True):
        assert p.returncode == 0, out[-3000:]
        # Process 0 contributes 1 + 1, process 1 contributes 2 + 2: a global sum of 6 over 4 devices.
        assert "RESULT 2 4 6.0" in out, out[-3000:]


def test_cli_flags_become_distributed_options():
    import argparse

    from train.distributed import DEFAULT_TIMEOUT_S, add_flags, options_from_args

    parser = argparse.ArgumentParser()
    add_flags(parser)
    opts = options_from_args(parser.parse_args(["--coordinator", "h:1", "--num-processes", "2", "--process-id", "1"]))
    assert opts == DistributedOptions("h:1", 2, 1, DEFAULT_TIMEOUT_S)
    assert not options_from_args(parser.parse_args([])).explicit


def test_a_data_state_moves_to_another_process_count_only_with_the_same_global_batch():
    from train.distributed import data_state_for_topology

    saved = {"version": 1, "step": 7, "seed": 0, "batch_size": 4, "process_count": 2, "records": "x"}
    assert data_state_for_topology(saved, 8, 1) == {**saved, "batch_size": 8, "process_count": 1}
    assert data_state_for_topology(saved, 4, 1) == saved  # another global batch: left for set_state to refuse
