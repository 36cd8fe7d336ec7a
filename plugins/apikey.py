"""API keys: a provider that authenticates requests with keys (in progress)."""
