"""Typed settings, read once from `CONVEYOR_*` environment variables."""

from __future__ import annotations

import math
from collections import Counter
from pathlib import Path
from typing import Any, Literal

from limits import parse_many
from pydantic import AliasChoices, Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

# Where `make run` keeps the development secret (devtools/devstack.py writes it, mode 0600).
SECRET_FILE = "secret_key"  # noqa: S105 - a file name, not a secret
MIN_SECRET_LENGTH = 32
MIN_SECRET_BITS = 90
MIN_FLOWER_PASSWORD_LENGTH = 16
MIN_FLOWER_PASSWORD_BITS = 32
# Fragments of placeholder values (old defaults, documentation examples): a secret that
# contains one was typed by a person from an example, not generated.
PLACEHOLDERS = (
    "dev-insecure-secret-change-me",
    "changeme",
    "change-me",
    "change_me",
    "insecure",
    "example",
    "password",
    "secret",
)


def estimated_bits(value: str) -> float:
    """Estimate the entropy of `value` in bits, to refuse secrets a person typed.

    The estimate is the Shannon entropy of the characters of the shortest unit whose
    repetition makes up the value, times that unit's length: `"abc" * 12` counts as
    `"abc"` (5 bits), `"a" * 36` as 0, and padding such as `"x" * 32` adds little. It
    overrates patterned text (`"abcdef…"`) and knows no dictionary, so it catches
    typed values, not every weak one; a generated value scores far above the floor
    (`secrets.token_urlsafe(32)` ~180 or more, `secrets.token_hex(32)` ~210 or more,
    `openssl rand -base64 32` ~185 or more, `secrets.token_hex(16)` ~93 or more).
    """
    # The shortest period comes from the KMP failure function of the whole string.
    fail = [0] * (len(value) + 1)
    matched = 0
    for i in range(1, len(value)):
        while matched and value[i] != value[matched]:
            matched = fail[matched]
        if value[i] == value[matched]:
            matched += 1
        fail[i + 1] = matched
    unit = value[: len(value) - fail[len(value)]]
    counts = Counter(unit).values()
    return -sum(n * math.log2(n / len(unit)) for n in counts)


def secret_weakness(value: str, *, min_length: int, min_bits: float) -> str | None:
    """Return why `value` is too weak for production, or None when it will do."""
    if len(value) < min_length:
        return f"shorter than {min_length} characters"
    lowered = value.lower()
    if any(placeholder in lowered for placeholder in PLACEHOLDERS):
        return "a placeholder or a documented example, not a generated value"
    if estimated_bits(value) < min_bits:
        return "too predictable (repeated or too few distinct characters)"
    return None


class Settings(BaseSettings):
    """Every knob Conveyor has; documented one by one in `.env.example`."""

    # hide_input_in_errors: a refused setting's error would otherwise show the raw inputs,
    # secrets among them, in the start-up failure the logs keep.
    model_config = SettingsConfigDict(
        env_prefix="CONVEYOR_", env_file=".env", extra="ignore", hide_input_in_errors=True
    )

    env: Literal["development", "test", "production"] = "development"
    # Signs tokens and API-key hashes. No default: development and test read
    # `<data_dir>/secret_key` (made by `make run`) when it is unset; see `_find_secret_key`.
    secret_key: SecretStr
    # Secrets (URLs too: they may carry passwords) are SecretStr, so that no repr, str or
    # model_dump of the settings, nor a traceback, shows them; read them through
    # `.get_secret_value()` or the plain-string properties below where they are used.
    database_url: SecretStr = SecretStr("postgresql+psycopg://postgres@127.0.0.1:5432/conveyor")
    redis_url: SecretStr = SecretStr("redis://127.0.0.1:6379/0")
    # Separate URLs let an operator move the broker to RabbitMQ or another Redis.
    broker_url: SecretStr | None = None
    result_backend_url: SecretStr | None = None
    db_pool_size: int = Field(default=10, ge=1)
    db_pool_max_overflow: int = Field(default=10, ge=0)
    # Behind PgBouncer in transaction mode a prepared statement may land on another server
    # connection: turn off psycopg's automatic server-side prepares.
    db_prepared_statements: bool = True
    max_body_bytes: int = Field(default=1024 * 1024, ge=1024)
    # Browser origins allowed to call the API (CORS); none by default.
    cors_origins: list[str] = []
    # Largest file `POST /v1/uploads` accepts.
    max_upload_bytes: int = Field(default=50 * 1024 * 1024, ge=1024)
    # Most bytes one tenant's uploads may take together; 0: no quota.
    tenant_max_upload_bytes: int = Field(default=1024**3, ge=0)
    # Seconds the result backend keeps a job's live state; the ledger keeps the rest.
    result_expires: int = Field(default=24 * 3600, ge=60)
    # A message not acknowledged within this many seconds is redelivered by Redis;
    # on Redis the worker refuses job types whose hard time limit does not fit inside it.
    visibility_timeout: int = Field(default=7200, ge=60)
    # RabbitMQ's `consumer_timeout` (rabbitmq.conf, in ms there; seconds here), 30 minutes
    # unless the broker says otherwise. A delivery unacknowledged that long makes RabbitMQ
    # close the worker's channel and requeue; on an AMQP broker the worker warns at start
    # about job types whose hard time limit reaches it (docs/operations/brokers.md).
    amqp_consumer_timeout: int = Field(default=1800, ge=1)
    # Hard time limit (seconds) for job types that set none; on Redis it must fit the
    # visibility timeout.
    default_time_limit: int = Field(default=1800, ge=1)
    # A running job's worker refreshes its heartbeat this often; after `heartbeat_timeout`
    # seconds of silence the reaper retries or fails the job (its worker is gone).
    heartbeat_interval: float = Field(default=10.0, gt=0)
    heartbeat_timeout: float = Field(default=120.0, gt=0)
    # Beat's housekeeping, each task on its own interval (seconds): queue due jobs and
    # unpublished ones; fire due schedules; reap jobs whose heartbeat stopped; re-drive
    # queued jobs whose message the broker lost; prune rows past retention.
    promote_interval: float = Field(default=1.0, gt=0)
    schedule_interval: float = Field(default=1.0, gt=0)
    reap_interval: float = Field(default=5.0, gt=0)
    reconcile_interval: float = Field(default=60.0, gt=0)
    prune_interval: float = Field(default=60.0, gt=0)
    # The dispatcher (flow control): each queue holds at most this many messages in the
    # broker (a busy one about a quarter second of its workers' pace, worker/pace.py), so a
    # new job of any tenant waits behind few; it takes at most this many of each tenant's
    # waiting jobs a pass, turn by turn.
    dispatch_in_flight: int = Field(default=100, ge=1)
    dispatch_per_tenant: int = Field(default=50, ge=1)
    # A queued job published this long ago whose message is in neither the queue nor the
    # unacked set is published again (a Redis restart without persistence loses them, and
    # an API process that dies between a submit's commit and its publish never sent one).
    reconcile_after: int = Field(default=300, ge=1)
    # The reconciler reads at most this many broker messages a pass; above it, it waits.
    reconcile_scan_limit: int = Field(default=20_000, ge=1)
    # A schedule occurrence older than this when beat gets to it counts as missed.
    misfire_grace_seconds: float = Field(default=60.0, gt=0)
    # Cancelled jobs that keep running this long are revoked with terminate.
    cancel_grace_seconds: float = Field(default=30.0, gt=0)
    # Largest JSON result a job may return; a larger one fails the job, clearly.
    max_result_bytes: int = Field(default=256 * 1024, ge=1024)
    # Finished jobs (with their events) are deleted this long after they finish.
    job_retention_days: float = Field(default=30.0, gt=0)
    # How long an Idempotency-Key keeps returning its first job.
    idempotency_retention_hours: float = Field(default=24.0, gt=0)
    # Queues a worker consumes first, in order; other queues come after, by name.
    queue_order: list[str] = ["critical", "default", "low"]
    default_queue: str = "default"
    # Extra modules that register job types, loaded after the platform's and every installed
    # domain's (conveyor.plugins), which always load.
    job_modules: list[str] = []
    # Hosts (names or addresses) outbound requests may reach even when they resolve to an
    # address that is not globally routable; everything else must be public.
    outbound_allow_hosts: list[str] = []
    # Largest response body an outbound request reads.
    outbound_max_bytes: int = Field(default=1024 * 1024, ge=1024)
    # `open`: anyone may register a tenant; `invite`: admins add users. Default by env.
    signup: Literal["open", "invite"] | None = None
    # An API process remembers a verified API key this many seconds (0: never). Revoking
    # a key or deactivating its creator reaches the other API processes within it.
    api_key_cache_seconds: float = Field(default=5.0, ge=0, le=60)
    access_token_minutes: int = Field(default=15, ge=1, le=24 * 60)
    refresh_token_days: int = Field(default=30, ge=1, le=365)
    # Limit strings (`limits` syntax) for sign-in and sign-up, per client IP and per email.
    auth_rate_limit_ip: str = "30/minute"
    auth_rate_limit_email: str = "10/minute"
    # Reverse proxies in front of the API that append the client's address to
    # X-Forwarded-For; per-IP rate limits count the address the outermost one saw.
    trusted_proxies: int = Field(default=0, ge=0, le=10)
    # Namespace of rate-limit counters in Redis; shared by every API instance.
    rate_limit_prefix: str = "conveyor-rl"
    # Rate limits per endpoint group (api/rate_limits.py), each counted per verified principal
    # (API key or user) and per client IP; `limits` strings, empty for none. Generous
    # defaults: they stop a runaway client, not a busy one.
    rate_limits_enabled: bool = True
    # X-RateLimit-* headers on every limited response, from the counter's own hit (no extra read).
    rate_limit_headers: bool = True
    # Hits of an endpoint group's limit each API process counts in Redis at once and then
    # admits without a round trip (api/rate_leases.py); 1 counts every request in Redis.
    # Never admits past a limit; may refuse up to processes * (lease - 1) requests early,
    # and only limits of at least 100 leases' worth are leased.
    rate_limit_lease: int = Field(default=16, ge=1, le=1000)
    rate_limit_submit_principal: str = "60000/minute"
    rate_limit_submit_ip: str = "120000/minute"
    rate_limit_read_principal: str = "120000/minute"
    rate_limit_read_ip: str = "240000/minute"
    rate_limit_control_principal: str = "6000/minute"
    rate_limit_control_ip: str = "12000/minute"
    rate_limit_admin_principal: str = "600/minute"
    rate_limit_admin_ip: str = "1200/minute"
    # Most unfinished (scheduled, queued, running, retrying) jobs a tenant may have; a submit
    # beyond it is refused with 429 until the tenant's jobs drain. 0: no quota.
    tenant_max_unfinished_jobs: int = Field(default=100_000, ge=0)
    # Seconds an API process trusts its count of a tenant's unfinished jobs (plus what it
    # submitted since) before counting again; 0 counts on every submit.
    tenant_quota_refresh_seconds: float = Field(default=1.0, ge=0, le=60)
    # The tenant's drain rate (jobs finished per second), from which the quota's
    # Retry-After is computed, is measured over this many seconds.
    tenant_drain_window_seconds: float = Field(default=300.0, gt=0)
    log_level: str = "INFO"
    # `auto`: readable text in development, JSON lines everywhere else.
    log_format: Literal["auto", "json", "console"] = "auto"
    # Bearer token for every /metrics (API, worker, beat). Unset: /metrics answers only
    # in development; set it and give Prometheus the same token.
    metrics_token: SecretStr = SecretStr("")
    # The worker's and beat's own metrics exporters; 0 leaves one off.
    metrics_address: str = "127.0.0.1"
    worker_metrics_port: int = Field(default=0, ge=0, le=65535)
    beat_metrics_port: int = Field(default=0, ge=0, le=65535)
    # Seconds to wait for workers to answer a broadcast (/v1/queues, /metrics).
    inspect_timeout: float = Field(default=1.0, gt=0, le=30)
    flower_user: str = "admin"
    flower_password: SecretStr = SecretStr("")
    flower_address: str = "127.0.0.1"
    flower_port: int = 5555
    # Serve Flower under this path (e.g. `flower` for /flower/...) behind a proxy; empty: /.
    flower_url_prefix: str = ""
    data_dir: str = ".conveyor"
    # Tracing (docs/operations/tracing.md) reads OpenTelemetry's own variables, not CONVEYOR_ ones:
    # it is on when an OTLP endpoint is set (or OTEL_TRACES_EXPORTER=console), off when
    # OTEL_SDK_DISABLED=true. The exporter reads the rest (headers, timeout, sampler) itself.
    otel_endpoint: str | None = Field(default=None, validation_alias="OTEL_EXPORTER_OTLP_ENDPOINT")
    otel_traces_endpoint: str | None = Field(
        default=None, validation_alias="OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"
    )
    otel_traces_exporter: str = Field(default="otlp", validation_alias="OTEL_TRACES_EXPORTER")
    otel_sdk_disabled: bool = Field(default=False, validation_alias="OTEL_SDK_DISABLED")
    # Requests left untraced (regular expressions matched against the URL): probes, scrapes.
    otel_excluded_urls: str = Field(
        default="/healthz,/readyz,/metrics",
        validation_alias=AliasChoices(
            "OTEL_PYTHON_FLASK_EXCLUDED_URLS", "OTEL_PYTHON_EXCLUDED_URLS"
        ),
    )

    @field_validator(
        "auth_rate_limit_ip",
        "auth_rate_limit_email",
        "rate_limit_submit_principal",
        "rate_limit_submit_ip",
        "rate_limit_read_principal",
        "rate_limit_read_ip",
        "rate_limit_control_principal",
        "rate_limit_control_ip",
        "rate_limit_admin_principal",
        "rate_limit_admin_ip",
    )
    @classmethod
    def _parse_rate_limit(cls, value: str) -> str:
        # Refuse a malformed limit at start-up rather than skip it on every request.
        if value.strip():
            try:
                parse_many(value)
            except ValueError as exc:
                raise ValueError(f"not a rate limit such as '100/minute': {value!r}") from exc
        return value.strip()

    @model_validator(mode="before")
    @classmethod
    def _find_secret_key(cls, data: Any) -> Any:
        """Fill in an unset secret from `<data_dir>/secret_key`, outside production only."""
        if not isinstance(data, dict) or _plain(data.get("secret_key")):
            return data
        env = data.get("env") or cls.model_fields["env"].default
        data_dir = data.get("data_dir") or cls.model_fields["data_dir"].default
        path = Path(data_dir) / SECRET_FILE
        if env == "production":  # never a file: the deployment gives production its secret
            raise ValueError("set CONVEYOR_SECRET_KEY")
        try:
            found = path.read_text().strip()
        except OSError:
            found = ""
        if not found:
            raise ValueError(f"set CONVEYOR_SECRET_KEY; `make run` creates one in {path}")
        return {**data, "secret_key": found}

    @model_validator(mode="after")
    def _refuse_weak_secrets(self) -> Settings:
        if self.env != "production":
            return self
        weakness = secret_weakness(
            self.secret_key.get_secret_value(),
            min_length=MIN_SECRET_LENGTH,
            min_bits=MIN_SECRET_BITS,
        )
        if weakness:
            msg = (
                f"CONVEYOR_SECRET_KEY is {weakness}; in production set it to a generated "
                "value such as `python3 -c 'import secrets; print(secrets.token_urlsafe(48))'`"
            )
            raise ValueError(msg)
        if not self.flower_password.get_secret_value():
            raise ValueError("CONVEYOR_FLOWER_PASSWORD must be set in production")
        weakness = secret_weakness(
            self.flower_password.get_secret_value(),
            min_length=MIN_FLOWER_PASSWORD_LENGTH,
            min_bits=MIN_FLOWER_PASSWORD_BITS,
        )
        if weakness:
            raise ValueError(f"CONVEYOR_FLOWER_PASSWORD is {weakness}")
        return self

    @property
    def signup_open(self) -> bool:
        """Return whether self-service registration is allowed."""
        return (self.signup or ("invite" if self.env == "production" else "open")) == "open"

    @property
    def tracing(self) -> bool:
        """Return whether to trace: an exporter is configured and the SDK is not disabled."""
        if self.otel_sdk_disabled or self.otel_traces_exporter == "none":
            return False
        return bool(self.otlp_traces_url) or self.otel_traces_exporter == "console"

    @property
    def otlp_traces_url(self) -> str | None:
        """Return where OTLP/HTTP spans go: the traces endpoint, else the base's /v1/traces."""
        if self.otel_traces_endpoint:
            return self.otel_traces_endpoint
        if self.otel_endpoint:
            return self.otel_endpoint.rstrip("/") + "/v1/traces"
        return None

    @property
    def sqlalchemy_url(self) -> str:
        """Return the database URL with the psycopg 3 driver SQLAlchemy needs."""
        url = self.database_url.get_secret_value()
        for prefix in ("postgresql://", "postgres://"):
            if url.startswith(prefix):
                return "postgresql+psycopg://" + url.removeprefix(prefix)
        return url

    @property
    def broker(self) -> str:
        """Return the Celery broker URL (the Redis URL unless set apart)."""
        return (self.broker_url or self.redis_url).get_secret_value()

    @property
    def amqp_broker(self) -> bool:
        """Return whether the broker is RabbitMQ (AMQP) rather than Redis."""
        return self.broker.startswith(("amqp://", "amqps://", "pyamqp://"))

    @property
    def result_backend(self) -> str:
        """Return the Celery result backend URL (the Redis URL unless set apart)."""
        return (self.result_backend_url or self.redis_url).get_secret_value()


def _plain(value: object) -> str:
    """Return a raw setting value as text, unwrapping a SecretStr."""
    text = value.get_secret_value() if isinstance(value, SecretStr) else str(value or "")
    return text.strip()
