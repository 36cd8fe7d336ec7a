"""Session gateway: a Tornado reverse gateway that owns sessions and identity.

Plugins import :data:`hookimpl` from here, and every type they need from
:mod:`gateway.api`::

    from gateway import hookimpl
    from gateway.api import LoginResult, Provider
"""

from gateway.hookspecs import hookimpl

__all__ = ["hookimpl", "__version__"]
__version__ = "0.1.0"
