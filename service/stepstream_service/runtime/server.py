"""`trainer serve`: the gRPC server, the metrics port, the worker supervisor and the rescuer."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
import time
from concurrent import futures
from pathlib import Path
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from prometheus_client import CollectorRegistry, make_wsgi_app
from prometheus_client.exposition import ThreadingWSGIServer

from stepstream.v1 import trainer_pb2, trainer_pb2_grpc
from stepstream_service.api.auth import Auth, TokenTable, is_loopback, server_credentials
from stepstream_service.api.interceptors import DecodeGuard
from stepstream_service.api.servicer import TrainerServicer
from stepstream_service.config import WORKER_RETIRED, Settings
from stepstream_service.runtime.experiments import Controller
from stepstream_service.runtime.metrics import Metrics, WorkerHostMetrics
from stepstream_service.runtime.priority import yield_cpu
from stepstream_service.runtime.slots import lock_path
from stepstream_service.runtime.tail import EventTail
from stepstream_service.store import EVENTS_CHANNEL, Store
from stepstream_service.store.artifacts import ArtifactStore
from stepstream_service.store.retention import policy_cutoff, prune, sweep_partial_uploads
from stepstream_service.store.wakeups import Wakeups

log = logging.getLogger(__name__)
SERVICE_NAME = trainer_pb2.DESCRIPTOR.services_by_name["TrainerService"].full_name


class NoGPUs(RuntimeError):
    """`--gpus all` where no GPU can be used: an error, never CPU workers in their place."""


class InsecureListen(ValueError):
    """A host other than loopback with no authentication, and `insecure` not given."""


# Hosts that listen on every interface of the machine.
WILDCARD_HOSTS = ("0.0.0.0", "::", "[::]", "")


def listed_gpus() -> tuple[list[str], str]:
    """The GPU ids nvidia-smi lists, and when there are none, why."""
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return [], (
            "nvidia-smi is not on PATH, so no GPU can be used here (in a container: docker run "
            "--gpus all needs the NVIDIA Container Toolkit)"
        )
    try:
        done = subprocess.run([smi, "-L"], capture_output=True, text=True, check=False, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return [], f"nvidia-smi could not be run ({exc})"
    ids = [str(i) for i, line in enumerate(done.stdout.splitlines()) if line.startswith("GPU ")]
    if ids:
        return ids, ""
    said = (done.stderr.strip() or done.stdout.strip()).splitlines()
    # A driver that does not match, or a container given no device, says why on one line.
    detail = f" (it says: {said[0][:200]})" if said else ""
    return [], f"nvidia-smi lists no GPU{detail}"


def gpu_ids(spec: str) -> list[str]:
    """GPU ids for `--gpus`: none; all (as many as nvidia-smi lists, and at least one, else
    NoGPUs); auto (those, or none with a warning); or a list like 0,1."""
    spec = spec.strip()
    if spec == "none":
        return []
    if spec in ("all", "auto"):
        ids, why = listed_gpus()
        if ids:
            return ids
        if spec == "all":
            raise NoGPUs(f"--gpus all: {why}; use --gpus none for CPU workers, or --gpus auto")
        log.warning("--gpus auto: no GPU was found: %s; starting CPU workers", why)
        return []
    return [g.strip() for g in spec.split(",") if g.strip()]


class _MetricsHandler(WSGIRequestHandler):
    # A connection that says nothing, or never finishes its TLS handshake, is dropped after
    # this long; meanwhile it holds only its own thread.
    timeout = 10

    def setup(self) -> None:
        super().setup()
        if isinstance(self.connection, ssl.SSLSocket):
            self.connection.do_handshake()

    def log_message(self, format: str, *args: object) -> None:
        pass  # a scrape is not news


class _MetricsServer(ThreadingWSGIServer):
    def handle_error(self, request: object, client_address: tuple) -> None:
        # A plaintext client on the TLS port, a scanner, a dropped connection: no traceback.
        log.debug("metrics port: a request from %s failed", client_address, exc_info=True)


def metrics_server(
    settings: Settings, registry: CollectorRegistry, port: int | None = None
) -> WSGIServer:
    """The Prometheus port: on metrics_host (loopback unless asked: it has no authentication
    and lists every tenant's jobs), over TLS with the gRPC certificate when there is one.

    prometheus_client's own start_http_server does the TLS handshake in its accept loop, where
    one client that connects and sends nothing stops every scrape; here each connection does
    its handshake in its own thread."""
    port = settings.metrics_port if port is None else port
    family, _, _, _, address = socket.getaddrinfo(
        settings.metrics_host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
    )[0]
    server = type("MetricsServer", (_MetricsServer,), {"address_family": family})
    http = make_server(
        address[0], port, make_wsgi_app(registry), server, handler_class=_MetricsHandler
    )
    if settings.tls_cert is not None and settings.tls_key is not None:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(settings.tls_cert, settings.tls_key)
        http.socket = context.wrap_socket(
            http.socket, server_side=True, do_handshake_on_connect=False
        )
    threading.Thread(target=http.serve_forever, name="metrics", daemon=True).start()
    return http


class Supervisor:
    """One worker process per GPU (pinned with CUDA_VISIBLE_DEVICES) or N on the CPU; a worker
    that dies is started again, and its job comes back through the lease rescuer."""

    def __init__(self, settings: Settings, metrics: WorkerHostMetrics | None = None):
        self.settings = settings
        self.metrics = metrics
        gpus = gpu_ids(settings.gpus)
        # Workers of gpus_per_worker GPUs each, for jobs with runtime.devices > 1; GPUs left
        # over (fewer than a group) get no worker. An empty CUDA_VISIBLE_DEVICES hides every
        # GPU from a CPU worker.
        n = settings.gpus_per_worker
        groups = [gpus[i : i + n] for i in range(0, len(gpus) - n + 1, n)]
        if len(gpus) % n:
            log.warning(
                "GPUs %s: %d per worker leaves %s without a worker",
                ",".join(gpus),
                n,
                ",".join(gpus[len(groups) * n :]),
            )
        self.slots = [(f"gpu{'+'.join(g)}", ",".join(g)) for g in groups] or [
            (f"cpu{i}", "") for i in range(settings.workers)
        ]
        self.procs: dict[str, subprocess.Popen] = {}
        self.stopping = threading.Event()
        self.started = threading.Event()
        self.lock = threading.Lock()

    def worker_id(self, slot: str) -> str:
        return f"{os.uname().nodename}-{os.getpid()}-{slot}"

    def _env(self, devices: str) -> dict[str, str]:
        s = self.settings
        env = dict(os.environ)  # PATH, PYTHONPATH and the like; TRAINER_* are set below
        env.update(
            TRAINER_STORE=s.store_url,
            TRAINER_DATA_DIR=str(s.data_dir.resolve()),
            TRAINER_ARTIFACTS=s.artifacts_url,
            TRAINER_ARTIFACT_OPTIONS=json.dumps(s.artifact_options),
            TRAINER_NOTIFY_POLL_SECONDS=str(s.notify_poll_seconds),
            TRAINER_WORKER_MAX_JOBS=str(s.worker_max_jobs),
            TRAINER_WORKER_MAX_GROWTH_MIB=str(s.worker_max_growth_mib),
            TRAINER_LEASE_SECONDS=str(s.lease_seconds),
            TRAINER_HEARTBEAT_SECONDS=str(s.heartbeat_seconds),
            TRAINER_POLL_SECONDS=str(s.poll_seconds),
            TRAINER_GRACE_SECONDS=str(s.grace_seconds),
            CUDA_VISIBLE_DEVICES=devices,
        )
        if s.cpu_threads is not None:
            env["TRAINER_CPU_THREADS"] = str(s.cpu_threads)
        env.update(
            TRAINER_CPU_DEVICES=str(s.cpu_devices),
            TRAINER_MODEL_CACHE_MIB=str(s.model_cache_mib),
            TRAINER_TENANT_WEIGHTS=json.dumps(s.tenant_weights),
        )
        if s.max_running_per_tenant is not None:
            env["TRAINER_MAX_RUNNING_PER_TENANT"] = str(s.max_running_per_tenant)
        env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
        return env

    def _spawn(self, slot: str, devices: str) -> None:
        cmd = [
            sys.executable,
            "-m",
            "stepstream_service.runtime.worker",
            "--worker-id",
            self.worker_id(slot),
            # The worker stops when this process dies, and holds its slot's lock for life.
            "--parent-pid",
            str(os.getpid()),
            "--slot-lock",
            str(lock_path(self.settings, slot)),
        ]
        self.procs[slot] = subprocess.Popen(cmd, env=self._env(devices))
        log.info("worker %s: started, pid %d", slot, self.procs[slot].pid)

    def start(self) -> None:
        # Workers are started from this one thread only: Linux signals a worker when the
        # thread that started it ends (die_with_parent), so that thread must live as long as
        # the supervisor does.
        threading.Thread(target=self._watch, name="supervisor", daemon=True).start()
        self.started.wait(timeout=10)

    def _watch(self) -> None:
        with self.lock:
            for slot, devices in self.slots:
                if not self.stopping.is_set():
                    self._spawn(slot, devices)
        self.started.set()
        while not self.stopping.wait(0.5):
            with self.lock:
                for slot, devices in self.slots:
                    proc = self.procs.get(slot)
                    if proc is not None and proc.poll() is not None and not self.stopping.is_set():
                        if proc.returncode == WORKER_RETIRED:
                            log.info("worker %s: retired; starting a fresh one", slot)
                        else:
                            log.warning(
                                "worker %s: exited with %s; starting it again",
                                slot,
                                proc.returncode,
                            )
                            if self.metrics:
                                self.metrics.restarts.inc()
                        self._spawn(slot, devices)
                self._observe()

    def _observe(self) -> None:
        if self.metrics is None:
            return
        counts = {(kind, state): 0 for kind in ("gpu", "cpu") for state in ("alive", "dead")}
        for slot, _ in self.slots:
            proc = self.procs.get(slot)
            alive = proc is not None and proc.poll() is None
            counts[(slot[:3], "alive" if alive else "dead")] += 1
        for (kind, state), count in counts.items():
            self.metrics.processes.labels(kind, state).set(count)

    def stop(self, grace: float) -> None:
        self.stopping.set()
        with self.lock:
            procs = list(self.procs.values())
        for proc in procs:
            if proc.poll() is None:
                proc.terminate()
        deadline = time.monotonic() + grace
        for proc in procs:
            try:
                proc.wait(timeout=max(deadline - time.monotonic(), 0.1))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def insecure_refusal(host: str) -> str:
    return (
        f"refusing to listen on {host} with no authentication: give a tokens file "
        "(TRAINER_TOKENS_FILE, made with `trainer token TENANT`) or client certificates "
        "(TRAINER_TLS_CLIENT_CA), or --insecure / TRAINER_INSECURE=1 to accept anyone who can "
        "reach the port"
    )


class Server:
    def __init__(self, settings: Settings, store: Store | None = None):
        self.settings = settings
        host = settings.host
        open_to_all = not settings.auth_configured and not is_loopback(host)
        # Refused before anything is created or bound. Falling back to loopback instead would
        # leave a container that looks healthy and that nothing outside it can reach.
        if open_to_all and not settings.insecure:
            raise InsecureListen(insecure_refusal(host))
        # Before the store is opened: `--gpus all` with no GPU is refused here too.
        self.supervisor = Supervisor(settings) if settings.workers > 0 else None
        settings.data_dir.mkdir(parents=True, exist_ok=True)
        self.store = store or Store(settings.store_url)
        self.artifacts = ArtifactStore(settings.artifacts_url, settings.artifact_options)
        self.registry = CollectorRegistry()
        self.metrics = Metrics(self.registry, job_names=settings.metrics_job_names)
        self.experiments = Controller(settings, self.store, self.metrics)
        self.wakeups = Wakeups(settings.store_url, (EVENTS_CHANNEL,))
        poll = (
            settings.notify_poll_seconds if self.wakeups.listening else settings.tail_poll_seconds
        )
        self.tail = EventTail(
            self.store,
            self.metrics,
            poll,
            settings.metrics_linger_seconds,
            self.wakeups,
            nice=settings.rpc_nice,
        )
        tokens = TokenTable.load(settings.tokens_file) if settings.tokens_file else None
        self.servicer = TrainerServicer(
            settings, self.store, self.tail, self.metrics, self.artifacts, Auth(tokens)
        )
        self.health = health.HealthServicer()
        keepalive_ms = int(settings.keepalive_seconds * 1000)
        self.grpc = grpc.server(
            futures.ThreadPoolExecutor(
                max_workers=settings.rpc_threads,
                thread_name_prefix="rpc",
                initializer=yield_cpu,
                initargs=(settings.rpc_nice,),
            ),
            interceptors=[DecodeGuard()],
            options=[
                ("grpc.max_receive_message_length", settings.max_message_bytes),
                ("grpc.max_send_message_length", settings.max_message_bytes),
                # Pings find dead peers (a laptop that slept mid-stream); clients may ping
                # idle streams, but not more often than every 10 s.
                ("grpc.keepalive_time_ms", keepalive_ms),
                ("grpc.keepalive_timeout_ms", 20_000),
                ("grpc.keepalive_permit_without_calls", 1),
                ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
                ("grpc.http2.max_pings_without_data", 0),
            ],
        )
        trainer_pb2_grpc.add_TrainerServiceServicer_to_server(self.servicer, self.grpc)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.grpc)
        reflection.enable_server_reflection(
            (SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), self.grpc
        )
        self.host = host
        credentials = server_credentials(
            settings.tls_cert, settings.tls_key, settings.tls_client_ca
        )
        self.tls = credentials is not None
        address = f"{host}:{settings.port}"
        if credentials is None:
            self.port = self.grpc.add_insecure_port(address)
        else:
            self.port = self.grpc.add_secure_port(address, credentials)
        auth = "tokens" if tokens else "none (loopback only)"
        if open_to_all:
            log.warning(
                "INSECURE: listening on %s:%d with no authentication; anyone who can reach this "
                "port can submit jobs, read every job and download models",
                host,
                self.port,
            )
            where = "all interfaces" if host in WILDCARD_HOSTS else host
            auth = f"none (INSECURE, {where})"
        if settings.tls_client_ca is not None:
            auth = f"{'tokens + ' if tokens else ''}client certificates"
        self.describe = f"auth {auth}, tls {'on' if self.tls else 'off'}"
        self.metrics_port = 0
        self.metrics_host = settings.metrics_host
        self.stopping = threading.Event()

    def start(self) -> None:
        self.wakeups.start()
        self.tail.start()
        self.grpc.start()
        http = metrics_server(self.settings, self.registry)
        self.metrics_http = http
        self.metrics_port = http.server_port
        if self.supervisor:
            self.supervisor.start()
        self.experiments.start()
        threading.Thread(target=self._housekeeping, name="rescuer", daemon=True).start()
        for name in ("", SERVICE_NAME):
            self.health.set(name, health_pb2.HealthCheckResponse.SERVING)
        if self.settings.serve_file is not None:
            self._write_serve_file(self.settings.serve_file)

    def _write_serve_file(self, path: Path) -> None:
        """Where this server is, for `trainer health --serve-file`: written whole or not at
        all (a health check never reads half of it)."""
        record = {
            "pid": os.getpid(),
            "host": self.host,
            "port": self.port,
            "tls": self.tls,
            "metrics_host": self.metrics_host,
            "metrics_port": self.metrics_port,
        }
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, temp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "w") as out:
                json.dump(record, out)
                out.write("\n")
            os.chmod(temp, 0o644)  # mkstemp's 0600 would hide it from a health check's user
            os.replace(temp, path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(temp)
            raise
        log.info("serve file %s: pid %d, %s:%d", path, os.getpid(), self.host, self.port)

    def _remove_serve_file(self, path: Path) -> None:
        # Only this server's own: another one may have started since and written its own.
        try:
            pid = json.loads(path.read_text()).get("pid")
        except (OSError, ValueError, AttributeError):
            return
        if pid == os.getpid():
            with contextlib.suppress(FileNotFoundError):
                path.unlink()

    def _housekeeping(self) -> None:
        """Requeue jobs whose worker stopped renewing its lease; refresh the queue gauges;
        apply the retention policy now and then."""
        interval = min(self.settings.lease_seconds / 3, 1.0)
        pruned = swept = 0.0
        while not self.stopping.wait(interval):
            s = self.settings
            if (s.retention_days or s.retention_keep) and time.monotonic() - pruned > 60:
                pruned = time.monotonic()
                try:
                    prune(
                        s,
                        finished_before=policy_cutoff(s),
                        keep_last=s.retention_keep,
                        store=self.store,
                        artifacts=self.artifacts,
                    )
                except Exception:
                    log.exception("retention: pruning failed; trying again later")
            if time.monotonic() - swept > 600:  # uploads cut off part-way, past resuming
                swept = time.monotonic()
                try:
                    sweep_partial_uploads(s)
                except Exception:
                    log.exception("retention: sweeping partial uploads failed")
            try:
                for job_id, state in self.store.rescue():
                    log.warning("job %s: lease expired; now %s", job_id, state.value)
                depth = self.store.queue_depth()
                for state, count in depth.items():
                    self.metrics.queue_depth.labels(state).set(count)
                # Every worker of the pool, on this machine or another, as the store sees it.
                live = {
                    w.id for w in self.store.live_workers(3 * self.settings.worker_seen_seconds)
                }
                busy = live & self.store.busy_workers()
                self.metrics.workers.labels("busy").set(len(busy))
                self.metrics.workers.labels("idle").set(len(live - busy))
            except Exception:  # the store may be down for a moment; try again next round
                log.exception("housekeeping failed")

    def stop(self, grace: float | None = None) -> None:
        """Drain: health NOT_SERVING, no new jobs accepted, workers checkpoint their jobs and
        hand them back to the queue within the grace period, then everything closes."""
        grace = self.settings.grace_seconds if grace is None else grace
        # First: from now on a health check calls this server gone, not merely draining.
        if self.settings.serve_file is not None:
            self._remove_serve_file(self.settings.serve_file)
        self.servicer.draining = True
        for name in ("", SERVICE_NAME):
            self.health.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
        self.stopping.set()
        self.experiments.stop()  # its experiments go to another server at once
        if self.supervisor:
            self.supervisor.stop(grace)
        self.grpc.stop(grace=1.0).wait()
        self.tail.stop()
        self.wakeups.stop()
        self.metrics_http.shutdown()
        self.store.close()
