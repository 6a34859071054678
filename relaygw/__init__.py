"""
relaygw: an SMTP relay gateway with Exchange-style receive connectors.

The package reads in pipeline order: listen, select connector, session policy, auth,
accept into spool, route, deliver. See DESIGN.md in the shared notes.
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("relaygw")
except PackageNotFoundError:  # running from a source tree
    __version__ = "0+unknown"

__all__ = ["__version__"]
