"""Two-layer cache: in-process LRU over Redis, single flight, invalidation."""
