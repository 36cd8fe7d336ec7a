"""HTTP handlers: each module ends with its list of routes."""
