"""Where a run's map stages execute.

The runner executes everything in its own process by default. `--executor ray` hands the map stages that
can be spread (`Stage.distributed`) and the signature pass of `dedup` to a Ray cluster
(`datatailor.executors.ray_executor`); everything else, and every decision about what is finished, stays
with the runner. Ray is an optional extra (`pip install 'datatailor[ray]'`) and is imported only here.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class RaySettings:
    address: str | None = None  # a running cluster (HOST:PORT); None: RAY_ADDRESS, else a local Ray
    workers: int = 2  # actors per distributed stage
    shard_size: int = 128  # records per task
    stall_timeout_s: float = 600.0  # no progress for this long: stop as `interrupted` (resumable)
    worker_cpus: float = 0.5  # CPUs reserved per actor (model calls wait on the network)
    per_writer_cache: bool | None = None  # one cache file per worker (several machines); None: when the cluster has >1 node
    flush_records: int = 256  # --out in an object store: a worker uploads its new results every this many records…
    flush_s: float = 5.0  # …or this many seconds (a worker killed with its node loses at most that much)

    def __post_init__(self) -> None:
        if self.workers < 1:
            raise ValueError("--workers must be at least 1")
        if self.shard_size < 1:
            raise ValueError("--shard-size must be at least 1")
        if self.stall_timeout_s <= 0:
            raise ValueError("--stall-timeout must be positive")
        if self.flush_records < 1 or self.flush_s <= 0:
            raise ValueError("--flush-records must be at least 1 and --flush-seconds positive")


def ray_executor(settings: RaySettings):  # -> RayExecutor, imported lazily
    from datatailor.executors.ray_executor import RayExecutor

    return RayExecutor(settings)
