"""hotpath: a production-grade web API server written directly on aiohttp."""
