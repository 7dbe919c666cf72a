"""Redis-backed rate limiting: policies, windows, local fallback."""
