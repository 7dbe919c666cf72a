"""Fan-out fetching of external URLs through one shared client, and its cache."""
