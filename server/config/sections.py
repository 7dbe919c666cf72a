"""The settings, one frozen dataclass per config.toml section: each field with its type, its
default and its allowed range or choices (read by server/config/loading.py)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# server/config/sections.py -> the checkout's config.toml
DEFAULT_CONFIG_PATH = Path(__file__).resolve().parent.parent.parent / "config.toml"


def _range(lo: float | None = None, hi: float | None = None) -> dict[str, Any]:
    return {"min": lo, "max": hi}


@dataclass(frozen=True, slots=True)
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = field(default=8080, metadata=_range(1, 65535))
    access_log: bool = False
    client_max_size: int = field(default=1024 * 1024, metadata=_range(1024))
    yaml_max_size: int = field(default=64 * 1024, metadata=_range(1024))
    parser_timeout: float = field(default=2.0, metadata=_range(0.01))
    body_max_containers: int = field(default=4096, metadata=_range(1))
    body_max_items: int = field(default=65536, metadata=_range(1))
    body_max_fields: int = field(default=16, metadata=_range(1))
    shutdown_timeout: float = field(default=10.0, metadata=_range(0))
    workers: int = field(default=0, metadata=_range(0, 1024))
    backlog: int = field(default=1024, metadata=_range(1, 65535))
    keepalive_timeout: float = field(default=75.0, metadata=_range(0))
    start_timeout: float = field(default=60.0, metadata=_range(1))
    client_header_timeout: float = field(default=10.0, metadata=_range(0.01))
    client_body_timeout: float = field(default=30.0, metadata=_range(0.01))
    send_timeout: float = field(default=60.0, metadata=_range(0))
    max_connections: int = field(default=0, metadata=_range(0, 1_000_000))


@dataclass(frozen=True, slots=True)
class DatabaseConfig:
    url: str = ""
    min_size: int = field(default=2, metadata=_range(0, 1000))
    max_size: int = field(default=10, metadata=_range(1, 1000))
    command_timeout: float = field(default=5.0, metadata=_range(0.001))
    statement_timeout: float = field(default=6.0, metadata=_range(0))
    temp_file_limit: int = field(default=1024 * 1024 * 1024, metadata=_range(0))
    acquire_timeout: float = field(default=2.0, metadata=_range(0.001))
    statement_cache_size: int = field(default=256, metadata=_range(0))
    max_inactive_lifetime: float = field(default=300.0, metadata=_range(0))
    start_timeout: float = field(default=30.0, metadata=_range(0))
    migrate_on_start: bool = True
    batch_reads: bool = True
    batch_max: int = field(default=256, metadata=_range(1, 10000))


@dataclass(frozen=True, slots=True)
class RedisConfig:
    url: str = ""
    max_connections: int = field(default=64, metadata=_range(1))
    socket_timeout: float = field(default=2.0, metadata=_range(0.001))
    connect_timeout: float = field(default=2.0, metadata=_range(0.001))
    start_timeout: float = field(default=30.0, metadata=_range(0))


@dataclass(frozen=True, slots=True)
class EmbeddedConfig:
    data_dir: str = "var"


@dataclass(frozen=True, slots=True)
class HealthConfig:
    check_timeout: float = field(default=1.0, metadata=_range(0.001))


@dataclass(frozen=True, slots=True)
class UsersConfig:
    default_limit: int = field(default=50, metadata=_range(1))
    max_limit: int = field(default=200, metadata=_range(1))


@dataclass(frozen=True, slots=True)
class ProductsConfig:
    default_limit: int = field(default=50, metadata=_range(1))
    max_limit: int = field(default=200, metadata=_range(1))
    render_cache_size: int = field(default=256, metadata=_range(1))


@dataclass(frozen=True, slots=True)
class RateLimitConfig:
    enabled: bool = True
    default: str = ""
    policies: dict[str, str] = field(
        default_factory=lambda: {
            "protected": "100/hour, 10/minute",
            "users_create": "600/minute",
            "user_update": "600/minute",
            "user_delete": "600/minute",
            "send_notification": "600/minute",
            "events_publish": "600/minute",
            "task_cancel": "600/minute",
            "feed_tokens": "600/minute",
            "generate_report": "60/minute",
            "bulk_process": "60/minute",
            "process_urls": "60/minute, 1000/hour",
            "admin_scopes": "60/minute",
            "admin_keys": "60/minute",
            "admin_keys_create": "60/minute",
            "admin_key_rotate": "60/minute",
            "admin_key_revoke": "60/minute",
            "admin_audit": "60/minute",
        }
    )
    exempt: tuple[str, ...] = ("health", "ready", "metrics", "openapi")
    key_header: str = ""
    trusted_proxies: tuple[str, ...] = ("127.0.0.1/32", "::1/128")
    ipv6_prefix: int = field(default=64, metadata=_range(1, 128))
    fail_mode: str = field(default="local", metadata={"choices": ("open", "closed", "local")})
    processes: int = field(default=1, metadata=_range(1, 1024))
    retry_interval: float = field(default=1.0, metadata=_range(0.01))
    max_batch: int = field(default=32, metadata=_range(1, 10000))


@dataclass(frozen=True, slots=True)
class FetchConfig:
    max_urls: int = field(default=100, metadata=_range(1, 10000))
    timeout: float = field(default=10.0, metadata=_range(0.01))
    connect_timeout: float = field(default=3.0, metadata=_range(0.01))
    deadline: float = field(default=30.0, metadata=_range(0.01))
    max_bytes: int = field(default=1024 * 1024, metadata=_range(1))
    max_redirects: int = field(default=5, metadata=_range(0, 50))
    concurrency: int = field(default=100, metadata=_range(1, 10000))
    connections: int = field(default=200, metadata=_range(1, 10000))
    per_host: int = field(default=50, metadata=_range(1, 10000))
    dns_cache_ttl: int = field(default=10, metadata=_range(0))
    allow: tuple[str, ...] = ()
    user_agent: str = "hotpath/0.1 (fan-out fetcher)"
    cache_ttl: float = field(default=0.0, metadata=_range(0))


@dataclass(frozen=True, slots=True)
class StreamingConfig:
    max_records: int = field(default=1_000_000, metadata=_range(0))
    batch_records: int = field(default=1000, metadata=_range(1, 1_000_000))
    fetch_rows: int = field(default=2000, metadata=_range(1, 1_000_000))
    chunk_size: int = field(default=64 * 1024, metadata=_range(1024))
    write_timeout: float = field(default=30.0, metadata=_range(0.01))
    export_timeout: float = field(default=3600.0, metadata=_range(0.01))


@dataclass(frozen=True, slots=True)
class MetricsConfig:
    enabled: bool = True
    token: str = ""
    flush_interval: float = field(default=1.0, metadata=_range(0.05))
    shared_dir: str = ""


@dataclass(frozen=True, slots=True)
class CompressionConfig:
    enabled: bool = True
    min_size: int = field(default=1024, metadata=_range(0))
    order: tuple[str, ...] = ("zstd", "br", "gzip")
    gzip_level: int = field(default=5, metadata=_range(0, 9))
    br_level: int = field(default=4, metadata=_range(0, 11))
    zstd_level: int = field(default=3, metadata=_range(1, 22))
    types: tuple[str, ...] = (
        "application/json",
        "application/*+json",
        "application/x-ndjson",
        "text/*",
        "application/xml",
        "application/*+xml",
        "application/yaml",
        "application/x-yaml",
        "application/javascript",
        "image/svg+xml",
    )
    executor_threshold: int = field(default=128 * 1024, metadata=_range(0))
    request_max_size: int = field(default=8 * 1024 * 1024, metadata=_range(1024))
    stream_flush_bytes: int = field(default=64 * 1024, metadata=_range(0))
    stream_flush_interval: float = field(default=0.25, metadata=_range(0))
    cache_entries: int = field(default=256, metadata=_range(0))
    dataset_ttl: float = field(default=300.0, metadata=_range(0.001))
    dataset_max_age: int = field(default=60, metadata=_range(0))


# The feed's channels (server/feed/events.py); feed.private_channels names some of them.
FEED_CHANNELS: tuple[str, ...] = ("ticker", "users", "tasks")


@dataclass(frozen=True, slots=True)
class FeedConfig:
    admin_token: str = ""
    history: int = field(default=1000, metadata=_range(1, 10_000_000))
    heartbeat: float = field(default=15.0, metadata=_range(0.001))
    retry: int = field(default=3000, metadata=_range(0))
    queue_size: int = field(default=256, metadata=_range(1, 1_000_000))
    max_subscribers: int = field(default=10_000, metadata=_range(0))
    write_timeout: float = field(default=10.0, metadata=_range(0.001))
    ticker: bool = True
    ticker_interval: float = field(default=1.0, metadata=_range(0.01))
    key_prefix: str = "hotpath:feed:"
    private_channels: tuple[str, ...] = ("users", "tasks")


@dataclass(frozen=True, slots=True)
class LogConfig:
    level: str = field(
        default="INFO",
        metadata={"choices": ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")},
    )
    format: str = field(default="text", metadata={"choices": ("text", "json")})


@dataclass(frozen=True, slots=True)
class JobsConfig:
    concurrency: int = field(default=16, metadata=_range(0, 10000))
    batch_size: int = field(default=16, metadata=_range(1, 10000))
    lease: float = field(default=30.0, metadata=_range(0.1))
    heartbeat_interval: float = field(default=10.0, metadata=_range(0.05))
    poll_interval: float = field(default=5.0, metadata=_range(0.01))
    retention: float = field(default=7 * 86400.0, metadata=_range(0))
    shutdown_timeout: float = field(default=10.0, metadata=_range(0))
    max_attempts: dict[str, str] = field(
        default_factory=lambda: {"default": "3", "send_notification": "6", "noop": "1"}
    )
    backoff_base: dict[str, str] = field(
        default_factory=lambda: {"default": "1.0", "send_notification": "5.0"}
    )
    backoff_max: float = field(default=3600.0, metadata=_range(0))
    bulk_max_rows: int = field(default=10000, metadata=_range(1, 1_000_000))
    bulk_timeout: float = field(default=60.0, metadata=_range(0.01))
    bulk_max_size: int = field(default=2 * 1024 * 1024, metadata=_range(1024))

    def attempts_for(self, kind: str) -> int:
        return int(self.max_attempts.get(kind, self.max_attempts.get("default", "3")))

    def backoff_for(self, kind: str) -> float:
        return float(self.backoff_base.get(kind, self.backoff_base.get("default", "1.0")))


@dataclass(frozen=True, slots=True)
class SmtpConfig:
    host: str = ""
    port: int = field(default=587, metadata=_range(1, 65535))
    starttls: bool = True
    username: str = ""
    password: str = ""
    sender: str = "hotpath@localhost"
    timeout: float = field(default=10.0, metadata=_range(0.01))
    ca_file: str = ""


def _cache_routes() -> dict[str, dict[str, float]]:
    return {"user": {"ttl": 30.0, "grace": 0.0}, "user_profile": {"ttl": 30.0, "grace": 0.0}}


@dataclass(frozen=True, slots=True)
class CacheConfig:
    enabled: bool = True
    max_entries: int = field(default=10_000, metadata=_range(1))
    max_bytes: int = field(default=64 * 1024 * 1024, metadata=_range(1024))
    default_ttl: float = field(default=60.0, metadata=_range(0.001))
    jitter: float = field(default=0.1, metadata=_range(0, 1))
    negative_ttl: float = field(default=5.0, metadata=_range(0))
    lock_ttl: float = field(default=10.0, metadata=_range(0.01))
    lock_wait: float = field(default=2.0, metadata=_range(0))
    lock_poll: float = field(default=0.005, metadata=_range(0.001))
    retry_interval: float = field(default=1.0, metadata=_range(0.01))
    invalidate_wait: float = field(default=0.5, metadata=_range(0))
    channel: str = "hotpath:v1:invalidate"
    routes: dict[str, dict[str, float]] = field(default_factory=_cache_routes)
    expensive_max: int = field(default=1000, metadata=_range(0, 3000))


@dataclass(frozen=True, slots=True)
class AuthConfig:
    open_routes: tuple[str, ...] = ()
    public_reads: bool = True
    dev_key: bool = True
    unknown_ttl: float = field(default=10.0, metadata=_range(0))
    unknown_max: int = field(default=10_000, metadata=_range(0, 10_000_000))
    last_used_interval: float = field(default=60.0, metadata=_range(0.05))
    rotate_overlap: float = field(default=86400.0, metadata=_range(0))
    stream_token_ttl: float = field(default=300.0, metadata=_range(1))
    stream_token_max_ttl: float = field(default=3600.0, metadata=_range(1))
    channel: str = "hotpath:v1:keys"


@dataclass(frozen=True, slots=True)
class CorsConfig:
    allow_origins: tuple[str, ...] = ()
    allow_methods: tuple[str, ...] = ("GET", "HEAD", "POST", "PATCH", "DELETE")
    allow_headers: tuple[str, ...] = (
        "Authorization",
        "Content-Type",
        "Accept",
        "Idempotency-Key",
        "If-None-Match",
        "Last-Event-ID",
        "X-Request-ID",
    )
    expose_headers: tuple[str, ...] = (
        "X-Request-ID",
        "Location",
        "ETag",
        "Retry-After",
        "RateLimit",
        "RateLimit-Policy",
        "X-Rate-Limit",
        "X-Rate-Remaining",
        "X-Rate-Reset",
        "X-Cache",
        "WWW-Authenticate",
    )
    max_age: int = field(default=600, metadata=_range(0, 86400))
    allow_credentials: bool = False


@dataclass(frozen=True, slots=True)
class Config:
    server: ServerConfig = ServerConfig()
    database: DatabaseConfig = DatabaseConfig()
    redis: RedisConfig = RedisConfig()
    embedded: EmbeddedConfig = EmbeddedConfig()
    health: HealthConfig = HealthConfig()
    users: UsersConfig = UsersConfig()
    products: ProductsConfig = ProductsConfig()
    ratelimit: RateLimitConfig = field(default_factory=RateLimitConfig)
    fetch: FetchConfig = FetchConfig()
    streaming: StreamingConfig = StreamingConfig()
    log: LogConfig = LogConfig()
    metrics: MetricsConfig = MetricsConfig()
    compression: CompressionConfig = field(default_factory=CompressionConfig)
    feed: FeedConfig = FeedConfig()
    jobs: JobsConfig = field(default_factory=JobsConfig)
    smtp: SmtpConfig = SmtpConfig()
    cache: CacheConfig = field(default_factory=CacheConfig)
    auth: AuthConfig = field(default_factory=AuthConfig)
    cors: CorsConfig = field(default_factory=CorsConfig)

    @property
    def embedded_mode(self) -> bool:
        """True when neither a database nor a Redis URL is configured."""
        return not self.database.url and not self.redis.url

    @property
    def embedded_data_dir(self) -> Path:
        path = Path(self.embedded.data_dir)
        return path if path.is_absolute() else DEFAULT_CONFIG_PATH.parent / path
