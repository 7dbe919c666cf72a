"""hotpath benchmark suite: every speed claim measured against the bare aiohttp floor."""
