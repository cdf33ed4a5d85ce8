"""Joining JAX's distributed runtime: explicit flags, SLURM / Open MPI auto-detection, clear failures.

`jax.distributed.initialize` aborts the whole process (no Python exception) when the coordinator never
answers, so a non-coordinator process first checks, within the timeout, that the coordinator's port accepts
connections and raises `DistributedError` naming the process when it does not.
"""

from __future__ import annotations

import dataclasses
import os
import socket
import sys
import time

DEFAULT_TIMEOUT_S = 300
_PROBE_INTERVAL_S = 0.5

# Environment variables by which JAX's own cluster detection recognises a multi-process launch.
_CLUSTER_ENVS = {
    "slurm": ("SLURM_JOB_ID", "SLURM_NTASKS"),
    "ompi": ("OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_RANK"),
}
_CLUSTER_SIZE_VAR = {"slurm": "SLURM_NTASKS", "ompi": "OMPI_COMM_WORLD_SIZE"}


class DistributedError(RuntimeError):
    """A multi-process launch that cannot start: bad flags, an unreachable coordinator."""


@dataclasses.dataclass(frozen=True)
class DistributedOptions:
    """What the user asked for: all three of coordinator / num_processes / process_id, or none."""

    coordinator: str | None = None
    num_processes: int | None = None
    process_id: int | None = None
    timeout_s: int = DEFAULT_TIMEOUT_S

    @property
    def explicit(self) -> bool:
        return self.coordinator is not None or self.num_processes is not None or self.process_id is not None


def parse_host_port(address: str) -> tuple[str, int]:
    """Split 'HOST:PORT' (IPv6 as '[::1]:PORT'), raising DistributedError on anything else."""
    host, sep, port = address.rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise DistributedError(f"--coordinator must be HOST:PORT with a port in 1..65535, got {address!r}")
    return host, int(port)


def validate(opts: DistributedOptions) -> None:
    """Raise DistributedError unless the flags describe a consistent multi-process launch (or none)."""
    if not opts.explicit:
        return
    missing = [
        flag
        for flag, value in (
            ("--coordinator", opts.coordinator),
            ("--num-processes", opts.num_processes),
            ("--process-id", opts.process_id),
        )
        if value is None
    ]
    if missing:
        raise DistributedError(
            f"a multi-process run needs --coordinator, --num-processes and --process-id; missing {missing}"
        )
    parse_host_port(opts.coordinator)
    if opts.num_processes < 1:
        raise DistributedError(f"--num-processes must be >= 1, got {opts.num_processes}")
    if not 0 <= opts.process_id < opts.num_processes:
        raise DistributedError(
            f"--process-id must be in 0..{opts.num_processes - 1} for --num-processes {opts.num_processes}, "
            f"got {opts.process_id}"
        )
    if opts.timeout_s <= 0:
        raise DistributedError(f"the distributed timeout must be positive, got {opts.timeout_s} s")


def detect_cluster(environ: dict[str, str] | None = None) -> str | None:
    """'slurm' or 'ompi' when this process was launched as one of several tasks by them, else None."""
    env = os.environ if environ is None else environ
    for name, variables in _CLUSTER_ENVS.items():
        if all(v in env for v in variables):
            try:
                size = int(env[_CLUSTER_SIZE_VAR[name]])
            except ValueError:
                continue
            if size > 1:
                return name
    return None


def wait_for_coordinator(address: str, timeout_s: float, process_id: int) -> None:
    """Return once HOST:PORT accepts a TCP connection; DistributedError after `timeout_s` seconds."""
    host, port = parse_host_port(address)
    deadline = time.monotonic() + timeout_s
    last_error: OSError | None = None
    while time.monotonic() < deadline:
        try:
            with socket.create_connection((host, port), timeout=max(0.1, min(2.0, deadline - time.monotonic()))):
                return
        except OSError as exc:
            last_error = exc
            time.sleep(_PROBE_INTERVAL_S)
    raise DistributedError(
        f"process {process_id}: the coordinator at {address} did not answer within {timeout_s:g} s "
        f"(last error: {last_error}); is process 0 running and is the address reachable from this host?"
    )


def initialize(opts: DistributedOptions) -> bool:
    """Join the distributed runtime if the flags or the environment ask for it; True when it did."""
    validate(opts)
    cluster = None if opts.explicit else detect_cluster()
    if not opts.explicit and cluster is None:
        return False
    import jax

    # Cross-process collectives on CPU need an implementation; GPU and TPU backends ignore this setting.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    if cluster is not None:
        jax.distributed.initialize(initialization_timeout=opts.timeout_s)
        return True
    if opts.process_id != 0:
        wait_for_coordinator(opts.coordinator, opts.timeout_s, opts.process_id)
    else:
        print(
            f"process 0: coordinating {opts.num_processes} processes at {opts.coordinator}; "
            f"waiting up to {opts.timeout_s} s for the others",
            file=sys.stderr,
            flush=True,
        )
    jax.distributed.initialize(
        opts.coordinator,
        num_processes=opts.num_processes,
        process_id=opts.process_id,
        initialization_timeout=opts.timeout_s,
    )
    return True
