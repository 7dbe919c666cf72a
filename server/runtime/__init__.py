"""Running the server: supervisor, embedded servers, logs, access log, metrics, connections."""
