"""Load config.toml plus environment overrides into frozen, validated dataclasses.

The settings themselves (a dataclass per section, each field with its default and range) are
server/config/sections.py; reading and checking them is server/config/loading.py. Everything
is imported from here (`from server.config import Config, load_config`). Nothing of hotpath's
above this package is imported: loading the config pulls in no service or client library.
"""

from __future__ import annotations

from aiohttp import web

from server.config.loading import ENV_PREFIX, ConfigError, load_config, parse_rates
from server.config.sections import (
    DEFAULT_CONFIG_PATH,
    FEED_CHANNELS,
    AuthConfig,
    CacheConfig,
    CompressionConfig,
    Config,
    CorsConfig,
    DatabaseConfig,
    EmbeddedConfig,
    FeedConfig,
    FetchConfig,
    HealthConfig,
    JobsConfig,
    LogConfig,
    MetricsConfig,
    ProductsConfig,
    RateLimitConfig,
    RedisConfig,
    ServerConfig,
    SmtpConfig,
    StreamingConfig,
    UsersConfig,
)

__all__ = (
    "CONFIG",
    "DEFAULT_CONFIG_PATH",
    "ENV_PREFIX",
    "FEED_CHANNELS",
    "AuthConfig",
    "CacheConfig",
    "CompressionConfig",
    "Config",
    "ConfigError",
    "CorsConfig",
    "DatabaseConfig",
    "EmbeddedConfig",
    "FeedConfig",
    "FetchConfig",
    "HealthConfig",
    "JobsConfig",
    "LogConfig",
    "MetricsConfig",
    "ProductsConfig",
    "RateLimitConfig",
    "RedisConfig",
    "ServerConfig",
    "SmtpConfig",
    "StreamingConfig",
    "UsersConfig",
    "load_config",
    "parse_rates",
)

CONFIG = web.AppKey("hotpath.config", Config)
