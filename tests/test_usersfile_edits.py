"""
L{UsersFile} while the file is being edited (issue 11): a file changed in
place is used only once it has been quiet for L{SETTLE} seconds (on an
injected wall clock), a replaced one at once, and a version that cannot be
read leaves the last good one in use, logged once with file and line.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from twisted.logger import LogEvent, formatEvent, globalLogPublisher

from relaygw.auth.usersfile import SETTLE, UserEntry, UsersFile, add_user, read_users


@pytest.fixture
def logged() -> Iterator[list[LogEvent]]:
    events: list[LogEvent] = []
    globalLogPublisher.addObserver(events.append)
    yield events
    globalLogPublisher.removeObserver(events.append)


class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


def in_place(path: Path, text: str, mtime: float) -> None:
    """Overwrite C{path} in place (same inode) and set its modification time."""
    ino = os.stat(path).st_ino
    with open(path, "r+", encoding="utf-8") as f:
        f.truncate(0)
        f.write(text)
    os.utime(path, (mtime, mtime))
    assert os.stat(path).st_ino == ino


def setup(tmp_path: Path) -> tuple[Path, UsersFile, Clock, str]:
    path = tmp_path / "users"
    for name in ("alice", "bob", "carol"):
        add_user(path, name, name + "-pw")
    clock = Clock()
    store = UsersFile(path, now=clock)
    assert set(store.users()) == {"alice", "bob", "carol"}
    return path, store, clock, path.read_text()


def test_in_place_change_waits_until_quiet(tmp_path: Path) -> None:
    """An emptied file is not taken while young; once quiet for SETTLE it is (no users)."""
    path, store, clock, _ = setup(tmp_path)
    in_place(path, "", clock.now - SETTLE / 2)
    assert set(store.users()) == {"alice", "bob", "carol"}
    clock.now += SETTLE
    assert store.users() == {}


def test_half_written_versions_never_replace_the_last_good_one(tmp_path: Path) -> None:
    """
    Every prefix of the new file (cut anywhere, a complete-looking one too),
    each young, leaves the last good version in use; the complete file is
    taken once quiet.
    """
    path, store, clock, text = setup(tmp_path)
    new = text + UserEntry("dave", read_users(path)["bob"].password_hash).to_json() + "\n"
    for cut in range(0, len(new), 7):
        clock.now += 0.01
        in_place(path, new[:cut], clock.now)
        assert set(store.users()) == {"alice", "bob", "carol"}, cut
    in_place(path, new, clock.now)
    clock.now += SETTLE
    assert set(store.users()) == {"alice", "bob", "carol", "dave"}


def test_a_broken_version_is_logged_once_and_the_last_good_stays(
    tmp_path: Path, logged: list[LogEvent]
) -> None:
    """A quiet but unreadable version: logged once (file and line), the previous users stay."""
    path, store, clock, text = setup(tmp_path)
    broken = text.replace('{"name": "bob"', '{"name": "bob",,', 1)
    in_place(path, broken, clock.now - 2 * SETTLE)
    for _ in range(5):
        assert set(store.users()) == {"alice", "bob", "carol"}
    errors = [formatEvent(e) for e in logged if e.get("log_level").name == "error"]
    assert len(errors) == 1, errors
    assert f"{path}:3: not a JSON object" in errors[0]
    assert "scrypt$" not in errors[0]
    in_place(path, text, clock.now - 2 * SETTLE + 1)  # fixed: a new version, quiet
    assert set(store.users()) == {"alice", "bob", "carol"}
    assert sum(e.get("log_level").name == "error" for e in logged) == 1
    assert any("reloaded: 3 user(s)" in formatEvent(e) for e in logged)
    assert not any("scrypt$" in formatEvent(e) for e in logged)


def test_a_replaced_file_is_taken_at_once(tmp_path: Path) -> None:
    """relaygw's own writes rename a new file into place: no wait."""
    path, store, clock, _ = setup(tmp_path)
    add_user(path, "erin", "erin-pw")
    assert "erin" in store.users()


def test_a_future_modification_time_does_not_hold_changes(tmp_path: Path) -> None:
    """A file stamped in the future (a skewed clock) is taken, not waited for forever."""
    path, store, clock, text = setup(tmp_path)
    in_place(path, text.split("\n", 2)[0] + "\n" + text.split("\n", 2)[1] + "\n",
             clock.now + 3600)
    assert set(store.users()) == {"alice"}
