"""PostgreSQL: the pool, read batching, LISTEN, migrations."""
