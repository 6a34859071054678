"""
Outbound DATA encoding (relaygw.deliver._stuffing): whatever the spool holds
(BINARYMIME data may hold bare CR, bare LF and NUL), the wire form ends only
at the final dot for a strict receiver and for the lenient ones of the SMTP
smuggling research, and a strict receiver gets the content back.
"""

from __future__ import annotations

import re

from hypothesis import example, given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from relaygw.deliver._stuffing import DataEncoder

#: Every end of data some receiver accepts: any line end, NULs around the dot.
LENIENT_END = re.compile(rb"(?:\r\n|\r|\n)\x00*\.\x00*(?:\r\n|\r|\n)")
_BARE = re.compile(rb"\r(?!\n)|(?<!\r)\n")


def encode(chunks: list[bytes], crlf_lines: bool = False) -> bytes:
    """The DATA wire bytes for C{chunks}, final dot line included."""
    encoder = DataEncoder(crlf_lines)
    return b"".join(encoder.feed(c) for c in chunks) + encoder.close() + b".\r\n"


def strict_decode(wire: bytes) -> bytes:
    """What an RFC 5321 receiver stores: up to CRLF.CRLF, first dots removed."""
    stream = b"\r\n" + wire
    body = stream[2 : stream.index(b"\r\n.\r\n") + 2]
    lines = body[:-2].split(b"\r\n") if body else []
    return b"".join((line[1:] if line.startswith(b".") else line) + b"\r\n" for line in lines)


def normalized(data: bytes) -> bytes:
    """C{data} with every line end CRLF and a last line end added."""
    text = data.replace(b"\r\n", b"\n").replace(b"\r", b"\n").replace(b"\n", b"\r\n")
    return text if not text or text.endswith(b"\r\n") else text + b"\r\n"


def split(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts})
    return [data[a:b] for a, b in zip([0, *points], [*points, len(data)])]


_OCTETS = st.lists(st.sampled_from([b"\r", b"\n", b"\x00", b".", b"a", b"\r\n", b"M"]),
                   max_size=40).map(b"".join)


class DataEncoderTests(SynchronousTestCase):
    def check(self, data: bytes, cuts: list[int]) -> None:
        wire = encode(split(data, cuts))
        self.assertIsNone(_BARE.search(wire), wire)
        first = LENIENT_END.search(b"\r\n" + wire)
        self.assertIsNotNone(first)
        assert first is not None
        self.assertEqual(first.end(), len(wire) + 2, (data, wire))
        self.assertEqual(strict_decode(wire), normalized(data))

    def test_examples(self) -> None:
        """The smuggling sequences of the research, whole and cut at every octet."""
        for variant in [b"\n.\n", b"\r.\r", b"\r\n.\n", b"\n.\r\n", b"\r\n.\r", b"\r.\r\n",
                        b"\r\n\x00.\r\n", b"\r\n.\x00\r\n", b"\r\n\x00.\x00\r\n",
                        b"\r\n.\r\r\n", b"\r\n\x00\x00.\n", b".\r\n", b"\x00.\r\n"]:
            data = b"x" + variant + b"MAIL FROM:<a@b>\r\n"
            for cut in range(len(data) + 1):
                self.check(data, [cut])

    def test_plain_stuffing_unchanged(self) -> None:
        """Ordinary CRLF mail: only lines starting with a dot change, as before."""
        self.assertEqual(encode([b".a\r\nb\r\n.\r\n"]), b"..a\r\nb\r\n..\r\n.\r\n")
        self.assertEqual(encode([b"a\r\n", b".b"]), b"a\r\n..b\r\n.\r\n")

    def test_nul_lines(self) -> None:
        """A line of NULs then a dot gets a dot; a line of only NULs does not."""
        self.assertEqual(encode([b"\x00.\r\n\x00\r\n"]), b".\x00.\r\n\x00\r\n.\r\n")
        self.assertEqual(encode([b"a\r\n\x00", b"\x00", b".b"]), b"a\r\n.\x00\x00.b\r\n.\r\n")
        self.assertEqual(encode([b"a\r\n\x00"]), b"a\r\n\x00\r\n.\r\n")

    @settings(max_examples=400, deadline=None, derandomize=True)
    @given(_OCTETS, st.lists(st.integers(min_value=0, max_value=64), max_size=6))
    @example(b"\r", [0])
    @example(b"\x00\x00.", [1, 2])
    def test_property(self, data: bytes, cuts: list[int]) -> None:
        """Random line ends, NULs and dots, cut anywhere: one end, same content."""
        self.check(data, cuts)

    @settings(max_examples=300, deadline=None, derandomize=True)
    @given(st.lists(st.sampled_from([b".", b"a", b"\r\n", b"\x00", b"M", b".."]), max_size=40)
           .map(b"".join), st.lists(st.integers(min_value=0, max_value=64), max_size=6))
    @example(b"a\r\n.b\r\n", [3])
    @example(b"a\r\n.b\r\n", [2])
    def test_crlf_lines_same_wire(self, data: bytes, cuts: list[int]) -> None:
        """Data checked at receipt (CRLF only): the short way sends what the whole way does."""
        chunks = split(data, cuts)
        self.assertEqual(encode(chunks, crlf_lines=True), encode(chunks))

    @settings(max_examples=300, deadline=None, derandomize=True)
    @given(_OCTETS, st.lists(st.integers(min_value=0, max_value=64), max_size=6))
    @example(b"x\r.\rMAIL", [0])
    @example(b"x\r", [2])
    def test_crlf_lines_broken_promise_never_ends_early(self, data: bytes, cuts: list[int]) -> None:
        """Bare CR/LF despite the promise: the form may suffer, the end of data never comes early."""
        wire = encode(split(data, cuts), crlf_lines=True)
        first = LENIENT_END.search(b"\r\n" + wire)
        assert first is not None
        self.assertEqual(first.end(), len(wire) + 2, (data, wire))
