"""Tests for L{relaygw.spool.ids}."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from relaygw.spool.ids import ID_LENGTH, QueueIdGenerator, is_queue_id, new_queue_id

_REPO = Path(__file__).resolve().parents[1]
_NOW = 1_767_225_600.0  # 2026-01-01T00:00:00Z


def test_form() -> None:
    """An id is a fixed number (16 to 20) of characters from [0-9A-Z]."""
    queue_id = new_queue_id(_NOW)
    assert 16 <= ID_LENGTH <= 20
    assert len(queue_id) == ID_LENGTH
    assert set(queue_id) <= set("0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZ")
    assert is_queue_id(queue_id)


def test_sorted_by_time() -> None:
    """Ids made at later times sort after earlier ones, across decades."""
    generator = QueueIdGenerator("0000000")
    times = [0.0, 1.0, 1.000001, 999_999_999.5, _NOW, _NOW + 0.25, 4_102_444_800.0]
    ids = [generator.next(t) for t in times]
    assert ids == sorted(ids)
    assert len(set(ids)) == len(ids)


def test_order_survives_a_still_clock() -> None:
    """Ids made at one instant are distinct and sort in creation order."""
    generator = QueueIdGenerator("ABC1234")
    ids = [generator.next(_NOW) for _ in range(1000)]
    assert ids == sorted(ids)
    assert len(set(ids)) == 1000


def test_order_survives_a_clock_step_back() -> None:
    """A clock stepping backwards does not make a later id sort first."""
    generator = QueueIdGenerator("ABC1234")
    first = generator.next(_NOW)
    second = generator.next(_NOW - 3600)
    assert first < second


def test_nodes_keep_processes_apart() -> None:
    """Two generators with different node tags never make the same id at one instant."""
    assert QueueIdGenerator("AAAAAAA").next(_NOW) != QueueIdGenerator("AAAAAAB").next(_NOW)


def test_node_tag_mixes_pid_and_randomness() -> None:
    """Generators for one pid (a restart that reuses it) get different node tags."""
    tags = {QueueIdGenerator.for_process(4242).node for _ in range(20)}
    assert len(tags) > 1
    assert all(tag.startswith(QueueIdGenerator.for_process(4242).node[:4]) for tag in tags)


def test_bad_node_tag() -> None:
    """A node tag of the wrong length or alphabet is refused."""
    for node in ("", "abcdefg", "ABCDEF", "ABCDEFGH", "ABC/EFG"):
        with pytest.raises(ValueError):
            QueueIdGenerator(node)


def test_out_of_range_times_still_give_ids() -> None:
    """Negative and absurdly large times give well-formed ids, still in order."""
    generator = QueueIdGenerator("0000000")
    ids = [generator.next(-5.0), generator.next(1e300), generator.next(1e300)]
    assert all(is_queue_id(i) for i in ids)
    assert ids == sorted(ids) and len(set(ids)) == 3


def test_is_queue_id_refuses_other_text() -> None:
    """Only the id form passes, so a name from a client can never escape the spool directory."""
    good = new_queue_id(_NOW)
    for text in ("", good.lower(), good + "A", good[:-1], "../" + good[3:], good[:-1] + "/", good[:-1] + "\n"):
        assert not is_queue_id(text), text


def test_unique_across_processes_and_fork() -> None:
    """Processes asking at the same instant, including a forked child, get distinct ids."""
    # One write(2) per id, no stdio buffering across the fork; the parent
    # reports how its child ended, so a lost line cannot pass unexplained.
    code = (
        "import os, sys\n"
        "from relaygw.spool.ids import new_queue_id\n"
        "now = float(sys.argv[1])\n"
        "os.write(1, (new_queue_id(now) + '\\n').encode())\n"
        "pid = os.fork()\n"
        "os.write(1, (new_queue_id(now) + '\\n').encode())\n"
        "if pid == 0:\n"
        "    os._exit(0)\n"
        "_, status = os.waitpid(pid, 0)\n"
        "sys.exit(0 if status == 0 else f'child ended with status {status}')\n"
    )
    env = dict(os.environ, PYTHONPATH=str(_REPO))
    ids: list[str] = [new_queue_id(_NOW)]
    for _ in range(3):
        out = subprocess.run(
            [sys.executable, "-c", code, repr(_NOW)],
            env=env,
            capture_output=True,
            check=True,
            timeout=60,
        ).stdout.decode()
        ids.extend(out.split())
    assert len(ids) == 10
    assert all(is_queue_id(i) for i in ids)
    assert len(set(ids)) == len(ids)
