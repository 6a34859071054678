"""
relaygw's configuration: the frozen model and L{load}.
"""

from typing import TYPE_CHECKING

from relaygw.config._model import (
    DNS,
    RIGHTS,
    AcceptedDomain,
    AuthThrottle,
    Binding,
    Config,
    Connector,
    Directory,
    Gateway,
    Grant,
    HostPort,
    IPRange,
    OAuth,
    Queue,
    Rate,
    Route,
    Timeouts,
    Users,
    normalise_address,
)

__all__ = [
    "DNS",
    "RIGHTS",
    "AcceptedDomain",
    "AuthThrottle",
    "Binding",
    "Config",
    "Connector",
    "Directory",
    "Gateway",
    "Grant",
    "HostPort",
    "IPRange",
    "OAuth",
    "Queue",
    "Rate",
    "Route",
    "Timeouts",
    "Users",
    "normalise_address",
    "load",
    "load_default",
]


if TYPE_CHECKING:
    from relaygw.config._load import load, load_default


def __getattr__(name: str) -> object:
    # load() lives in L3 (_load imports tomllib); import it lazily so that L0/L1
    # modules importing the model never pull the loader in.
    if name in ("load", "load_default"):
        from relaygw.config import _load

        return getattr(_load, name)
    raise AttributeError(name)
