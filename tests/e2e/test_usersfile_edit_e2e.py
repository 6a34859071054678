"""
The users file edited while logins run (issue 11): the real C{twistd -n
relaygw} on its users file while client threads keep logging in with AUTH
PLAIN, one connection per login.  The file is rewritten atomically (the
real C{relaygw user add} and C{delete}, and L{add_user}), then edited in
place the way an administrator's editor may save it: truncated, then
written in two halves with a pause between them (an empty file, a
half-written JSON line, a last line cut after its closing brace, all
visible for a moment).

Expected: a user present in every complete version ("steady") never gets
anything but 235; a new user is taken once its complete line is there, a
removed one is refused; no traceback and no password or hash in the
gateway's output; a bad version is logged with the file and line.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import pytest

from relaygw.auth.usersfile import UserEntry, add_user, hash_password
from tests.e2e.conftest import Launch, gateway_toml
from tests.servers.ports import free_ports, wait_until
from tests.servers.relaygw import RelaygwProcess
from tests.servers.smtp_clients import LineClient, files_containing, plain_blob, secret_forms

pytestmark = pytest.mark.e2e

RELAYGW = Path(sys.executable).parent / "relaygw"
#: Users present in every complete version of the file, spread over it so
#: that every cut leaves some of them after the cut.
STEADY = {f"steady{i}": f"Steady-Pw-{i}-Kq3" for i in range(4)}
NEWBIE = ("newbie", "Newbie-Pw-Zr5")
LEAVER = ("leaver", "Leaver-Pw-Wm2")
EDITED = ("edited", "Edited-Pw-Hx9")
#: Logins per client thread, at most (the loop also stops when the edits are done).
MAX_LOGINS = 400


def config(port: int, admin: int) -> str:
    return gateway_toml(admin, workers=1) + f"""
[users]
file = "users"

[[connectors]]
name = "Devices"
bindings = ["127.0.0.1:{port}"]
remote_ranges = ["127.0.0.0/8"]
tls = "off"
allow_plaintext_auth = true
permissions.anonymous = []
permissions.authenticated = ["submit"]
auth_throttle = {{ max_failures = 3, window = "10m", delay = "0s", max_delay = "0s" }}
"""


def login(port: int, source: str, user: str, password: str) -> int:
    """One AUTH PLAIN on a fresh connection; its reply code."""
    with LineClient(port, source=source, timeout=30) as client:
        assert client.reply().code == 220
        assert client.command("EHLO edit.e2e.test").code == 250
        code = client.command(f"AUTH PLAIN {plain_blob(user, password)}").code
        client.send(b"QUIT\r\n")
        return code


class Logins:
    """Client threads logging in as the steady users until L{stop}; every reply kept."""

    def __init__(self, port: int, threads: int = 3) -> None:
        self.port = port
        self.replies: list[tuple[str, int, float]] = []
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._threads = [threading.Thread(target=self._run, args=(i,), daemon=True)
                         for i in range(threads)]  # fmt: skip

    def _run(self, index: int) -> None:
        names = sorted(STEADY)
        for n in range(MAX_LOGINS):
            if self._stop.is_set():
                return
            user = names[(index + n) % len(names)]
            # Each login from its own source: a failure would also throttle
            # the address, and one bad answer must not hide behind another.
            code = login(self.port, f"127.0.{90 + index}.{n % 250 + 1}", user, STEADY[user])
            with self._lock:
                self.replies.append((user, code, time.monotonic()))

    def __enter__(self) -> Logins:
        for t in self._threads:
            t.start()
        return self

    def count(self) -> int:
        with self._lock:
            return len(self.replies)

    def check(self, step: str) -> None:
        """
        Fail at once, naming C{step}, when a steady login got other than 235:
        one such failure per user is enough to throttle it (every later login
        is then refused unasked, never reaching the file).
        """
        with self._lock:
            bad = [(user, code) for user, code, _ in self.replies if code != 235]
            total = len(self.replies)
        assert not bad, f"by {step}: {len(bad)} of {total} steady logins failed: {bad[:10]}"

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(timeout=60)


def lines(entries: list[UserEntry]) -> str:
    return "# relaygw users file, edited by hand\n" + "".join(e.to_json() + "\n" for e in entries)


def edit_in_place(path: Path, text: str, cut: int, pause: float = 0.4) -> None:
    """
    Rewrite C{path} as an editor saving in place does: truncate, write the
    first C{cut} characters, pause, write the rest (same inode, not atomic),
    then fsync.  Each step is visible to the gateway as soon as it is
    written; no fsync in between, as no editor does one mid-file: on a busy
    disk an fsync can take longer than the gateway's 1 s settle time, and
    the writer would then be the one pausing past it (the promise covers a
    writer that finishes within it).
    """
    with open(path, "r+", encoding="utf-8") as f:
        f.truncate(0)
        time.sleep(pause / 2)  # the empty file, for a moment
        f.write(text[:cut])
        f.flush()
        time.sleep(pause)  # the first half, for a moment
        f.write(text[cut:])
        f.flush()
        os.fsync(f.fileno())


def relaygw_cli(*args: str, stdin: str = "") -> subprocess.CompletedProcess[str]:
    done = subprocess.run([str(RELAYGW), *args], input=stdin, capture_output=True, text=True,
                          timeout=60, check=False)  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    return done


def reloads(proc: RelaygwProcess) -> int:
    """How many times the gateway has logged taking a new version of the users file."""
    return len(re.findall(r"users file \S+ reloaded: \d+ user", proc.output()))


class Versions:
    """
    Waits for the gateway to take each new version (it re-reads the file
    on the next use, and the steady logins keep using it), then checks one
    login: polling with logins would count throttle failures.
    """

    def __init__(self, proc: RelaygwProcess, port: int) -> None:
        self.proc, self.port = proc, port
        self.seen = reloads(proc)
        self.sources = iter(range(1, 250))

    def taken(self, *expect: tuple[tuple[str, str], int]) -> None:
        wait_until(lambda: reloads(self.proc) > self.seen, 20, 0.05, what="a users file reload")
        self.seen = reloads(self.proc)
        for (user, password), code in expect:
            assert login(self.port, f"127.0.99.{next(self.sources)}", user, password) == code, user


def test_users_file_edited_while_logins_run(launch: Launch, workdir: Path) -> None:
    port, admin = free_ports(2)
    users = workdir / "users"
    steady = [UserEntry(name, hash_password(pw)) for name, pw in sorted(STEADY.items())]
    leaver = UserEntry(LEAVER[0], hash_password(LEAVER[1]))
    edited = UserEntry(EDITED[0], hash_password(EDITED[1]))
    # steady0, leaver, steady1, steady2, steady3 (atomically, as relaygw writes it)
    for entry, pw in [(steady[0], STEADY["steady0"]), (leaver, LEAVER[1]),
                      *((e, STEADY[e.name]) for e in steady[1:])]:  # fmt: skip
        add_user(users, entry.name, pw)
    proc = launch(workdir, config(port, admin), [port])
    cfg = str(workdir / "relaygw.toml")
    for name, pw in STEADY.items():
        assert login(port, "127.0.98.1", name, pw) == 235
    edits = Counter[str]()
    versions = Versions(proc, port)
    with Logins(port) as running:
        # (a) atomic rewrites: the real commands, then the library.
        relaygw_cli("user", "add", "-c", cfg, NEWBIE[0], stdin=NEWBIE[1] + "\n")
        versions.taken((NEWBIE, 235))
        relaygw_cli("user", "delete", "-c", cfg, LEAVER[0])
        versions.taken((LEAVER, 535))
        add_user(users, EDITED[0], EDITED[1])
        versions.taken((EDITED, 235))
        edits["atomic"] += 3
        # (b) in place, not atomic: cut inside a JSON line, right after a
        # line's closing brace (no newline yet), and at a line's start.
        current = [steady[0], steady[1], edited, steady[2], steady[3]]
        for n, cut_at in enumerate((_inside_line, _after_brace, _line_start, _inside_line,
                                    _after_brace)):  # fmt: skip
            text = lines(current)
            edit_in_place(users, text, cut_at(text))
            edits["in place"] += 1
            # The complete file is taken: edited is there, newbie is not.
            versions.taken((EDITED, 235), *([(NEWBIE, 535)] if n == 0 else []))
            running.check(f"in-place edit {n + 1} ({cut_at.__name__})")
        # One more in-place edit that removes "edited": picked up once complete.
        text = lines([steady[0], steady[1], steady[2], steady[3]])
        edit_in_place(users, text, _inside_line(text))
        edits["in place"] += 1
        versions.taken((EDITED, 535))
        # (c) a version with a broken line that stays (a typo, saved): the
        # last good version stays in use, the error is logged once; fixing
        # the line (adding "edited" back) is picked up.
        broken = lines([steady[0], steady[1], steady[2], steady[3]]).replace(
            '{"name": "steady2"', '{"name": "steady2",, ', 1)
        edit_in_place(users, broken, _inside_line(broken))
        edits["in place, broken"] += 1
        running.check("the edit removing edited")

        def broken_logged() -> bool:
            running.check("the broken version")  # else no login reads the file
            return "users file not reloaded" in proc.output()

        wait_until(broken_logged, 20, 0.1, what="the broken version to be logged")
        time.sleep(1.0)  # logins go on against the broken file
        text = lines([steady[0], steady[1], edited, steady[2], steady[3]])
        edit_in_place(users, text, _after_brace(text))
        edits["in place"] += 1
        versions.taken((EDITED, 235))
        wait_until(lambda: running.count() >= 30, 30, 0.1, what="30 steady logins")
    replies = Counter(code for _, code, _ in running.replies)
    print(f"users file edits {dict(edits)}; steady logins {dict(replies)}")
    running.check("the end")
    output = proc.output()
    assert "Traceback" not in output, output[-3000:]
    # The broken version is logged once, with the file and the line.
    logged = re.findall(r"users file not reloaded.*", output)
    assert len(logged) == 1, logged
    assert f"{users}:4: not a JSON object" in logged[0], logged
    secrets = {pw for pw in [*STEADY.values(), NEWBIE[1], LEAVER[1], EDITED[1]]}
    needles = sorted({form for pw in secrets for form in secret_forms("x", pw)}
                     | {e.password_hash.encode() for e in [*steady, leaver, edited]}
                     | {e.password_hash.split("$")[-1].encode() for e in steady})
    leaks = files_containing([workdir], needles, exclude=[users])
    assert not leaks, leaks


def _inside_line(text: str) -> int:
    """Somewhere inside the middle line's JSON object."""
    starts = [m.start() for m in re.finditer(r"^\{", text, re.M)]
    middle = starts[len(starts) // 2]
    return middle + 25


def _after_brace(text: str) -> int:
    """Right after the closing brace of the middle line (its newline not yet written)."""
    ends = [m.start() + 1 for m in re.finditer(r"\}$", text, re.M)]
    return ends[len(ends) // 2 - 1]


def _line_start(text: str) -> int:
    """At the start of the middle line: the first half is a complete, shorter file."""
    starts = [m.start() for m in re.finditer(r"^\{", text, re.M)]
    return starts[len(starts) // 2]

