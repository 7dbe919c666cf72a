"""Web layer helpers: negotiation, rendering, compression, problems, bodies, routing, OpenAPI."""
