"""Typed settings, read once from `CONVEYOR_*` environment variables."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

DEFAULT_SECRET = "dev-insecure-secret-change-me"  # noqa: S105 - refused outside development
MIN_SECRET_LENGTH = 32


class Settings(BaseSettings):
    """Every knob Conveyor has; documented one by one in `.env.example`."""

    model_config = SettingsConfigDict(env_prefix="CONVEYOR_", env_file=".env", extra="ignore")

    env: Literal["development", "test", "production"] = "development"
    secret_key: str = DEFAULT_SECRET
    database_url: str = "postgresql+psycopg://postgres@127.0.0.1:5432/conveyor"
    redis_url: str = "redis://127.0.0.1:6379/0"
    # Separate URLs let an operator move the broker to RabbitMQ or another Redis.
    broker_url: str | None = None
    result_backend_url: str | None = None
    db_pool_size: int = Field(default=10, ge=1)
    db_pool_max_overflow: int = Field(default=10, ge=0)
    # Behind PgBouncer in transaction mode a prepared statement may land on another server
    # connection: turn off psycopg's automatic server-side prepares.
    db_prepared_statements: bool = True
    max_body_bytes: int = Field(default=1024 * 1024, ge=1024)
    # Seconds the result backend keeps a job's live state; the ledger keeps the rest.
    result_expires: int = Field(default=24 * 3600, ge=60)
    # A message not acknowledged within this many seconds is redelivered by Redis;
    # the worker refuses job types whose hard time limit does not fit inside it.
    visibility_timeout: int = Field(default=7200, ge=60)
    # Hard time limit (seconds) for job types that set none; must fit the visibility timeout.
    default_time_limit: int = Field(default=1800, ge=1)
    # A running job's worker refreshes its heartbeat this often; after `heartbeat_timeout`
    # seconds of silence the reaper retries or fails the job (its worker is gone).
    heartbeat_interval: float = Field(default=10.0, gt=0)
    heartbeat_timeout: float = Field(default=120.0, gt=0)
    # Seconds between housekeeping passes in beat (promote due jobs, reap lost ones).
    housekeeping_interval: float = Field(default=1.0, gt=0)
    # A queued job still unclaimed this long after its publish is published again, in case
    # the broker lost it (a Redis restart without persistence); duplicates are skipped.
    republish_after: int = Field(default=900, ge=10)
    default_queue: str = "default"
    job_modules: list[str] = ["conveyor.jobtypes.system"]
    # `open`: anyone may register a tenant; `invite`: admins add users. Default by env.
    signup: Literal["open", "invite"] | None = None
    access_token_minutes: int = Field(default=15, ge=1, le=24 * 60)
    refresh_token_days: int = Field(default=30, ge=1, le=365)
    # Flask-Limiter strings for sign-in and sign-up, per client IP and per email.
    auth_rate_limit_ip: str = "30/minute"
    auth_rate_limit_email: str = "10/minute"
    # Namespace of rate-limit counters in Redis; shared by every API instance.
    rate_limit_prefix: str = "conveyor-rl"
    log_level: str = "INFO"
    # `auto`: readable text in development, JSON lines everywhere else.
    log_format: Literal["auto", "json", "console"] = "auto"
    # Bearer token for every /metrics (API, worker, beat). Unset: /metrics answers only
    # in development; set it and give Prometheus the same token.
    metrics_token: str = ""
    # The worker's and beat's own metrics exporters; 0 leaves one off.
    metrics_address: str = "127.0.0.1"
    worker_metrics_port: int = Field(default=0, ge=0, le=65535)
    beat_metrics_port: int = Field(default=0, ge=0, le=65535)
    # Seconds to wait for workers to answer a broadcast (/v1/queues, /metrics).
    inspect_timeout: float = Field(default=1.0, gt=0, le=30)
    flower_user: str = "admin"
    flower_password: str = ""
    flower_address: str = "127.0.0.1"
    flower_port: int = 5555
    # Serve Flower under this path (e.g. `flower` for /flower/...) behind a proxy; empty: /.
    flower_url_prefix: str = ""
    data_dir: str = ".conveyor"

    @model_validator(mode="after")
    def _refuse_weak_secrets(self) -> Settings:
        if self.env == "production" and (
            self.secret_key == DEFAULT_SECRET or len(self.secret_key) < MIN_SECRET_LENGTH
        ):
            msg = (
                "CONVEYOR_SECRET_KEY must be set to a random value of at least "
                f"{MIN_SECRET_LENGTH} characters in production"
            )
            raise ValueError(msg)
        if self.env == "production" and not self.flower_password:
            raise ValueError("CONVEYOR_FLOWER_PASSWORD must be set in production")
        return self

    @property
    def signup_open(self) -> bool:
        """Return whether self-service registration is allowed."""
        return (self.signup or ("invite" if self.env == "production" else "open")) == "open"

    @property
    def sqlalchemy_url(self) -> str:
        """Return the database URL with the psycopg 3 driver SQLAlchemy needs."""
        url = self.database_url
        for prefix in ("postgresql://", "postgres://"):
            if url.startswith(prefix):
                return "postgresql+psycopg://" + url.removeprefix(prefix)
        return url

    @property
    def broker(self) -> str:
        """Return the Celery broker URL (the Redis URL unless set apart)."""
        return self.broker_url or self.redis_url

    @property
    def result_backend(self) -> str:
        """Return the Celery result backend URL (the Redis URL unless set apart)."""
        return self.result_backend_url or self.redis_url
