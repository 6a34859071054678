"""
Benchmark: the cost of choosing a receive connector as the number of remote
ranges grows (issue 2: it must grow at most logarithmically).

Run from the source tree:  python bench/bench_selector.py

For 10, 1,000 and 100,000 random ranges (no two of one size overlap, so the
configuration is valid) spread over a few connectors on 0.0.0.0:25 and
[::]:25, it times lookups of random clients and prints the cost per lookup,
its ratio to the 10-range case and the log2(n) ratio beside it, and the
deterministic tree work per lookup (nodes visited plus entries read).  Exits
1 if the growth is clearly super-logarithmic (ratio above 4x the log2 ratio).
The time ratio also carries memory effects: a 100,000-range tree no longer
fits the CPU caches, so each node visited costs more than in a small one.
"""

from __future__ import annotations

import ipaddress
import math
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from relaygw.config._model import Binding, Connector, IPRange  # noqa: E402
from relaygw.connectors.ranges import IntervalTree, address_key  # noqa: E402
from relaygw.connectors.selector import ConnectorSelector, find_conflicts  # noqa: E402

SIZES = (10, 1_000, 100_000)
CONNECTORS = 4
LOOKUPS = 100_000
BATCHES = 5
TIME_LIMIT = 15.0  # seconds of lookups per size, at most
ALLOWED_FACTOR = 4.0
V4_PREFIXES = (16, 20, 24, 28, 32)
V6_PREFIXES = (48, 56, 64)


def _random_ranges(n: int, rng: random.Random) -> list[IPRange]:
    """
    n ranges, about 90% IPv4 and 10% IPv6 (inside 2001:db8::/32): aligned
    CIDR blocks, distinct per prefix length, so same-size ranges never overlap.
    """
    ranges: list[IPRange] = []
    v4_count = n * 9 // 10
    for version, bits, base, prefixes, total in (
        (4, 32, 0, V4_PREFIXES, v4_count),
        (6, 128, 0x2001_0DB8 << 96, V6_PREFIXES, n - v4_count),
    ):
        for prefix in prefixes:
            host_bits = bits - prefix
            free_bits = prefix - (32 if version == 6 else 0)
            wanted = min(total // len(prefixes) + 1, (1 << free_bits) // 2)
            blocks: set[int] = set()
            for _ in range(wanted * 4):
                if len(blocks) == wanted:
                    break
                blocks.add(rng.randrange(1 << free_bits))
            for block in blocks:
                first = base + (block << host_bits)
                last = first + (1 << host_bits) - 1
                ranges.append(IPRange(version, first, last, f"v{version}/{prefix}#{block}"))
    rng.shuffle(ranges)
    return ranges[:n]


def _connectors(n: int, rng: random.Random) -> list[Connector]:
    ranges = _random_ranges(n, rng)
    bindings = (Binding("0.0.0.0", 25), Binding("::", 25))
    return [
        Connector(
            f"connector {i}",
            bindings,
            tuple(ranges[i::CONNECTORS]),
            "mail.example.test",
        )
        for i in range(CONNECTORS)
    ]


def _clients(connectors: list[Connector], rng: random.Random) -> list[str]:
    """Half inside some range (hits), half uniformly random IPv4 (mostly misses)."""
    every = [r for c in connectors for r in c.remote_ranges]
    clients = []
    for i in range(LOOKUPS):
        if i % 2:
            clients.append(str(ipaddress.IPv4Address(rng.randrange(1 << 32))))
        else:
            r = rng.choice(every)
            address = rng.randint(r.first, r.last)
            if r.version == 4:
                clients.append(str(ipaddress.IPv4Address(address)))
            else:
                clients.append(str(ipaddress.IPv6Address(address)))
    return clients


def _ns_per_lookup(selector: ConnectorSelector, clients: list[str]) -> tuple[float, int]:
    """The best batch's nanoseconds per lookup, and the lookups that found a connector."""
    batch = len(clients) // BATCHES
    best = math.inf
    found = 0
    deadline = time.perf_counter() + TIME_LIMIT
    for start in range(0, batch * BATCHES, batch):
        chunk = clients[start:start + batch]
        began = time.perf_counter()
        for client in chunk:
            if selector.select("127.0.0.1", 25, client) is not None:
                found += 1
        best = min(best, (time.perf_counter() - began) / len(chunk) * 1e9)
        if time.perf_counter() > deadline:
            break
    return best, found


def _steps_per_lookup(connectors: list[Connector], clients: list[str]) -> float:
    """
    Deterministic work per lookup: tree nodes visited plus entries read, in
    one interval tree per IP version over all the ranges (the selector's
    trees for one binding).
    """
    trees = {
        version: IntervalTree(
            (r.first, r.last, None)
            for c in connectors
            for r in c.remote_ranges
            if r.version == version
        )
        for version in (4, 6)
    }
    total = 0
    for client in clients:
        version, value = address_key(client)
        total += trees[version].stab_counted(value)[1]
    return total / len(clients)


def main() -> int:
    rng = random.Random(20240601)
    print(f"{'ranges':>8} {'build s':>8} {'check s':>8} {'ns/lookup':>10} "
          f"{'hits':>7} {'ratio':>6} {'log2 ratio':>10} {'steps':>6}")
    baseline = 0.0
    failed = False
    for n in SIZES:
        connectors = _connectors(n, rng)
        began = time.perf_counter()
        selector = ConnectorSelector(connectors)
        built = time.perf_counter() - began
        began = time.perf_counter()
        conflicts = find_conflicts(connectors)
        checked = time.perf_counter() - began
        if conflicts:
            print(f"generator bug: {len(conflicts)} conflicts, e.g. {conflicts[0].problem}")
            return 2
        clients = _clients(connectors, rng)
        ns, hits = _ns_per_lookup(selector, clients)
        steps = _steps_per_lookup(connectors, clients[:10_000])
        baseline = baseline or ns
        ratio = ns / baseline
        log_ratio = math.log2(n) / math.log2(SIZES[0])
        verdict = "" if ratio <= ALLOWED_FACTOR * log_ratio else "  super-logarithmic!"
        failed = failed or bool(verdict)
        print(f"{n:>8} {built:>8.3f} {checked:>8.3f} {ns:>10.0f} {hits:>7} "
              f"{ratio:>6.2f} {log_ratio:>10.2f} {steps:>6.1f}{verdict}")
    print("FAIL: lookup cost grows faster than logarithmically" if failed
          else f"OK: growth within {ALLOWED_FACTOR:g}x the log2(n) ratio")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
