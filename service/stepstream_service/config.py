"""Settings: read once in main() from flags and TRAINER_* variables, then passed down."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Annotated, Any

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

# The exit status of a worker that retires after worker_max_jobs; its supervisor starts a fresh
# one without counting a crash. Here, so the server need not import the worker's modules.
WORKER_RETIRED = 99


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="TRAINER_", extra="ignore")

    host: str = "127.0.0.1"
    port: int = 50051
    metrics_port: int = 9464
    # The metrics port has no authentication and names every tenant's jobs: loopback unless
    # asked (a scraper elsewhere); TLS with the server's certificate when it has one.
    metrics_host: str = "127.0.0.1"
    metrics_job_names: bool = True  # false: per-job series carry the job id only
    workers: int = 1
    # all: GPUs are required (no GPU is an error, never CPU workers); auto: GPUs if any, else
    # `workers` CPU workers with a warning; none; or a list like 0,1.
    gpus: str = "none"
    # GPUs per worker process: a worker of N GPUs runs jobs with runtime.devices up to N.
    gpus_per_worker: int = Field(default=1, ge=1)
    # TensorFlow's thread pools in each worker; unset: the CPUs this process may use, cgroup
    # CPU quota included (a container's --cpus, a Kubernetes CPU limit), not the node's cores.
    cpu_threads: int | None = Field(default=None, ge=1)
    # Each CPU worker splits its CPU into this many logical devices, so that a job with
    # runtime.devices > 1 trains data-parallel on a machine without GPUs (tests, trials).
    cpu_devices: int = Field(default=1, ge=1, le=64)
    # Jobs across workers (runtime.machines): the host other workers reach this one's
    # replicas at (unset: this machine's name), and how long a replica waits on a peer that
    # stopped answering before the attempt fails and the job is queued again.
    gang_host: str | None = None
    gang_timeout_seconds: float = Field(default=60.0, gt=0)
    store: str | None = None  # a SQLAlchemy URL; SQLite under data_dir when unset
    data_dir: Path = Path("trainer-data")
    # Models, checkpoints and uploads: any fsspec URL (s3://bucket/prefix); data_dir when unset.
    artifacts: str | None = None
    artifact_options: dict[str, Any] = {}  # fsspec options, e.g. {"endpoint_url": ...} (JSON)
    lease_seconds: float = 30.0
    heartbeat_seconds: float = 0.5
    max_attempts: int = 3
    poll_seconds: float = 0.02
    tail_poll_seconds: float = 0.05
    # With PostgreSQL, NOTIFY wakes idle workers and the tail; this poll is only a safety net.
    notify_poll_seconds: float = 1.0
    worker_seen_seconds: float = 5.0  # how often an idle worker says it is alive
    # A worker process is replaced after this many jobs: each job leaves a few MiB behind in
    # the framework (measured: about 3.4 MiB per job), which only a new process gives back.
    worker_max_jobs: int = 200
    # Or once its resident memory has grown by this much since it started: XLA keeps each
    # job's compiled program (measured: about 11 MiB per small dense job), and a big job's
    # peak stays mapped.
    worker_max_growth_mib: int = 2048
    # Compiled models a worker keeps for the next job of the same shape (an experiment's
    # trials), which then starts without building or tracing: their variables' size in all.
    # 0 keeps none. See engine.model_cache.
    model_cache_mib: int = Field(default=256, ge=0)
    max_upload_bytes: int = 512 * 1024 * 1024
    # A model converted on download (onnx, tflite, saved_model) in a subprocess of the server:
    # one that takes longer is refused, saying so.
    export_seconds: float = 300.0
    metrics_linger_seconds: float = 300.0
    # Where a GPU slot's lock lives: machine-wide, so two supervisors (one restarted after a
    # crash) never run two workers on one device; a CPU slot's lock is under data_dir.
    gpu_lock_dir: Path = Path(tempfile.gettempdir())
    # Where `trainer serve` writes, once listening, its pid and the addresses it is on (JSON),
    # removed when it stops: `trainer health --serve-file` checks the server that is running.
    serve_file: Path | None = None

    # Trust. Without tokens_file (or mTLS) the server listens on loopback only: a host that
    # is not loopback is refused at start-up unless `insecure` says anyone may connect.
    tokens_file: Path | None = None  # `TENANT sha256:HEX` lines, or a folder of such files
    insecure: bool = False
    tls_cert: Path | None = None
    tls_key: Path | None = None
    tls_client_ca: Path | None = None  # set: clients must present a certificate it signed

    # Limits, each named in the error that enforces it.
    max_message_bytes: int = 8 * 1024 * 1024
    # A job's spec is kept with it and sent with every answer about it (labels included).
    # Room for a Keras model config (architecture keras): about 1.5 KiB a layer as
    # model.to_json() writes it, so a ResNet-50's or EfficientNet-B0's fits.
    max_spec_bytes: int = 1024 * 1024
    max_queued_per_tenant: int = 1000
    # Fair share between tenants (store.fairshare): a tenant's weight (1 when not listed) and
    # the jobs one tenant may run at once (unset: no cap). JSON: {"team-a": 2, "team-b": 1}.
    tenant_weights: dict[str, Annotated[float, Field(gt=0)]] = {}
    max_running_per_tenant: int | None = Field(default=None, ge=1)
    max_watchers_per_tenant: int = 64
    # What a tenant may keep stored: its jobs' events, models and checkpoints, and its uploads.
    # At or over it, submits and uploads are refused and its running jobs fail; 0: no quota.
    tenant_storage_bytes: int = 20 * 1024**3
    storage_check_seconds: float = 5.0  # how often a running job's worker looks at the usage
    rpc_threads: int = 256  # streams are capped below it, so unary calls always find a thread
    # The nice value of the RPC threads and the event tail (0: as the workers). On a machine
    # shared with workers, streams then yield the CPU to training (bench/phases.py).
    rpc_nice: int = 10
    max_steps: int = 10_000_000
    max_epochs: int = 10_000
    max_layers: int = 64
    max_units: int = 16_384
    # A job's estimated peak memory (engine.footprint) is refused at submit above the largest
    # live worker's memory; with no worker registered yet, above this.
    max_job_bytes: int = 64 * 1024**3
    # What an upload's arrays may expand to, read from its .npy headers (a zip of zeros is tiny).
    max_upload_expanded_bytes: int = 8 * 1024**3
    keepalive_seconds: float = 60.0

    # Experiments: how often the controller looks at its trials' new events (a trial the
    # pruner stops is cancelled within about this long), and where their Optuna studies live
    # (an RDB storage URL; by default beside the store: optuna.db next to the SQLite file, or
    # the `optuna` schema of the PostgreSQL database).
    experiment_poll_seconds: float = 0.1
    experiments_storage: str | None = None

    # Shutdown and retention.
    grace_seconds: float = 30.0  # SIGTERM: running jobs checkpoint and go back to the queue
    retention_days: float | None = None  # finished jobs older than this are deleted
    retention_keep: int | None = None  # at most this many finished jobs are kept
    # An upload cut off part-way is kept this long for `trainer upload` to resume, counted in
    # its tenant's storage quota meanwhile; then it is deleted.
    upload_resume_hours: float = 24.0

    @property
    def auth_configured(self) -> bool:
        return self.tokens_file is not None or self.tls_client_ca is not None

    @property
    def store_url(self) -> str:
        if self.store:
            return self.store
        return f"sqlite:///{(self.data_dir / 'trainer.db').resolve()}"

    @property
    def artifacts_url(self) -> str:
        return self.artifacts or str(self.data_dir.resolve())

    def job_dir(self, job_id: str) -> Path:
        return self.data_dir / "jobs" / job_id
