"""Settings: read once in main() from flags and TRAINER_* variables, then passed down."""

from __future__ import annotations

from pathlib import Path

from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="TRAINER_", extra="ignore")

    host: str = "127.0.0.1"
    port: int = 50051
    metrics_port: int = 9464
    workers: int = 1
    gpus: str = "none"  # all | none | 0,1
    store: str | None = None  # a SQLAlchemy URL; SQLite under data_dir when unset
    data_dir: Path = Path("trainer-data")
    lease_seconds: float = 30.0
    heartbeat_seconds: float = 0.5
    max_attempts: int = 3
    poll_seconds: float = 0.02
    tail_poll_seconds: float = 0.05
    max_upload_bytes: int = 512 * 1024 * 1024
    metrics_linger_seconds: float = 300.0

    @property
    def store_url(self) -> str:
        if self.store:
            return self.store
        return f"sqlite:///{(self.data_dir / 'trainer.db').resolve()}"

    def job_dir(self, job_id: str) -> Path:
        return self.data_dir / "jobs" / job_id
