"""The real-time feed: Redis Stream fan-out to subscribers, task events."""
