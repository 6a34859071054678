"""
L{UsersFile} while the file is being edited (issue 11): a file changed in
place is used only once it has looked the same for L{SETTLE} seconds (on an
injected clock, whatever the file's own times say), a replaced one at once;
a login that finds such a change pending waits for it, once; a version that
cannot be read leaves the last good one in use, logged once with file and
line.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from twisted.cred.error import UnauthorizedLogin
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.logger import LogEvent, formatEvent, globalLogPublisher
from twisted.python.failure import Failure

from relaygw.auth.usersfile import SETTLE, UserEntry, UsersFile, add_user, read_users


@pytest.fixture
def logged() -> Iterator[list[LogEvent]]:
    events: list[LogEvent] = []
    globalLogPublisher.addObserver(events.append)
    yield events
    globalLogPublisher.removeObserver(events.append)


def in_place(path: Path, text: str, mtime: float | None = None) -> None:
    """Overwrite C{path} in place (same inode), optionally stamping its modification time."""
    ino = os.stat(path).st_ino
    with open(path, "r+", encoding="utf-8") as f:
        f.truncate(0)
        f.write(text)
    if mtime is not None:
        os.utime(path, (mtime, mtime))
    assert os.stat(path).st_ino == ino


def setup(tmp_path: Path) -> tuple[Path, UsersFile, Clock, str]:
    path = tmp_path / "users"
    for name in ("alice", "bob", "carol"):
        add_user(path, name, name + "-pw")
    clock = Clock()
    store = UsersFile(path, clock=clock)
    assert set(store.users()) == {"alice", "bob", "carol"}
    return path, store, clock, path.read_text()


def with_dave(path: Path, text: str) -> str:
    dave = UserEntry("dave", read_users(path)["bob"].password_hash, ("dave@example.test",))
    return text + dave.to_json() + "\n"


def outcome(d: Deferred[Any]) -> Any:
    """What a fired Deferred gave: its result, or the exception type of its failure."""
    got: list[object] = []
    d.addBoth(got.append)
    assert got, "not fired"
    return got[0].type if isinstance(got[0], Failure) else got[0]


def test_in_place_change_waits_until_settled(tmp_path: Path) -> None:
    """An emptied file is not taken until seen unchanged for SETTLE; then it is (no users)."""
    path, store, clock, _ = setup(tmp_path)
    in_place(path, "")
    assert set(store.users()) == {"alice", "bob", "carol"}
    clock.advance(SETTLE / 2)
    assert set(store.users()) == {"alice", "bob", "carol"}
    clock.advance(SETTLE / 2)
    assert store.users() == {}


def test_an_emptied_file_with_its_old_modification_time_is_not_taken(tmp_path: Path) -> None:
    """
    ext4 shows a file being truncated with size 0 and its old modification
    time (seen on this machine: thousands of times in 15 s of truncates), so
    an editor's truncate of a file quiet for long looks like an old, empty
    file: not taken until seen unchanged for SETTLE.
    """
    path, store, clock, text = setup(tmp_path)
    old = os.stat(path).st_mtime - 3600
    os.utime(path, (old, old))
    clock.advance(3600)
    assert set(store.users()) == {"alice", "bob", "carol"}  # the same version, re-stamped
    in_place(path, "", mtime=old)
    assert set(store.users()) == {"alice", "bob", "carol"}
    in_place(path, text)  # the writer goes on
    clock.advance(SETTLE)
    assert set(store.users()) == {"alice", "bob", "carol"}


def test_half_written_versions_never_replace_the_last_good_one(tmp_path: Path) -> None:
    """
    Every prefix of the new file (cut anywhere, a complete-looking one too)
    leaves the last good version in use; the complete file is taken once
    settled.
    """
    path, store, clock, text = setup(tmp_path)
    new = with_dave(path, text)
    for cut in range(0, len(new), 7):
        clock.advance(0.01)
        in_place(path, new[:cut])
        assert set(store.users()) == {"alice", "bob", "carol"}, cut
    in_place(path, new)
    assert set(store.users()) == {"alice", "bob", "carol"}
    clock.advance(SETTLE)
    assert set(store.users()) == {"alice", "bob", "carol", "dave"}


def test_a_login_right_after_an_edit_waits_for_it(tmp_path: Path) -> None:
    """
    A login that finds a change in place pending waits until it settles
    and is answered from the new version: a user just added logs in, a
    removed one does not, and no login is answered from the old version.
    """
    path, store, clock, text = setup(tmp_path)
    in_place(path, with_dave(path, text).replace(text.splitlines(True)[2], ""))  # bob removed
    dave = store.authenticate("dave", "bob-pw")
    bob = store.authenticate("bob", "bob-pw")
    address = store.has_address("dave@example.test")
    assert not dave.called and not bob.called and not address.called
    clock.advance(SETTLE)
    assert outcome(dave).name == "dave"
    assert outcome(bob) is UnauthorizedLogin
    assert outcome(address) is True
    # Settled now: the next login is answered at once.
    assert outcome(store.authenticate("alice", "alice-pw")).name == "alice"


def test_a_file_still_changing_after_the_wait_leaves_the_last_good_one(tmp_path: Path) -> None:
    """One wait only: a file changed again meanwhile is not waited for again."""
    path, store, clock, text = setup(tmp_path)
    new = with_dave(path, text)
    in_place(path, new[: len(text) + 10])
    alice, dave = store.authenticate("alice", "alice-pw"), store.authenticate("dave", "bob-pw")
    clock.advance(SETTLE / 2)
    in_place(path, new)  # the rest, half a settle time later
    clock.advance(SETTLE / 2)
    assert outcome(alice).name == "alice"
    assert outcome(dave) is UnauthorizedLogin  # the last good version had no dave
    clock.advance(SETTLE)
    assert "dave" in store.users()


def test_a_broken_version_is_logged_once_and_the_last_good_stays(
    tmp_path: Path, logged: list[LogEvent]
) -> None:
    """A settled but unreadable version: logged once (file and line), the previous users stay."""
    path, store, clock, text = setup(tmp_path)
    broken = text.replace('{"name": "bob"', '{"name": "bob",,', 1)
    in_place(path, broken)
    store.users()
    clock.advance(SETTLE)
    for _ in range(5):
        assert set(store.users()) == {"alice", "bob", "carol"}
    errors = [formatEvent(e) for e in logged if e.get("log_level").name == "error"]
    assert len(errors) == 1, errors
    assert f"{path}:3: not a JSON object" in errors[0]
    assert "scrypt$" not in errors[0]
    in_place(path, text)  # fixed: a new version
    store.users()
    clock.advance(SETTLE)
    assert set(store.users()) == {"alice", "bob", "carol"}
    assert sum(e.get("log_level").name == "error" for e in logged) == 1
    assert any("reloaded: 3 user(s)" in formatEvent(e) for e in logged)
    assert not any("scrypt$" in formatEvent(e) for e in logged)


def test_a_replaced_file_is_taken_at_once(tmp_path: Path) -> None:
    """relaygw's own writes rename a new file into place: no wait, for a login either."""
    path, store, clock, _ = setup(tmp_path)
    add_user(path, "erin", "erin-pw")
    assert outcome(store.authenticate("erin", "erin-pw")).name == "erin"
