"""TensorFlow's thread pools sized from the CPUs this process may use.

Left alone, TensorFlow sizes them from every core of the machine, even in a container whose CPU
quota (docker --cpus, a Kubernetes CPU limit) is a fraction of them: its threads then outnumber
the quota and are throttled in turn. A worker calls configure_tensorflow before the framework
starts its runtime, which is the last moment the sizes can be set."""

from __future__ import annotations

import logging
import math
import os
from pathlib import Path

from stepstream_service.config import Settings

log = logging.getLogger(__name__)

CGROUP_ROOT = Path("/sys/fs/cgroup")


def available_cpus() -> int:
    """The CPUs this process may use: the fewest of the machine's cores, its scheduler
    affinity, and its cgroup's CPU quota (v1 and v2) rounded up."""
    from joblib import cpu_count

    return cpu_count()


def affinity_cpus() -> int:
    """The cores this process may be scheduled on, quota aside."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        return os.cpu_count() or 1


def cpu_quota(root: Path = CGROUP_ROOT) -> float | None:
    """The cgroup's CPU quota in cores (1.5 for docker --cpus 1.5), or None when unlimited.

    Read for the log line only; the count itself is joblib's."""
    try:  # v2: "QUOTA PERIOD", or "max PERIOD"
        quota, period = (root / "cpu.max").read_text().split()
    except (OSError, ValueError):
        try:  # v1: a quota of -1 is unlimited
            quota = (root / "cpu" / "cpu.cfs_quota_us").read_text().strip()
            period = (root / "cpu" / "cpu.cfs_period_us").read_text().strip()
        except OSError:
            return None
    try:
        cores = int(quota) / int(period)
    except (ValueError, ZeroDivisionError):  # "max", or something unexpected
        return None
    return cores if cores > 0 else None


def thread_count(settings: Settings, root: Path = CGROUP_ROOT) -> tuple[int, str]:
    """How many threads each pool gets, and where that number came from."""
    if settings.cpu_threads is not None:
        return settings.cpu_threads, "TRAINER_CPU_THREADS"
    count, cores = available_cpus(), affinity_cpus()
    quota = cpu_quota(root)
    of = f"{cores} core{'' if cores == 1 else 's'}"
    if quota is not None and math.ceil(quota) < cores:
        return count, f"CPU quota {quota:g} of {of}"
    return count, of


def configure_tensorflow(settings: Settings, who: str | None = None) -> int:
    """Size TensorFlow's intra-op and inter-op pools; call it before anything runs an op.
    Returns the size. `who` names the worker in the log."""
    who = who or str(os.getpid())
    count, why = thread_count(settings)
    import tensorflow as tf

    try:
        tf.config.threading.set_intra_op_parallelism_threads(count)
        tf.config.threading.set_inter_op_parallelism_threads(count)
    except RuntimeError as exc:  # the runtime had already started: its own sizes stand
        log.warning("worker %s: TensorFlow thread pools left as they are: %s", who, exc)
        return count
    log.info(
        "worker %s: TensorFlow thread pools: %d intra-op, %d inter-op (%s)",
        who,
        count,
        count,
        why,
    )
    return count
