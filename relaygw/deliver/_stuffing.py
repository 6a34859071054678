"""
Outbound DATA transparency (RFC 5321 section 4.5.2) that no receiver can
read as an early end of data (SMTP smuggling).

The spool holds what the client sent, dot-unstuffed; C{BODY=BINARYMIME}
messages may hold bare CR, bare LF and NUL octets.  Receivers differ in what
they take for the end of data: besides C{CRLF.CRLF}, some accept C{LF.LF},
C{CR.CR} or C{LF.CRLF}, and some ignore NUL octets around the dot (SEC
Consult, "SMTP Smuggling", 2023).  So L{DataEncoder} sends every line end
as CRLF, bare CR and bare LF alike (section 2.3.8: they MUST NOT be sent),
and stuffs every line whose first octet other than NUL is a dot.  Stuffing
is transparent to an RFC receiver (it deletes the first dot of any line
starting with one), and a receiver ignoring NULs sees C{..}, never C{.}.

Data that the session checked for bare CR and LF (all but BINARYMIME) only
needs its dot lines stuffed: L{DataEncoder} with C{crlf_lines} does just
that for a chunk with no NUL, no C{CR.} and no CR at its end, and takes the
whole way otherwise, so a wrong promise costs RFC form, never an early end
(a third of the delivery process's time went to the whole way at 100 KiB).
"""

from __future__ import annotations

import re

__all__ = ["DataEncoder"]

#: A line start (after LF) whose first octet other than NUL is a dot.
_NUL_DOT = re.compile(rb"(?<=\n)(?=\x00+\.)")
#: A run of NULs that starts a line and reaches the end of the chunk: whether
#: the line needs a dot is known only from the next octet.
_NUL_TAIL = re.compile(rb"(?:^|(?<=\n))\x00+\Z")


class DataEncoder:
    """
    Encodes message data chunk by chunk for DATA: L{feed} each chunk in
    order, then L{close} gives what goes before the final C{.} line.

    At most a CR, or a run of NULs starting the last line, is held from one
    chunk to the next (a NUL run is bounded by the message size only; real
    mail has none).
    """

    def __init__(self, crlf_lines: bool = False) -> None:
        """
        @param crlf_lines: the data has CRLF line ends only (checked when
            it was received).
        """
        self._carry = b""
        self._line_start = True
        self._crlf_lines = crlf_lines

    def feed(self, chunk: bytes) -> bytes:
        """The wire form of C{chunk}, minus what the next chunk decides."""
        if (
            self._crlf_lines
            and not self._carry
            and not chunk.endswith(b"\r")
            and b"\x00" not in chunk
            and b"\r." not in chunk
        ):
            # Line ends as they are: every dot that follows an LF is stuffed.
            data = chunk.replace(b"\n.", b"\n..")
            if self._line_start and data.startswith(b"."):
                data = b"." + data
            if data:
                self._line_start = data.endswith(b"\n")
            return data
        data = self._carry + chunk if self._carry else chunk
        self._carry = b""
        if data.endswith(b"\r"):
            # A CR at the edge: the next chunk says whether it is bare.
            self._carry, data = b"\r", data[:-1]
        data = data.replace(b"\r\n", b"\n")
        if b"\r" in data:
            data = data.replace(b"\r", b"\n")
        data = data.replace(b"\n", b"\r\n")
        starts_dot = self._line_start and data.startswith(b".")
        data = data.replace(b"\n.", b"\n..")
        if b"\x00" in data:
            if not self._carry:
                tail = _NUL_TAIL.search(data)
                if tail is not None and (tail.start() or self._line_start):
                    self._carry, data = data[tail.start():], data[: tail.start()]
            data = _NUL_DOT.sub(b".", data)
            starts_dot = starts_dot or (self._line_start and data.lstrip(b"\x00")[:1] == b".")
        if starts_dot:
            data = b"." + data
        if data:
            self._line_start = data.endswith(b"\n")
        return data

    def close(self) -> bytes:
        """What ends the data before the C{.} line: the held octets and a CRLF if due."""
        held, self._carry = self._carry, b""
        if held == b"\r":
            return b"\r\n"
        if held:
            # Only NULs on the last line: not a dot line for anyone.
            return held + b"\r\n"
        return b"" if self._line_start else b"\r\n"
