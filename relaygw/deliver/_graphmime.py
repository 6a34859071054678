"""
The pure parts of the Graph route (L{relaygw.deliver.graph}): the copy of a
message submitted for some envelope recipients, Retry-After, and Graph's
JSON error text.
"""

from __future__ import annotations

import email.parser
import email.policy
import email.utils
import json
from datetime import timezone
from email.message import Message
from typing import Sequence

__all__ = ["MAX_DETAIL", "MAX_RETRY_AFTER", "RecipientMismatch", "error_detail",
           "parse_retry_after", "submission"]

#: The longest Retry-After honoured, in seconds.
MAX_RETRY_AFTER = 3600.0
#: The most of Graph's error text kept in a reply.
MAX_DETAIL = 200


class RecipientMismatch(Exception):
    """The message's headers name recipients the attempt was not given (see the module)."""

    def __init__(self, extra: Sequence[str]) -> None:
        super().__init__(", ".join(extra))
        self.extra = tuple(extra)


def _header_split(data: bytes) -> tuple[bytes, bytes]:
    """The header section (each line with its line end) and the rest from the empty line on."""
    for sep in (b"\r\n\r\n", b"\n\n"):
        at = data.find(sep)
        if at >= 0:
            cut = at + len(sep) // 2
            return data[:cut], data[cut:]
    return data, b""


def _addresses(headers: Message, name: str) -> list[str]:
    values = [str(v) for v in headers.get_all(name) or []]
    return [addr for _, addr in email.utils.getaddresses(values) if addr and "@" in addr]


def submission(data: bytes, recipients: Sequence[str]) -> bytes:
    """
    The copy of a message to submit to Graph for C{recipients} (the module
    explains the rule): the original bytes, its Bcc header replaced by the
    recipients that To and Cc do not name (none: no Bcc header).

    @param data: the message as spooled (CRLF line ends).
    @param recipients: the envelope recipients of this attempt.
    @raise RecipientMismatch: To or Cc name other addresses.
    """
    head, rest = _header_split(data)
    parsed = email.parser.BytesHeaderParser(policy=email.policy.compat32).parsebytes(head)
    visible = _addresses(parsed, "to") + _addresses(parsed, "cc")
    # The original Bcc is replaced below, so only To and Cc can widen the delivery.
    shown = {a.lower() for a in visible}
    extra = sorted(shown - {r.lower() for r in recipients})
    if extra:
        raise RecipientMismatch(extra)
    blind = list(dict.fromkeys(r for r in recipients if r.lower() not in shown))
    lines = head.splitlines(keepends=True)
    kept: list[bytes] = []
    dropping = False
    for line in lines:
        if line[:1] in (b" ", b"\t"):  # a folded field's continuation
            if not dropping:
                kept.append(line)
            continue
        dropping = line.split(b":", 1)[0].strip().lower() == b"bcc"
        if not dropping:
            kept.append(line)
    if blind:
        eol = b"\r\n" if head.endswith(b"\r\n") or not head else b"\n"
        kept.append(b"Bcc: " + (b"," + eol + b" ").join(r.encode("utf-8") for r in blind) + eol)
    return b"".join(kept) + rest


def parse_retry_after(value: str | None, now: float) -> float | None:
    """
    The seconds a Retry-After header asks to wait (RFC 9110 section 10.2.3:
    delay-seconds or an HTTP-date), at least 0 and at most
    L{MAX_RETRY_AFTER}.

    @param now: the current POSIX time, for an HTTP-date.
    @return: C{None} when C{value} is absent or neither form.
    """
    if value is None:
        return None
    text = value.strip()
    if text.isdigit():
        wait = float(text)
    else:
        try:
            when = email.utils.parsedate_to_datetime(text)
        except (TypeError, ValueError, IndexError):
            return None
        if when.tzinfo is None:  # "-0000": the time is UTC (RFC 5322 section 3.3)
            when = when.replace(tzinfo=timezone.utc)
        wait = when.timestamp() - now
    return min(max(wait, 0.0), MAX_RETRY_AFTER)


def error_detail(code: int, body: bytes) -> str:
    """C{HTTP 400 ErrorCode: message} from Graph's JSON error body, one line, cut short."""
    text = f"HTTP {code}"
    try:
        error = json.loads(body.decode("utf-8")).get("error", {})
        parts = [str(error.get("code") or ""), str(error.get("message") or "")]
    except (ValueError, AttributeError, UnicodeDecodeError):
        parts = []
    found = ": ".join(p for p in parts if p)
    if found:
        text += " " + found
    line = " ".join(text.split())
    line = "".join(c if c.isprintable() else "?" for c in line)
    return line if len(line) <= MAX_DETAIL else line[: MAX_DETAIL - 3] + "..."
