"""Joining JAX's distributed runtime: explicit flags, SLURM / Open MPI auto-detection, clear failures.

`jax.distributed.initialize` aborts the whole process (no Python exception) when the coordinator never
answers, so a non-coordinator process first checks, within the timeout, that the coordinator's port accepts
connections and raises `DistributedError` naming the process when it does not (JAX has no public way to
ask this). Which launch is a cluster's (SLURM, Open MPI) is read from their task-count variables; the details
(coordinator, ranks) are left to `jax.distributed.initialize`'s own cluster detection. A SIGTERM stops every
process at one agreed step through JAX's preemption service (see train.loop).

The second half is data parallelism with jax.sharding: one mesh axis over every device, the batch split, the
state replicated.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import socket
import sys
import threading
import time
from typing import Any, NoReturn

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from porting.errors import EXIT_PEER_FAILED

DEFAULT_TIMEOUT_S = 300
_PROBE_INTERVAL_S = 0.5
# How often each process looks for a failure reported by another, and how long a failing process lingers so
# the others read its report (process 0 hosts the key-value store: when it exits, the store goes with it).
FAILURE_POLL_S = 0.5
FAILURE_LINGER_S = 3 * FAILURE_POLL_S
_KEY_PREFIX = "darknet53"
DATA_AXIS = "data"  # the one mesh axis: data parallelism over every device

# The environment variables by which JAX's own cluster detection recognises a launch: the task count first.
_CLUSTER_ENVS = {"slurm": ("SLURM_NTASKS", "SLURM_JOB_ID"), "ompi": ("OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_RANK")}


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


def validate(opts: DistributedOptions) -> tuple[str, int, int] | None:
    """(coordinator, num_processes, process_id) of the flags (None: none given); DistributedError unless consistent."""
    if opts.timeout_s <= 0:
        raise DistributedError(f"the distributed timeout must be positive, got {opts.timeout_s} s")
    if not opts.explicit:
        return None
    coordinator, num, pid = opts.coordinator, opts.num_processes, opts.process_id
    if coordinator is None or num is None or pid is None:
        flags = {"--coordinator": coordinator, "--num-processes": num, "--process-id": pid}
        missing = [flag for flag, value in flags.items() if value is None]
        raise DistributedError(
            f"a multi-process run needs --coordinator, --num-processes and --process-id; missing {missing}"
        )
    parse_host_port(coordinator)
    if num < 1:
        raise DistributedError(f"--num-processes must be >= 1, got {num}")
    if not 0 <= pid < num:
        raise DistributedError(f"--process-id must be in 0..{num - 1} for --num-processes {num}, got {pid}")
    return coordinator, num, pid


def detect_cluster(environ: dict[str, str] | None = None) -> str | None:
    """'slurm' or 'ompi' when this process was launched as one of several tasks by them, else None."""
    env = os.environ if environ is None else environ
    for name, (size, other) in _CLUSTER_ENVS.items():
        try:
            tasks = int(env[size])  # as the launchers' own readers take it (" 2", "2\n" included)
        except (KeyError, ValueError):
            continue
        if other in env and tasks > 1:
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
    launch = validate(opts)
    if launch is None and detect_cluster() is None:
        return False
    # Cross-process collectives on CPU need an implementation; GPU and TPU backends ignore this setting.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    if launch is None:  # a cluster's launch: JAX's own detection finds the coordinator and ranks
        jax.distributed.initialize(initialization_timeout=opts.timeout_s)
        return True
    coordinator, num, pid = launch
    if pid != 0:
        wait_for_coordinator(coordinator, opts.timeout_s, pid)
    else:
        waiting = f"waiting up to {opts.timeout_s} s for the others"
        print(f"process 0: coordinating {num} processes at {coordinator}; {waiting}", file=sys.stderr, flush=True)
    jax.distributed.initialize(coordinator, num_processes=num, process_id=pid, initialization_timeout=opts.timeout_s)
    if jax.process_count() != num:
        message = (
            f"process {pid}: --num-processes {num}, but the coordinator at {coordinator} runs "
            f"{jax.process_count()} processes; give every process the same --num-processes"
        )
        with contextlib.suppress(Exception):  # so that the others' failure watchers stop them too
            _client().key_value_set(f"{_KEY_PREFIX}/failed/{jax.process_index()}", message)
        raise DistributedError(message)
    return True


def joined() -> bool:
    """True once this process is connected to the distributed runtime (its exit must then not wait for others)."""
    return jax.distributed.is_initialized()


def add_flags(parser: argparse.ArgumentParser) -> None:
    """The multi-process flags of `python -m train.flax` (all absent: single process or SLURM/Open MPI)."""
    g = parser.add_argument_group("multi-process (multi-host) training")
    g.add_argument("--coordinator", default=None, help="HOST:PORT of process 0 (the same on every process)")
    g.add_argument("--num-processes", type=int, default=None, help="how many processes take part")
    g.add_argument("--process-id", type=int, default=None, help="this process's index, 0..N-1 (0 coordinates)")
    timeout_help = "seconds to wait for the coordinator and for all processes to join"
    g.add_argument("--distributed-timeout", type=int, default=DEFAULT_TIMEOUT_S, help=timeout_help)


def options_from_args(args: argparse.Namespace) -> DistributedOptions:
    """The DistributedOptions of parsed flags (see add_flags)."""
    return DistributedOptions(args.coordinator, args.num_processes, args.process_id, args.distributed_timeout)


def _client() -> Any:
    """JAX's distributed key-value client, through orbax's public multi-host helper (JAX has no public accessor)."""
    from orbax.checkpoint import multihost

    return multihost.get_jax_distributed_client()


def check_same_config(config: dict[str, Any], timeout_s: float) -> None:
    """Raise DistributedError unless every process was given the same training flags (compared with process 0's)."""
    if jax.process_count() == 1:  # more than one only after initialize() joined them
        return
    client, me = _client(), jax.process_index()
    client.key_value_set(f"{_KEY_PREFIX}/config/{me}", json.dumps(config, sort_keys=True))
    others = range(1, jax.process_count()) if me == 0 else [0]
    for other in others:
        try:
            theirs = json.loads(client.blocking_key_value_get(f"{_KEY_PREFIX}/config/{other}", int(timeout_s * 1000)))
        except Exception as e:
            raise DistributedError(f"process {me}: process {other} did not report its flags: {e}") from e
        diffs = [f"{k}: {theirs.get(k)!r} -> {config.get(k)!r}" for k in sorted(config) if theirs.get(k) != config[k]]
        if diffs:
            a, b = (other, me) if me else (me, other)
            raise DistributedError(
                f"process {me}: the flags of process {b} differ from process {a}'s ({'; '.join(diffs)}); "
                "every process must be given the same training flags"
            )


class FailureWatcher:
    """Stops this process promptly when another process reports a failure (or the coordinator disappears)."""

    # Without it a failed process leaves the others blocked in a collective or a barrier until JAX's heartbeat
    # or shutdown timeouts (minutes) abort them with messages that do not say what went wrong.

    def __init__(self) -> None:
        self.me = jax.process_index()
        self._stop = threading.Event()
        self.failing = False  # this process is failing itself: peers' reports are then not news
        self._thread = threading.Thread(target=self._run, name="failure-watcher", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        client = _client()
        while not self._stop.wait(FAILURE_POLL_S):
            try:
                reports = client.key_value_dir_get(f"{_KEY_PREFIX}/failed/")
            except Exception as e:
                if self._stop.is_set() or self.failing:
                    return
                _die(f"process {self.me}: lost contact with the coordinator (process 0), stopping: {e}")
            others = sorted((k, v) for k, v in reports if not k.endswith(f"/{self.me}"))
            if others and not self.failing:
                key, message = others[0]
                _die(f"process {self.me}: stopping because process {key.rsplit('/', 1)[-1]} failed: {message}")

    def announce(self, message: str) -> None:
        """Tell the other processes that this one fails with `message` (they stop within a poll interval)."""
        self.failing = True
        # The store may be gone (process 0 exited first): the others are stopping anyway.
        with contextlib.suppress(Exception):
            _client().key_value_set(f"{_KEY_PREFIX}/failed/{self.me}", message)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


def _die(message: str) -> NoReturn:
    print(message, file=sys.stderr, flush=True)
    sys.stdout.flush()
    # os._exit skips JAX's exit-time shutdown barrier, which would wait for the failed process for minutes.
    os._exit(EXIT_PEER_FAILED)


def exit_now(code: int) -> None:
    """Leave a failed multi-process run at once, skipping the shutdown barrier.

    Process 0 hosts the key-value store, so it lingers until the others have read its report; the others leave
    at once (lingering, they would be aborted by JAX when process 0 goes, with another exit code).
    """
    if jax.process_index() == 0:
        time.sleep(FAILURE_LINGER_S)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def shutdown() -> None:
    """Leave the distributed runtime in step with the other processes (after a successful run; else a no-op)."""
    jax.distributed.shutdown()


_watcher: FailureWatcher | None = None


def start_failure_watcher() -> FailureWatcher:
    """Start (once) the watcher that stops this process when another one fails."""
    global _watcher
    if _watcher is None:
        _watcher = FailureWatcher()
    return _watcher


def stop_failure_watcher() -> None:
    global _watcher
    if _watcher is not None:
        _watcher.stop()
        _watcher = None


def announce_failure(message: str) -> None:
    """Tell the other processes this one is failing (a no-op outside a watched multi-process run)."""
    if _watcher is not None:
        _watcher.announce(message)


def barrier(name: str, timeout_s: float = DEFAULT_TIMEOUT_S) -> None:
    """Wait until every process reaches `name` (a no-op in a single-process run)."""
    if jax.process_count() > 1:
        _client().wait_at_barrier(f"{_KEY_PREFIX}/{name}", int(timeout_s * 1000))


def data_state_for_topology(state: Any, batch_size: int, process_count: int) -> Any:
    """A training-iterator state saved by another process count, as this topology's iterator would have it.

    The state is a global step counter: step k's global batch depends on (records, seed, k, global batch) only,
    so with the same global batch (per-process batch x process count) the position carries over exactly.
    Anything else is returned unchanged, for the iterator's own set_state to refuse with its message.
    """
    if not isinstance(state, dict):
        return state
    saved_b, saved_p = state.get("batch_size"), state.get("process_count")
    if not (isinstance(saved_b, int) and isinstance(saved_p, int)) or saved_b * saved_p != batch_size * process_count:
        return state
    return {**state, "batch_size": batch_size, "process_count": process_count}


@dataclasses.dataclass(frozen=True)
class Topology:
    """Where this process sits: the global mesh and its share of every global batch."""

    mesh: Mesh
    process_index: int
    process_count: int

    @property
    def num_devices(self) -> int:
        return self.mesh.devices.size

    @property
    def is_main(self) -> bool:
        """Process 0 writes files and logs."""
        return self.process_index == 0

    def local_batch_size(self, global_batch: int) -> int:
        """This process's rows of a global batch."""
        return global_batch // self.process_count


class ShardingError(ValueError):
    """A batch size that cannot be split over the devices."""


def make_topology() -> Topology:
    """A 1-D mesh over all global devices (jax.devices(), so multi-host works unchanged)."""
    mesh = Mesh(np.asarray(jax.devices()), (DATA_AXIS,))
    return Topology(mesh=mesh, process_index=jax.process_index(), process_count=jax.process_count())


def check_batch_size(batch_size: int, topology: Topology) -> None:
    """Raise ShardingError unless the global batch splits evenly over the devices."""
    n = topology.num_devices
    if batch_size % n:
        raise ShardingError(f"--batch-size {batch_size} cannot be split over {n} devices; use a multiple of {n}")


def place_batch(batch: dict[str, np.ndarray], topology: Topology) -> dict[str, jax.Array]:
    """This process's numpy batch -> global arrays sharded on the leading (batch) axis."""
    sharding = NamedSharding(topology.mesh, PartitionSpec(DATA_AXIS))
    return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v)) for k, v in batch.items()}


def replicate(tree: Any, topology: Topology) -> Any:
    """Put a pytree (the train state) on every device."""
    return jax.device_put(tree, NamedSharding(topology.mesh, PartitionSpec()))


def to_host(x: jax.Array) -> np.ndarray:
    """A global array as one numpy array on every process (gathers across hosts when there are several)."""
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))
