"""Background jobs: the queue in PostgreSQL, the runner, the kinds of job."""
