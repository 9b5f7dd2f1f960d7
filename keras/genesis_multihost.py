"""Multi-host data-parallel pre-training: joining the group of processes, who writes, shares.

One training run can span several processes, usually one per machine (or one per GPU under
SLURM). They form a group with the frameworks' own engines (docs/multihost.md):

* JAX: `jax.distributed.initialize` with a coordinator address, the number of processes and
  this process' id, from `--coordinator_address HOST:PORT --num_processes N --process_id I`,
  or detected by JAX from the environment (SLURM, Open MPI, `JAX_COORDINATOR_ADDRESS`...). The
  trainer then trains with `keras.distribution.DataParallel` over every device of every process.
* TensorFlow: `TF_CONFIG` (a JSON cluster description) would select
  `tf.distribute.MultiWorkerMirroredStrategy`, but Keras 3's `fit` fails under that strategy
  on its first batch (keras-team/keras issue 20585), so a multi-task `TF_CONFIG` is refused
  with an error that says so (`TF_MULTIWORKER_UNAVAILABLE`).

The batch size stays global: each process makes its `local_share` of every global batch.
Process 0 is the writer (`is_writer`): only it writes weights, checkpoints, logs and samples.

A process that dies or hangs must not leave the others waiting forever: on JAX, a process that
sends no heartbeat for `timeout` seconds is declared dead by the coordination service, which
stops every other process with an error naming it; a collective whose peer has closed its
connection fails at once.

Imports: stdlib only (JAX or TensorFlow are imported inside the functions that need them).
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from collections.abc import Mapping

__all__ = [
    "DEFAULT_TIMEOUT",
    "TF_MULTIWORKER_UNAVAILABLE",
    "ProcessGroup",
    "check_coordinator_address",
    "current",
    "describe_failure",
    "detect_jax_cluster",
    "initialize",
    "is_writer",
    "local_share",
    "process_count",
    "process_index",
    "read_tf_config",
]

DEFAULT_TIMEOUT = 300
"""Seconds without a heartbeat (JAX) or for one collective (TensorFlow) before giving up."""

_ADDRESS = re.compile(r"^(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9_.\-]+):(\d{1,5})$")


@dataclasses.dataclass(frozen=True)
class ProcessGroup:
    """The group of processes this one trains in.

    Attributes:
        index: this process' id, 0 to count - 1 (0 writes the outputs).
        count: number of processes (1: a single-process run).
        engine: "single" or "jax" (jax.distributed).
        coordinator: the coordinator's HOST:PORT (JAX), or None.
        timeout: the collective timeout in seconds.
    """

    index: int = 0
    count: int = 1
    engine: str = "single"
    coordinator: str | None = None
    timeout: int = DEFAULT_TIMEOUT

    @property
    def is_multi(self) -> bool:
        """True when more than one process trains."""
        return self.count > 1

    @property
    def is_writer(self) -> bool:
        """True for process 0, the only one that writes files."""
        return self.index == 0


TF_MULTIWORKER_UNAVAILABLE = (
    "TF_CONFIG describes {count} tasks, but multi-worker training is not available on the "
    "TensorFlow backend: Keras {keras}'s fit fails under tf.distribute."
    "MultiWorkerMirroredStrategy on its first batch (keras-team/keras issue 20585). Train on "
    "several machines with KERAS_BACKEND=jax and --coordinator_address HOST:PORT "
    "--num_processes N --process_id I (docs/multihost.md), or unset TF_CONFIG."
)

_GROUP = ProcessGroup()


def current() -> ProcessGroup:
    """The group `initialize` joined (a single-process group before, or without, it).

    Returns:
        The `ProcessGroup`.
    """
    return _GROUP


def process_index() -> int:
    """This process' id in the group (0 in a single-process run)."""
    return _GROUP.index


def process_count() -> int:
    """The number of processes in the group (1 in a single-process run)."""
    return _GROUP.count


def is_writer() -> bool:
    """Whether this process writes the run's files: process 0 only."""
    return _GROUP.index == 0


def local_share(global_batch: int, index: int | None = None, count: int | None = None) -> slice:
    """The samples of a global batch that process `index` of `count` makes.

    Process p makes samples [p * b, (p + 1) * b) with b = global_batch // count: the global
    batch is the processes' shares in process order, which is the order
    `jax.make_array_from_process_local_data` and TensorFlow's workers put them in.

    Args:
        global_batch: the batch size of one training step over all processes.
        index: the process id (default: this process').
        count: the number of processes (default: this group's).

    Returns:
        The slice of the global batch's sample indices.

    Raises:
        ValueError: the batch does not split evenly, or index is out of range.
    """
    index = _GROUP.index if index is None else index
    count = _GROUP.count if count is None else count
    for name, value, low in (("global_batch", global_batch, 1), ("count", count, 1)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValueError(f"Expected {name} to be an integer >= {low}. Received: {value!r}")
    if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < count:
        raise ValueError(f"Expected a process index in [0, {count}). Received: index={index!r}")
    if global_batch % count:
        raise ValueError(
            f"Expected batch_size divisible by the number of processes ({count}): every "
            f"process makes an equal share of each batch. Received: batch_size={global_batch}"
        )
    size = global_batch // count
    return slice(index * size, (index + 1) * size)


def check_coordinator_address(address: str) -> str:
    """Check a coordinator address of the form HOST:PORT.

    Args:
        address: e.g. "10.0.0.1:12345", "node01:1234" or "[::1]:1234".

    Returns:
        The address, unchanged.

    Raises:
        ValueError: it is not HOST:PORT with a port in 1..65535.
    """
    match = _ADDRESS.match(str(address))
    if not match or not 1 <= int(match.group(2)) <= 65535:
        raise ValueError(
            "Expected coordinator_address as HOST:PORT (e.g. 10.0.0.1:12345), port 1-65535. "
            f"Received: coordinator_address={address!r}"
        )
    return address


def detect_jax_cluster(environ: Mapping[str, str] | None = None) -> str | None:
    """Name the cluster environment JAX can read the group from, when it has several processes.

    JAX's own detection (`jax.distributed.initialize()` without arguments) reads it; this only
    decides whether to call it, so that a single-process run inside a one-task SLURM job or on
    a laptop never waits for a coordinator.

    Args:
        environ: the environment (default: os.environ).

    Returns:
        "JAX_COORDINATOR_ADDRESS", "SLURM" or "Open MPI", or None.
    """
    env = os.environ if environ is None else environ
    if env.get("JAX_COORDINATOR_ADDRESS"):
        return "JAX_COORDINATOR_ADDRESS"
    slurm = ("SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_NTASKS", "SLURM_PROCID", "SLURM_LOCALID")
    if all(k in env for k in slurm) and _int_or_zero(env["SLURM_NTASKS"]) > 1:
        return "SLURM"
    if "OMPI_MCA_orte_hnp_uri" in env and _int_or_zero(env.get("OMPI_COMM_WORLD_SIZE")) > 1:
        return "Open MPI"
    return None


def _int_or_zero(text: str | None) -> int:
    try:
        return int(str(text))
    except ValueError:
        return 0


def read_tf_config(environ: Mapping[str, str] | None = None) -> tuple[int, int] | None:
    """This process' (index, count) from `TF_CONFIG`, or None when it is unset.

    The processes are the "chief" task (if any) then the "worker" tasks, in order; process 0
    (the chief, else worker 0) writes the outputs, as TensorFlow's own convention.

    Args:
        environ: the environment (default: os.environ).

    Returns:
        (index, count), or None without TF_CONFIG.

    Raises:
        ValueError: TF_CONFIG is not the JSON TensorFlow expects.
    """
    env = os.environ if environ is None else environ
    text = env.get("TF_CONFIG")
    if not text:
        return None
    expected = (
        'Expected TF_CONFIG as JSON such as {"cluster": {"worker": ["host1:port", '
        '"host2:port"]}, "task": {"type": "worker", "index": 0}}.'
    )
    try:
        value = json.loads(text)
        cluster, task = value["cluster"], value["task"]
        chiefs = list(cluster.get("chief", []))
        workers = list(cluster.get("worker", []))
        kind, index = task["type"], int(task["index"])
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise ValueError(f"{expected} Received: TF_CONFIG={text!r} ({exc})") from exc
    order = [("chief", i) for i in range(len(chiefs))]
    order += [("worker", i) for i in range(len(workers))]
    if (kind, index) not in order:
        raise ValueError(
            f"{expected} Received: task {kind!r} {index}, which the cluster does not list "
            f"(TF_CONFIG={text!r})"
        )
    return order.index((kind, index)), len(order)


def initialize(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    timeout: int = DEFAULT_TIMEOUT,
    backend: str | None = None,
) -> ProcessGroup:
    """Join the group of processes, once, before any computation of the backend.

    JAX: with any of the three arguments, or a cluster that `detect_jax_cluster` finds, it
    calls `jax.distributed.initialize` (JAX fills in what is not given from the cluster's
    environment) with `timeout` as its initialisation, heartbeat and shutdown timeouts, and CPU
    collectives over gloo. TensorFlow: a `TF_CONFIG` of several tasks is refused (see the
    module docstring). Otherwise, or on PyTorch, the run is a single process. A second call
    returns the group already joined.

    Args:
        coordinator_address: HOST:PORT of process 0's coordinator (JAX).
        num_processes: processes in the group (JAX).
        process_id: this process' id (JAX).
        timeout: seconds before a silent process or a stuck collective stops the run.
        backend: the Keras backend (default: keras' own, from KERAS_BACKEND).

    Returns:
        The joined `ProcessGroup`.

    Raises:
        ValueError: inconsistent arguments, arguments for an engine this backend lacks, or a
            multi-task TF_CONFIG.
    """
    global _GROUP
    if isinstance(timeout, bool) or not isinstance(timeout, int) or timeout < 1:
        raise ValueError(
            f"Expected collective_timeout to be a positive integer (seconds). "
            f"Received: collective_timeout={timeout!r}"
        )
    explicit = (coordinator_address, num_processes, process_id) != (None, None, None)
    if coordinator_address is not None:
        check_coordinator_address(coordinator_address)
    if num_processes is not None and (isinstance(num_processes, bool) or num_processes < 1):
        raise ValueError(f"Expected num_processes >= 1. Received: num_processes={num_processes!r}")
    if process_id is not None and (
        isinstance(process_id, bool)
        or process_id < 0
        or (num_processes is not None and process_id >= num_processes)
    ):
        raise ValueError(
            f"Expected process_id in [0, num_processes). Received: process_id={process_id!r}, "
            f"num_processes={num_processes!r}"
        )
    if _GROUP.engine != "single":
        return _GROUP
    if backend is None:
        import keras

        backend = keras.backend.backend()
    if backend == "jax":
        if explicit or detect_jax_cluster():
            if num_processes == 1 and coordinator_address is None:
                return _GROUP  # an explicit single process: nothing to join
            _GROUP = _initialize_jax(coordinator_address, num_processes, process_id, timeout)
        return _GROUP
    if explicit:
        raise ValueError(
            "Expected --coordinator_address/--num_processes/--process_id only with "
            f"KERAS_BACKEND=jax (TensorFlow reads TF_CONFIG). Received: backend {backend!r} "
            f"with coordinator_address={coordinator_address!r}, num_processes={num_processes!r}, "
            f"process_id={process_id!r}"
        )
    if backend == "tensorflow":
        found = read_tf_config()
        if found is not None and found[1] > 1:
            import keras

            raise ValueError(
                TF_MULTIWORKER_UNAVAILABLE.format(count=found[1], keras=keras.__version__)
            )
    return _GROUP


def _initialize_jax(
    coordinator_address: str | None, num_processes: int | None, process_id: int | None, timeout: int
) -> ProcessGroup:
    import jax

    # CPU processes need a collectives library to exchange gradients; GPUs use NCCL anyway.
    if jax.config.jax_cpu_collectives_implementation in (None, "", "none"):
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(
        coordinator_address=coordinator_address,
        num_processes=num_processes,
        process_id=process_id,
        initialization_timeout=timeout,
        heartbeat_timeout_seconds=timeout,
        shutdown_timeout_seconds=timeout,
    )
    address = coordinator_address or os.environ.get("JAX_COORDINATOR_ADDRESS")
    group = ProcessGroup(jax.process_index(), jax.process_count(), "jax", address, timeout)
    print(
        f"Process {group.index} of {group.count} joined the JAX group"
        f"{f' at {address}' if address else ''}: {jax.local_device_count()} local and "
        f"{jax.device_count()} devices in all; collective timeout {timeout} s."
    )
    return group


def describe_failure(exc: BaseException) -> str:
    """A message for an error that stopped a multi-process run: who stopped, and why it may be.

    Args:
        exc: the error training raised.

    Returns:
        One paragraph naming this process, the group and the timeout.
    """
    g = _GROUP
    return (
        f"Process {g.index} of {g.count} stopped: {type(exc).__name__}: {exc}. In a "
        "multi-process run this usually means another process died or stopped responding "
        "(its log has the first error; the coordinator's log, in process 0, names a silent "
        "process N: 'Task N heartbeat timeout' or 'tasks are unhealthy (stopped sending "
        f"heartbeats): N'). Processes that stop answering are given up on after "
        f"--collective_timeout {g.timeout} s."
    )
