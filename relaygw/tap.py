"""
The twistd plugin's options and service: C{twistd -n relaygw [-c PATH]}.

The configuration is loaded and validated in L{Options.postOptions}, so a bad
file stops twistd with the L{ConfigError} text and a non-zero status before
anything listens.  This and L{relaygw.cli} are the only modules that import
the global reactor.
"""

from __future__ import annotations

import os
import sys
from typing import IO, cast

from twisted.application.service import IService
from twisted.logger import ILogObserver, jsonFileLogObserver
from twisted.python import usage

from relaygw.config._load import load, load_default
from relaygw.config._model import Config
from relaygw.errors import ConfigError

__all__ = ["Options", "json_log", "makeService"]


class Options(usage.Options):
    """
    C{twistd relaygw} options.

    @ivar config: the loaded configuration, set by L{postOptions}.
    """

    synopsis = "[-c PATH]"
    longdesc = (
        "Run the relaygw SMTP relay gateway.  Without --config, the embedded "
        "default configuration is used (127.0.0.1 only, state under ./var/)."
    )
    optParameters = [
        [
            "config",
            "c",
            None,
            "The configuration file (TOML).  Default: the embedded default configuration.",
        ],
    ]

    config: Config

    def postOptions(self) -> None:
        """
        Load the configuration.

        @raise usage.UsageError: the configuration is invalid; the text is
            the L{ConfigError}'s (file, key path, problem).
        """
        path = self["config"]
        try:
            self.config = load(path) if path is not None else load_default()
        except ConfigError as error:
            raise usage.UsageError(str(error)) from None


def makeService(options: Options) -> IService:
    """
    Build the gateway service on the global reactor.

    @param options: parsed L{Options} (their C{config} is loaded).
    """
    from twisted.internet import reactor

    from relaygw._types import IServeReactor
    from relaygw.polling import make_lean
    from relaygw.service import RelayGatewayService
    from relaygw.workers import default_workers

    make_lean(reactor)
    config = options.config
    return RelayGatewayService(
        config,
        cast(IServeReactor, reactor),
        delivery="process",
        config_path=options["config"],
        signals=True,
        workers=config.gateway.workers or default_workers(),
    )


def json_log() -> ILogObserver:
    """
    A log observer factory for C{twistd --logger=relaygw.tap.json_log}:
    one JSON object per event (L{twisted.logger.jsonFileLogObserver}, fields
    unrendered), appended to the file named by the environment variable
    C{RELAYGW_JSON_LOG}, or written to standard output when it is unset.
    """
    path = os.environ.get("RELAYGW_JSON_LOG")
    stream: IO[str] = sys.stdout if not path else open(path, "a", encoding="utf-8")
    return jsonFileLogObserver(stream)
