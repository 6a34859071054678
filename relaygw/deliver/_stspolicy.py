"""
MTA-STS (RFC 8461) as values: the C{_mta-sts} TXT record (section 3.1), the
policy file (section 3.2) and MX matching (section 4.1).  Pure: no I/O, no
Twisted; anything that does not parse is C{None}, which the caller treats as
"no policy" (the RFC's rule for both the record and the file).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from typing import Literal, cast

from attrs import frozen

__all__ = [
    "MAX_MAX_AGE",
    "Mode",
    "Policy",
    "allowed_exchangers",
    "parse_policy",
    "parse_txt_record",
    "select_txt_id",
]

Mode = Literal["enforce", "testing", "none"]

#: The largest C{max_age} (one year, section 3.2).
MAX_MAX_AGE = 31557600

_VERSION = "v=STSv1"
_TXT_DELIM = re.compile(r"[ \t]*;[ \t]*")
_TXT_ID = re.compile(r"id=([A-Za-z0-9]{1,32})")
_TXT_EXTENSION = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,31}=[\x21-\x3a\x3c\x3e-\x7e]+")
_POLICY_FIELD = re.compile(r"([A-Za-z0-9][A-Za-z0-9_.-]{0,31}):[ \t]*(.*?)[ \t]*")
_MAX_AGE = re.compile(r"[0-9]{1,10}")
_LABEL = re.compile(r"(?!-)[a-z0-9-]{1,63}(?<!-)")


def _normal(host: str) -> str:
    return host.rstrip(".").lower()


def _is_mx_pattern(pattern: str) -> bool:
    name = pattern[2:] if pattern.startswith("*.") else pattern
    return len(name) <= 253 and all(_LABEL.fullmatch(label) for label in name.split("."))


@frozen
class Policy:
    """
    One domain's MTA-STS policy.

    @ivar mode: C{"enforce"} (deliver only to matching exchangers, over
        verified TLS), C{"testing"} (deliver as usual, log what enforcing
        would have refused) or C{"none"} (the domain withdrew its policy:
        behave as without one).
    @ivar mx: the allowed exchanger patterns, lower case, no trailing dot;
        C{*.example.com} stands for exactly one more label.
    @ivar max_age: seconds the policy may be cached.
    @ivar id: the TXT record's id the policy was fetched under.
    """

    mode: Mode
    mx: tuple[str, ...]
    max_age: int
    id: str

    def matches(self, mx_host: str) -> bool:
        """
        Whether C{mx_host} is an allowed exchanger (section 4.1): a literal
        pattern must equal it, a wildcard pattern must match it but for its
        leftmost label (C{*.example.com} matches C{mx.example.com}, not
        C{example.com} nor C{a.mx.example.com}).  Case and a trailing dot do
        not matter.
        """
        host = _normal(mx_host)
        for pattern in self.mx:
            if pattern.startswith("*."):
                suffix = pattern[1:]
                label = host[: -len(suffix)]
                if host.endswith(suffix) and label and "." not in label:
                    return True
            elif host == pattern:
                return True
        return False


def parse_txt_record(text: str) -> str | None:
    """
    The id of one C{_mta-sts} TXT record (its strings joined), C{None}
    unless it is a valid C{v=STSv1} record with exactly one C{id} of 1 to 32
    letters and digits.  Unknown extension fields are allowed and ignored.
    """
    if not text.startswith(_VERSION):
        return None
    parts = _TXT_DELIM.split(text[len(_VERSION):])
    if len(parts) < 2 or parts[0] != "":
        return None  # v=STSv1 must be followed by a delimiter and a field
    fields = parts[1:]
    if fields[-1] == "":
        fields.pop()  # the optional trailing delimiter
    ids: list[str] = []
    for field in fields:
        found = _TXT_ID.fullmatch(field)
        if found:
            ids.append(found.group(1))
        elif field.startswith("id=") or not _TXT_EXTENSION.fullmatch(field):
            return None
    return ids[0] if len(ids) == 1 else None


def _is_sts(text: str) -> bool:
    return text.startswith(_VERSION) and text[len(_VERSION):][:1] in (" ", "\t", ";")


def select_txt_id(records: Iterable[str]) -> str | None:
    """
    The policy id of a domain from all its C{_mta-sts} TXT records
    (section 3.1): records not starting with C{v=STSv1} are discarded;
    unless exactly one remains and it parses, there is no policy (C{None}).
    """
    sts = [r for r in records if _is_sts(r)]
    return parse_txt_record(sts[0]) if len(sts) == 1 else None


def parse_policy(body: str | bytes, policy_id: str) -> Policy | None:
    """
    The policy of a C{mta-sts.txt} body (section 3.2), C{None} when it is
    not valid: C{version: STSv1}, a C{mode}, a C{max_age} (values above
    L{MAX_MAX_AGE} are capped to it: the RFC's bound on caching, not a
    reason to drop a domain's protection) and, unless the mode is C{none},
    at least one valid C{mx} pattern.  Lines end in CRLF or LF; unknown
    fields are ignored; a known field other than C{mx} given twice makes the
    file invalid.

    @param policy_id: the id of the TXT record it was fetched under.
    """
    if isinstance(body, bytes):
        try:
            body = body.decode("utf-8")
        except UnicodeDecodeError:
            return None
    single: dict[str, str] = {}
    mx: list[str] = []
    for line in body.split("\n"):
        line = line.removesuffix("\r")
        if not line.strip():
            continue
        field = _POLICY_FIELD.fullmatch(line)
        if field is None:
            return None
        key, value = field.groups()
        if key == "mx":
            pattern = _normal(value)
            if not _is_mx_pattern(pattern):
                return None
            mx.append(pattern)
        elif key in ("version", "mode", "max_age"):
            if key in single:
                return None
            single[key] = value
    mode, max_age = single.get("mode"), single.get("max_age")
    if single.get("version") != "STSv1" or max_age is None or not _MAX_AGE.fullmatch(max_age):
        return None
    if mode not in ("enforce", "testing", "none") or (mode != "none" and not mx):
        return None
    return Policy(cast(Mode, mode), tuple(dict.fromkeys(mx)), min(int(max_age), MAX_MAX_AGE), policy_id)


def allowed_exchangers(policy: Policy | None, hosts: Sequence[str]) -> tuple[str, ...]:
    """
    The exchangers (in the given order) that C{policy} lets mail go to.

    Only C{enforce} filters: with no policy, C{none} or C{testing} every
    host is returned.  In C{testing} mode the caller logs the hosts that
    C{policy.matches} refuses (and TLS that does not verify) but delivers as
    usual (RFC 8461 section 5).  An empty result under C{enforce} means no
    exchanger may be used: the delivery is deferred, never sent elsewhere.
    """
    if policy is None or policy.mode != "enforce":
        return tuple(hosts)
    return tuple(h for h in hosts if policy.matches(h))
