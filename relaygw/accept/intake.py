"""
One transaction into one spool entry (SPEC sections 3 and 4).

The message is streamed a chunk at a time, never a callback per line and
never held whole in memory: L{DataDecoder} undoes DATA's dot-stuffing and
finds the end marker; L{MessageIntake} checks line ends and size, writes the
C{Received:} header, the data and (when the message had none) a
C{Message-ID:} header into an L{IMessageWriter}, and commits the envelope
(asynchronously: the spool fsyncs off the reactor thread); the protocol
answers 250 only when that commit's Deferred fires.

Decisions:
  - The size limit counts the octets the client sent (after dot-unstuffing),
    not the headers relaygw adds.
  - A message over the limit, or with a bare CR or LF, is read to its end and
    discarded; the data written so far is removed (L{IMessageWriter.abort}).
  - A C{Message-ID:} field without a C{<...>} token still counts as present
    (no second one is added); its text is what the reply shows.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Literal, cast

from attrs import define, field
from twisted.internet.defer import Deferred
from twisted.python.failure import Failure

from relaygw import replies
from relaygw.errors import DeferReply, RejectReply
from relaygw.interfaces import IMessageWriter
from relaygw.session.address import Mailbox
from relaygw.spool.envelope import Envelope, Recipient, TLSInfo

BodyType = Literal["7BIT", "8BITMIME", "BINARYMIME"]

__all__ = ["DataDecoder", "LineEndChecker", "MessageIntake", "Transaction"]

_CR = 0x0D
_LF = 0x0A
#: How much of one header field is kept to find and read a Message-ID field.
_FIELD_CAP = 1000
_MSGID_TOKEN = re.compile(r"<[^<>\s]*>")
_MSGID_NAME = b"message-id:"


@define
class Transaction:
    """
    The envelope being collected by MAIL and RCPT.

    @ivar sender: the reverse path, C{None} for C{<>}.
    @ivar recipients: accepted forward paths, in order.
    @ivar body: the C{BODY=} value (C{7BIT} when not given).
    @ivar smtputf8: whether MAIL carried C{SMTPUTF8}.
    @ivar mode: C{None} until DATA or the first BDAT; then C{"DATA"} or C{"BDAT"}.
    """

    sender: Mailbox | None
    body: str = "7BIT"
    smtputf8: bool = False
    recipients: list[Mailbox] = field(factory=list)
    mode: str | None = None

    def envelope(
        self,
        *,
        queue_id: str,
        message_id: str,
        size: int,
        connector: str,
        client_ip: str,
        client_port: int,
        helo: str,
        auth_user: str | None,
        tls: TLSInfo | None,
        received_at: float,
    ) -> Envelope:
        """The spool envelope of this transaction once its data is written."""
        return Envelope(
            id=queue_id,
            sender="" if self.sender is None else str(self.sender),
            recipients=tuple(Recipient(str(r)) for r in self.recipients),
            connector=connector,
            client_ip=client_ip,
            client_port=client_port,
            received_at=received_at,
            size=size,
            message_id=message_id,
            helo=helo,
            auth_user=auth_user,
            tls=tls,
            body=cast(BodyType, self.body),
            smtputf8=self.smtputf8,
        )


class DataDecoder:
    """
    DATA transparency (RFC 5321 section 4.5.2) over a byte stream: removes
    the leading dot of dot-stuffed lines and finds C{CRLF.CRLF}.

    The data is treated as if it began with a CRLF, so a first line of
    C{"."} ends an empty message and a first line starting with C{".."} is
    unstuffed too.  At most four bytes are carried from one chunk to the
    next.
    """

    def __init__(self) -> None:
        self._carry = b"\r\n"
        self._skip = 2

    def feed(self, chunk: bytes) -> tuple[bytes, bytes | None]:
        """
        @param chunk: bytes as received.
        @return: the message content decoded so far, and C{None} while the
            end has not been seen, or else the bytes after the end marker
            (the next pipelined commands, possibly empty).
        """
        buf = self._carry + chunk if self._carry else chunk
        n = len(buf)
        out: list[bytes] = []
        pos = 0
        while True:
            i = buf.find(b"\r\n.", pos)
            if i < 0:
                keep = n - 2 if buf.endswith(b"\r\n") else n - 1 if buf.endswith(b"\r") else n
                keep = max(keep, pos)
                out.append(buf[pos:keep])
                self._carry = buf[keep:]
                return self._emit(out), None
            if i + 3 >= n or (buf[i + 3] == _CR and i + 4 >= n):
                out.append(buf[pos:i])
                self._carry = buf[i:]
                return self._emit(out), None
            if buf[i + 3] == _CR and buf[i + 4] == _LF:
                out.append(buf[pos : i + 2])
                self._carry = b""
                return self._emit(out), buf[i + 5 :]
            out.append(buf[pos : i + 2])
            pos = i + 3

    def _emit(self, parts: list[bytes]) -> bytes:
        data = parts[0] if len(parts) == 1 else b"".join(parts)
        if self._skip:
            dropped = min(self._skip, len(data))
            self._skip -= dropped
            data = data[dropped:]
        return data


class LineEndChecker:
    """
    Detects a CR not followed by LF, or an LF not preceded by CR, across
    chunk boundaries, by counting (no per-line work).
    """

    def __init__(self) -> None:
        self.bad = False
        self._cr = False

    def feed(self, data: bytes) -> None:
        """Check the next C{data}."""
        if self.bad or not data:
            return
        start, end = 0, len(data)
        if self._cr:
            if data[0] != _LF:
                self.bad = True
                return
            start = 1
            self._cr = False
        if end > start and data[end - 1] == _CR:
            self._cr = True
            end -= 1
        crlf = data.count(b"\r\n", start, end)
        if data.count(b"\r", start, end) != crlf or data.count(b"\n", start, end) != crlf:
            self.bad = True

    def close(self) -> None:
        """The stream ended: a CR still waiting for its LF is bare."""
        if self._cr:
            self.bad = True
            self._cr = False


class _HeaderScanner:
    """
    Passes the header section through while noting a C{Message-ID:} field,
    and inserts one just before the blank line ending the section (or at the
    end of a message without a body) when there was none.
    """

    def __init__(self, write: Callable[[bytes], None], new_message_id: str) -> None:
        self._write = write
        self._new = new_message_id
        self.active = True
        self.message_id: str | None = None
        self._at_line_start = True
        self._field = bytearray()

    def feed(self, data: bytes) -> None:
        pos, n = 0, len(data)
        while pos < n:
            if self._at_line_start:
                c = data[pos]
                if c == _CR or c == _LF:
                    self._write(data[:pos])
                    self._finish()
                    self._write(data[pos:])
                    return
                if c != 0x20 and c != 0x09:
                    self._end_field()
                self._at_line_start = False
            nl = data.find(b"\n", pos)
            end = n if nl < 0 else nl + 1
            room = _FIELD_CAP - len(self._field)
            if room > 0:
                self._field += data[pos : min(end, pos + room)]
            if nl < 0:
                break
            self._at_line_start = True
            pos = end
        self._write(data)

    def end_of_message(self) -> None:
        """The message ended inside its header section."""
        if not self.active:
            return
        if not self._at_line_start:
            self._write(b"\r\n")
        self._finish()

    def _finish(self) -> None:
        self._end_field()
        self.active = False
        if self.message_id is None:
            self.message_id = self._new
            self._write(b"Message-ID: " + self._new.encode("ascii", "replace") + b"\r\n")

    def _end_field(self) -> None:
        f = self._field
        if self.message_id is None and f[: len(_MSGID_NAME)].lower() == _MSGID_NAME:
            text = f[len(_MSGID_NAME) :].decode("utf-8", "replace")
            text = " ".join(text.split())
            token = _MSGID_TOKEN.search(text)
            value = token.group(0) if token else text
            value = "".join(c for c in value if c.isprintable())[:250]
            self.message_id = value or "<>"
        self._field = bytearray()


class MessageIntake:
    """
    Streams one message into a spool writer and commits it.

    Call L{feed} with the decoded content as it arrives, then L{finish}
    once; or L{abort} if the session ends first.

    @ivar queue_id: the writer's queue id.
    """

    def __init__(
        self,
        writer: IMessageWriter,
        *,
        received: bytes,
        new_message_id: str,
        max_size: int,
        check_line_ends: bool = True,
    ) -> None:
        """
        @param writer: from L{relaygw.interfaces.ISpool.begin}.
        @param received: the C{Received:} header, folded, ending in CRLF.
        @param new_message_id: the C{Message-ID} (with brackets) to add when
            the message has none.
        @param max_size: the most octets the client may send.
        @param check_line_ends: refuse bare CR or LF (off for C{BINARYMIME}).
        """
        self._writer = writer
        self.queue_id: str = writer.queue_id
        self._max_size = max_size
        self._size = 0
        self._ends: LineEndChecker | None = LineEndChecker() if check_line_ends else None
        self._failure: OSError | None = None
        self._done = False
        self._headers = _HeaderScanner(self._write, new_message_id)
        self._write(received)

    @property
    def received_octets(self) -> int:
        """Octets of content the client sent so far."""
        return self._size

    @property
    def problem(self) -> RejectReply | DeferReply | None:
        """The refusal that L{finish} will raise, once one is known."""
        if self._size > self._max_size:
            return RejectReply(replies.TOO_BIG, f"message over {self._max_size} octets")
        if self._ends is not None and self._ends.bad:
            return RejectReply(replies.BARE_LF, "bare CR or LF in message data")
        if self._failure is not None:
            return DeferReply(replies.SPOOL_FAILED, f"spool write failed: {self._failure}")
        return None

    def feed(self, data: bytes) -> None:
        """Take the next piece of message content (already unstuffed)."""
        if not data:
            return
        self._size += len(data)
        if self._ends is not None:
            self._ends.feed(data)
        if self._size > self._max_size or (self._ends is not None and self._ends.bad):
            return
        if self._headers.active:
            self._headers.feed(data)
        else:
            self._write(data)

    def finish(self, make_envelope: Callable[[str, int], Envelope]) -> Deferred[Envelope]:
        """
        End the message: add a Message-ID if still due, check, commit.

        @param make_envelope: called as C{make_envelope(message_id, size)}
            with the Message-ID the message carries and the data file's size.
        @return: fires with the envelope once it is durable (only then may
            the client get 250); fails with L{DeferReply} (452 4.3.1) when
            the spool could not commit it: then nothing is committed.  The
            commit completes even if the session ends meanwhile.
        @raise RejectReply: too big (552 5.3.4) or bare line ends (550 5.6.11).
        @raise DeferReply: a write failed earlier (452 4.3.1).  In these
            cases nothing is committed and the writer is aborted.
        """
        self._done = True
        if self._ends is not None:
            self._ends.close()
        if self.problem is None:
            self._headers.end_of_message()
        problem = self.problem
        if problem is not None:
            self._writer.abort()
            raise problem
        assert self._headers.message_id is not None
        envelope = make_envelope(self._headers.message_id, int(self._writer.size))
        committing = self._writer.commit(envelope)

        def failed(failure: Failure) -> Failure:
            if not isinstance(failure.value, OSError):
                return failure
            raise DeferReply(
                replies.SPOOL_FAILED, f"spool commit failed: {failure.value}"
            ) from failure.value

        return committing.addCallbacks(lambda _: envelope, failed)

    def abort(self) -> None:
        """
        The session ended before L{finish}, or L{finish} failed unexpectedly:
        remove what was written (a committed entry is left alone).
        """
        self._done = True
        self._writer.abort()

    def _write(self, data: bytes) -> None:
        if self._failure is not None or not data:
            return
        try:
            self._writer.write(data)
        except OSError as e:
            self._failure = e
