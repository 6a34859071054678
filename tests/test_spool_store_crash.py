"""
Tests for L{relaygw.spool.store.DirectorySpool} against real failures: a
process killed with SIGKILL, a file size limit (EFBIG), a full and a read-only
file system (a private tmpfs).  Each runs the spool in a child process.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, BinaryIO, cast

from twisted.internet.task import Clock
from twisted.trial.unittest import SkipTest, SynchronousTestCase

from relaygw._types import ISpoolReactor
from relaygw.spool.envelope import Envelope
from relaygw.spool.store import DirectorySpool

_REPO = Path(__file__).resolve().parents[1]

_PRELUDE = """
import errno, json, os, queue, sys, time
from pathlib import Path
from twisted.internet.task import Clock
from relaygw.spool.envelope import Envelope, Recipient
from relaygw.spool.store import DirectorySpool

def envelope(queue_id, size, clock):
    return Envelope(id=queue_id, sender="s@example.test", recipients=(Recipient("r@example.test"),),
                    connector="Default", client_ip="127.0.0.1", received_at=clock.seconds(),
                    size=size, message_id="<m@example.test>")

def payload(queue_id, size):
    pattern = (queue_id + "\\n").encode()
    return (pattern * (size // len(pattern) + 1))[:size]

class Pump(Clock):
    # A clock that runs callFromThread calls when a script waits for a Deferred.
    def __init__(self):
        super().__init__()
        self.from_threads = queue.Queue()
    def callFromThread(self, f, *args, **kw):
        self.from_threads.put(lambda: f(*args, **kw))
    def wait(self, d):
        # The Deferred's result; its failure's exception is raised.
        while not d.called:
            self.from_threads.get(timeout=30)()
        box = []
        d.addBoth(box.append)
        if hasattr(box[0], "raiseException"):
            box[0].raiseException()
        return box[0]

clock = Pump()
clock.advance(time.time())
"""

# Ten concurrent writers on the real reactor, through the Deferred API:
# "C id" when commit() is called, "A id" when its Deferred fired.  Sizes
# cover messages that stay in the buffer and ones written through.
_COMMIT_LOOP = """
from twisted.internet import reactor

spool = DirectorySpool(Path(sys.argv[1]), reactor)
counter = iter(range(100_000))

def die(failure):
    print(failure.getTraceback(), file=sys.stderr, flush=True)
    os._exit(3)

def one():
    i = next(counter)
    writer = spool.begin()
    size = 1 + (i * 7919) % 300_000
    data = payload(writer.queue_id, size)
    for k in range(0, size, 8192):
        writer.write(data[k:k + 8192])
    print("C", writer.queue_id, flush=True)
    done = writer.commit(envelope(writer.queue_id, size, reactor))
    done.addCallback(lambda _: print("A", writer.queue_id, flush=True))
    done.addCallback(lambda _: one())
    done.addErrback(die)

for _ in range(10):
    reactor.callWhenRunning(one)
reactor.run()
"""

_HALF_WRITTEN = """
spool = DirectorySpool(Path(sys.argv[1]), clock)
writer = spool.begin()
writer.write(b"x" * 300_000)
print(writer.queue_id, flush=True)
time.sleep(60)
"""

_FILE_SIZE_LIMIT = """
import resource, signal
spool = DirectorySpool(Path(sys.argv[1]), clock)
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
result = {}

resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, 100_000))
writer = spool.begin()
try:
    for _ in range(100):
        writer.write(b"x" * 8192)
    clock.wait(writer.commit(envelope(writer.queue_id, writer.size, clock)))
except OSError as e:
    result["data"] = errno.errorcode[e.errno]
    writer.abort()

resource.setrlimit(resource.RLIMIT_FSIZE, (64, 64))
writer = spool.begin()
writer.write(b"small")
try:
    clock.wait(writer.commit(envelope(writer.queue_id, writer.size, clock)))
except OSError as e:
    result["envelope"] = errno.errorcode[e.errno]
result["files"] = sorted(os.listdir(Path(sys.argv[1]) / "queue"))
clock.wait(spool.close())
print(json.dumps(result), flush=True)
"""

_SMALL_FILESYSTEM = """
import subprocess
mount = Path(sys.argv[1])
subprocess.run(["mount", "-t", "tmpfs", "-o", "size=512k", "tmpfs", str(mount)], check=True)
spool = DirectorySpool(mount / "spool", clock)
result = {}

writer = spool.begin()
try:
    for _ in range(64):
        writer.write(b"x" * 65536)
    clock.wait(writer.commit(envelope(writer.queue_id, writer.size, clock)))
except OSError as e:
    result["full"] = errno.errorcode[e.errno]
    writer.abort()
result["after_full"] = sorted(os.listdir(mount / "spool" / "queue"))

# Fill the file system so that only the commit thread's writes fail.
filler = mount / "filler"
fd = os.open(filler, os.O_WRONLY | os.O_CREAT)
try:
    while True:
        os.write(fd, b"y" * 4096)
except OSError:
    pass
os.close(fd)
writer = spool.begin()
writer.write(b"z" * 30_000)
try:
    clock.wait(writer.commit(envelope(writer.queue_id, writer.size, clock)))
except OSError as e:
    result["commit_full"] = errno.errorcode[e.errno]
result["after_commit_full"] = sorted(os.listdir(mount / "spool" / "queue"))
filler.unlink()

writer = spool.begin()
writer.write(b"fits")
kept = envelope(writer.queue_id, 4, clock)
clock.wait(writer.commit(kept))

subprocess.run(["mount", "-o", "remount,ro", str(mount)], check=True)
writer = spool.begin()
writer.write(b"refused")
try:
    clock.wait(writer.commit(envelope(writer.queue_id, 7, clock)))
except OSError as e:
    result["commit_ro"] = errno.errorcode[e.errno]
try:
    spool.update(kept)
except OSError as e:
    result["update_ro"] = errno.errorcode[e.errno]
result["recovered"] = [e.id for e in spool.recover()]
result["kept"] = kept.id
result["loaded"] = spool.load(kept.id) == kept
clock.wait(spool.close())
print(json.dumps(result), flush=True)
"""


def _command(snippet: str, *args: str) -> list[str]:
    return [sys.executable, "-c", _PRELUDE + snippet, *args]


def _env() -> dict[str, str]:
    return dict(os.environ, PYTHONPATH=str(_REPO))


def _expected(queue_id: str, size: int) -> bytes:
    pattern = (queue_id + "\n").encode()
    return (pattern * (size // len(pattern) + 1))[:size]


class _ChildTestCase(SynchronousTestCase):
    def setUp(self) -> None:
        self.base = Path(tempfile.mkdtemp(prefix="relaygw-spool-"))
        self.addCleanup(shutil.rmtree, self.base, True)
        self.root = self.base / "spool"
        self.clock = Clock()
        self.clock.advance(time.time())

    def start(self, snippet: str, *args: str) -> subprocess.Popen[bytes]:
        child = subprocess.Popen(_command(snippet, *args), env=_env(), stdout=subprocess.PIPE)
        self.addCleanup(self._reap, child)
        return child

    @staticmethod
    def _reap(child: subprocess.Popen[bytes]) -> None:
        if child.poll() is None:
            os.kill(child.pid, signal.SIGKILL)
        child.wait(timeout=30)
        if child.stdout is not None:
            child.stdout.close()

    def run_json(self, argv: list[str]) -> dict[str, Any]:
        done = subprocess.run(argv, env=_env(), capture_output=True, timeout=60)
        self.assertEqual(done.returncode, 0, done.stderr.decode(errors="replace"))
        result: dict[str, Any] = json.loads(done.stdout)
        return result

    def assert_complete(self, spool: DirectorySpool, envelopes: list[Envelope]) -> None:
        """Every entry's data is exactly the payload the child wrote."""
        for envelope in envelopes:
            with cast(BinaryIO, spool.open_data(envelope.id)) as f:
                data = f.read()
            self.assertEqual(data, _expected(envelope.id, envelope.size), envelope.id)


class KillTests(_ChildTestCase):
    """A spool process killed with SIGKILL loses no acknowledged message and keeps no partial one."""

    def test_kill_during_commit_loop(self) -> None:
        """
        After kill -9 of a process committing from ten concurrent writers
        (twelve times over), recover() returns every entry whose commit
        Deferred fired, each with all its data; anything else it returns is
        an entry whose commit had been asked for (and was durable, its
        Deferred not yet run); the queue holds nothing else.
        """
        rng = random.Random(1047)
        acknowledged: set[str] = set()
        requested: set[str] = set()
        for _ in range(12):
            child = self.start(_COMMIT_LOOP, str(self.root))
            assert child.stdout is not None
            deadline = time.monotonic() + 30
            target = rng.randint(2, 40)
            seen = 0
            while seen < target:
                line = child.stdout.readline()
                self.assertTrue(line, "the child stopped before it was killed")
                kind, queue_id = line.decode().split()
                (acknowledged if kind == "A" else requested).add(queue_id)
                seen += kind == "A"
                self.assertLess(time.monotonic(), deadline)
            time.sleep(rng.uniform(0, 0.02))
            os.kill(child.pid, signal.SIGKILL)
            # A line the kill cut short was printed before its commit() call.
            for line in child.stdout.read().decode().split("\n")[:-1]:
                kind, queue_id = line.split()
                (acknowledged if kind == "A" else requested).add(queue_id)
            child.wait(timeout=30)
            self.assertEqual(child.returncode, -signal.SIGKILL)
            self.assertLessEqual(acknowledged, requested)

            spool = DirectorySpool(self.root, cast(ISpoolReactor, self.clock))
            recovered = spool.recover()
            ids = {e.id for e in recovered}
            self.assertEqual(sorted(acknowledged - ids), [])
            self.assertEqual(sorted(ids - requested), [])
            self.assert_complete(spool, recovered)
            names = sorted(os.listdir(self.root / "queue"))
            self.assertEqual(names, sorted(f"{i}.msg" for i in ids))
            self.assertFalse((self.root / "corrupt").exists())
            spool.close()
        # The kills must have hit commits in flight, or the test proves little.
        self.assertGreater(len(requested - acknowledged), 12)

    def test_kill_mid_message(self) -> None:
        """A message killed half-written is on disk as a temporary file, and recover() deletes it."""
        child = self.start(_HALF_WRITTEN, str(self.root))
        assert child.stdout is not None
        queue_id = child.stdout.readline().decode().strip()
        os.kill(child.pid, signal.SIGKILL)
        child.wait(timeout=30)
        self.assertEqual(os.listdir(self.root / "queue"), [queue_id + ".tmp"])
        spool = DirectorySpool(self.root, cast(ISpoolReactor, self.clock))
        self.assertEqual(spool.recover(), [])
        self.assertEqual(os.listdir(self.root / "queue"), [])


class FailingDiskTests(_ChildTestCase):
    """A spool that cannot write raises OSError and leaves nothing that looks committed."""

    def test_file_size_limit(self) -> None:
        """
        With RLIMIT_FSIZE, a write-through data write fails with EFBIG and
        so does the commit thread's write of data and envelope (the commit's Deferred
        fails); afterwards the queue is empty and recover() finds nothing.
        """
        result = self.run_json(_command(_FILE_SIZE_LIMIT, str(self.root)))
        self.assertEqual(result, {"data": "EFBIG", "envelope": "EFBIG", "files": []})
        self.assertEqual(DirectorySpool(self.root, cast(ISpoolReactor, self.clock)).recover(), [])

    def test_full_and_read_only_filesystem(self) -> None:
        """
        On a full tmpfs a write fails with ENOSPC and abort frees the space,
        and a commit whose files the commit thread cannot write fails with
        ENOSPC and leaves nothing; remounted read-only, a commit and update()
        fail with EROFS while committed entries stay readable and
        recoverable.
        """
        if os.geteuid() != 0 or shutil.which("unshare") is None:
            raise SkipTest("needs root and unshare(1) to mount a private tmpfs")
        probe = subprocess.run(["unshare", "-m", "true"], capture_output=True, timeout=30)
        if probe.returncode != 0:
            raise SkipTest("no mount namespaces here: " + probe.stderr.decode(errors="replace"))
        mount = self.base / "mnt"
        mount.mkdir()
        # The tmpfs lives in the child's own mount namespace, so it vanishes with the child.
        result = self.run_json(["unshare", "-m", *_command(_SMALL_FILESYSTEM, str(mount))])
        self.assertEqual(result.pop("recovered"), [result["kept"]])
        result.pop("kept")
        self.assertEqual(
            result,
            {
                "full": "ENOSPC",
                "after_full": [],
                "commit_full": "ENOSPC",
                "after_commit_full": [],
                "commit_ro": "EROFS",
                "update_ro": "EROFS",
                "loaded": True,
            },
        )
