"""
A request body for twisted.web's Agent (and treq's C{data_to_body_producer}),
shared by the token source and the Graph route.
"""

from __future__ import annotations

from typing import cast

from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IConsumer
from twisted.web.iweb import IBodyProducer
from zope.interface import implementer

__all__ = ["Body"]


@implementer(IBodyProducer)
class Body:
    """
    A small request body written at once (its length is known: no chunked
    encoding).  treq's default producer runs on the global reactor's
    cooperator; this one needs no reactor at all.
    """

    def __init__(self, data: object) -> None:
        self._data = data.encode("ascii") if isinstance(data, str) else cast(bytes, data)
        self.length = len(self._data)

    def startProducing(self, consumer: IConsumer) -> Deferred[None]:
        consumer.write(self._data)
        return succeed(None)

    def pauseProducing(self) -> None:
        pass

    def resumeProducing(self) -> None:
        pass

    def stopProducing(self) -> None:
        pass
