"""
The envelope of a spooled message, and its JSON form (schema version 1).

The envelope is the contract between the receive side and the send side
(the Postfix cut): intake writes it once at commit; the scheduler rewrites it
as recipients' fates are decided.  Never pickle.
"""

from __future__ import annotations

import json
from typing import Any, Literal

from attrs import evolve, frozen

SCHEMA_VERSION = 1

RecipientStateName = Literal["queued", "delivered", "failed"]
OutcomeKind = Literal["delivered", "retry", "bounce"]


@frozen
class TLSInfo:
    """The TLS of the receiving session: protocol version (C{"TLSv1.3"}) and cipher name."""

    version: str
    cipher: str


@frozen
class Outcome:
    """
    One recipient's result of one delivery attempt.

    @ivar kind: C{delivered} (2xx), C{retry} (4xx or a connection problem), C{bounce} (5xx).
    @ivar reply: the remote reply or a local explanation, one line, for logs and DSNs.
    @ivar remote_host: the host that gave the reply, C{""} when none did.
    @ivar retry_at: for C{retry}, POSIX seconds before which the message is
        not tried again (an upstream's Retry-After); C{0.0}: the schedule
        alone decides.  Never stored in the spool.
    """

    kind: OutcomeKind
    reply: str
    remote_host: str = ""
    retry_at: float = 0.0


@frozen
class Recipient:
    """One recipient and its fate so far."""

    address: str
    state: RecipientStateName = "queued"
    attempts: int = 0
    last_reply: str = ""

    def record(self, outcome: Outcome) -> Recipient:
        """The recipient after C{outcome}."""
        state: RecipientStateName = {
            "delivered": "delivered",
            "bounce": "failed",
            "retry": "queued",
        }[outcome.kind]  # type: ignore[assignment]
        return evolve(self, state=state, attempts=self.attempts + 1, last_reply=outcome.reply)


@frozen
class Envelope:
    """
    A spooled message's envelope.

    @ivar id: the internal queue id (the C{InternalId} of the 250 reply).
    @ivar sender: the reverse path without brackets; C{""} for the null sender.
    @ivar received_at: POSIX seconds (UTC) when the 250 was sent.
    @ivar size: the octets of the data file (headers added by relaygw included).
    @ivar message_id: the Message-ID header value with its angle brackets.
    @ivar next_attempt: POSIX seconds of the next delivery attempt (0: at once).
    """

    id: str
    sender: str
    recipients: tuple[Recipient, ...]
    connector: str
    client_ip: str
    received_at: float
    size: int
    message_id: str
    client_port: int = 0
    helo: str = ""
    auth_user: str | None = None
    tls: TLSInfo | None = None
    body: Literal["7BIT", "8BITMIME", "BINARYMIME"] = "7BIT"
    smtputf8: bool = False
    next_attempt: float = 0.0
    delay_warned: bool = False

    @property
    def pending(self) -> tuple[Recipient, ...]:
        """Recipients still queued."""
        return tuple(r for r in self.recipients if r.state == "queued")

    def with_outcomes(self, outcomes: dict[str, Outcome]) -> Envelope:
        """The envelope after recording C{outcomes} (address -> outcome) for queued recipients."""
        return evolve(
            self,
            recipients=tuple(
                r.record(outcomes[r.address])
                if r.state == "queued" and r.address in outcomes
                else r
                for r in self.recipients
            ),
        )

    def to_json(self) -> bytes:
        """The versioned JSON form written to the spool."""
        doc: dict[str, Any] = {
            "version": SCHEMA_VERSION,
            "id": self.id,
            "sender": self.sender,
            "recipients": [
                {
                    "address": r.address,
                    "state": r.state,
                    "attempts": r.attempts,
                    "last_reply": r.last_reply,
                }
                for r in self.recipients
            ],
            "connector": self.connector,
            "client_ip": self.client_ip,
            "client_port": self.client_port,
            "helo": self.helo,
            "auth_user": self.auth_user,
            "tls": None
            if self.tls is None
            else {"version": self.tls.version, "cipher": self.tls.cipher},
            "received_at": self.received_at,
            "size": self.size,
            "message_id": self.message_id,
            "body": self.body,
            "smtputf8": self.smtputf8,
            "next_attempt": self.next_attempt,
            "delay_warned": self.delay_warned,
        }
        return json.dumps(doc, ensure_ascii=False, separators=(",", ":")).encode("utf-8")

    @classmethod
    def from_json(cls, data: bytes) -> Envelope:
        """
        Parse the spool's JSON form.

        @raise ValueError: malformed JSON, a missing key, or an unknown schema version.
        """
        try:
            doc = json.loads(data)
            if doc.get("version") != SCHEMA_VERSION:
                raise ValueError(f"unsupported envelope version {doc.get('version')!r}")
            tls = doc.get("tls")
            return cls(
                id=doc["id"],
                sender=doc["sender"],
                recipients=tuple(
                    Recipient(
                        address=r["address"],
                        state=r["state"],
                        attempts=r["attempts"],
                        last_reply=r["last_reply"],
                    )
                    for r in doc["recipients"]
                ),
                connector=doc["connector"],
                client_ip=doc["client_ip"],
                client_port=doc.get("client_port", 0),
                helo=doc.get("helo", ""),
                auth_user=doc.get("auth_user"),
                tls=None if tls is None else TLSInfo(tls["version"], tls["cipher"]),
                received_at=doc["received_at"],
                size=doc["size"],
                message_id=doc["message_id"],
                body=doc.get("body", "7BIT"),
                smtputf8=doc.get("smtputf8", False),
                next_attempt=doc.get("next_attempt", 0.0),
                delay_warned=doc.get("delay_warned", False),
            )
        except (KeyError, TypeError, AttributeError) as e:
            raise ValueError(f"malformed envelope: {e!r}") from e
