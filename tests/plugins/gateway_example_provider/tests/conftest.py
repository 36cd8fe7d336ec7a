"""The gateway's test fixtures (a real gateway, upstream and redis-server)."""

pytest_plugins = ["gateway.testing.pytest_plugin"]
