"""The gateway's built-in provider plugins (import name ``gateway_plugins``).

Each module here is registered through the ``gateway.plugins`` entry-point
group in ``setup.cfg``, exactly like a third-party plugin.
"""
