"""
A private Postfix instance on loopback (Debian packages C{postfix} and
C{libsasl2-modules}), as measured in the project notes: its own C{main.cf}
and C{master.cf} in a directory of ours, C{master -c DIR/etc -d} in its own
session, stopped by its PID.  The system Postfix is never used or touched.

It accepts mail from 127.0.0.0/8 on C{127.0.0.1:listen_port} and relays all
of it to C{[relay_host]:relay_port}.
"""

from __future__ import annotations

import os
import pwd
import shutil
import signal
import subprocess
import time
from pathlib import Path

from tests.servers.ports import wait_for_ports
from tests.servers.procs import pid_alive
from tests.servers.sink import postfix_can_enter

_MASTER = "/usr/lib/postfix/sbin/master"

_MASTER_CF = """\
127.0.0.1:{port} inet n - n - {smtpd_limit} smtpd
pickup    unix n - n 60 1 pickup
cleanup   unix n - n - 0 cleanup
qmgr      unix n - n 300 1 qmgr
tlsmgr    unix - - n 1000? 1 tlsmgr
rewrite   unix - - n - - trivial-rewrite
bounce    unix - - n - 0 bounce
defer     unix - - n - 0 bounce
trace     unix - - n - 0 bounce
verify    unix - - n - 1 verify
flush     unix n - n 1000? 0 flush
proxymap  unix - - n - - proxymap
smtp      unix - - n - - smtp
relay     unix - - n - - smtp
showq     unix n - n - - showq
error     unix - - n - - error
retry     unix - - n - - error
discard   unix - - n - - discard
anvil     unix - - n - 1 anvil
scache    unix - - n - 1 scache
postlog   unix-dgram n - n - 1 postlogd
"""


def postfix_available() -> str | None:
    """C{None} when a private Postfix can run here, else the reason it cannot."""
    if not os.path.exists(_MASTER) or shutil.which("postfix", path="/usr/sbin:/usr/bin") is None:
        return "Postfix is not installed (Debian package postfix; scripts/test installs it)"
    if os.geteuid() != 0:
        return "a private Postfix instance needs root (postfix check sets queue ownership)"
    try:
        pwd.getpwnam("postfix")
    except KeyError:
        return "there is no postfix user"
    return None


class PostfixInstance:
    """
    A private Postfix: C{smtpd} on C{127.0.0.1:listen_port}, everything relayed
    to C{[relay_host]:relay_port}.

    @param directory: a directory of ours (made and chmod 755; its parents must
        be searchable by user C{postfix}).
    @param tls: C{smtp_tls_security_level} towards the relay:
        C{"none"}, C{"may"}, C{"encrypt"} or C{"secure"}.
    @param sasl_user: with C{sasl_password}, SMTP AUTH towards the relay.
    @param ca_file: C{smtp_tls_CAfile} (for C{tls="secure"}).
    @param smtpd_limit: the smtpd process limit (Postfix's default is 100).
    """

    def __init__(
        self,
        directory: Path,
        listen_port: int,
        relay_port: int,
        *,
        relay_host: str = "127.0.0.1",
        tls: str = "none",
        sasl_user: str = "",
        sasl_password: str = "",
        ca_file: Path | None = None,
        tls_match: str = "localhost",
        smtpd_limit: int = 100,
    ) -> None:
        self.dir = Path(directory).absolute()
        self.listen_port = listen_port
        self.relay_port = relay_port
        self.relay_host = relay_host
        self.tls = tls
        self.sasl_user = sasl_user
        self.sasl_password = sasl_password
        self.ca_file = ca_file
        self.tls_match = tls_match
        self.smtpd_limit = smtpd_limit
        self.pid: int | None = None
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def maillog(self) -> Path:
        """Postfix's own log (C{grep status=} for deliveries)."""
        return self.dir / "maillog"

    def _main_cf(self) -> str:
        d = self.dir
        lines = [
            "compatibility_level = 3.6",
            f"queue_directory = {d}/spool",
            f"data_directory = {d}/data",
            "daemon_directory = /usr/lib/postfix/sbin",
            "command_directory = /usr/sbin",
            "mail_owner = postfix",
            "setgid_group = postdrop",
            f"maillog_file = {d}/maillog",
            # postfix check fails without a word unless maillog_file is under a prefix.
            f"maillog_file_prefixes = {d}",
            "myhostname = client.postfix.test",
            "mydomain = postfix.test",
            "myorigin = $myhostname",
            "inet_interfaces = 127.0.0.1",
            "inet_protocols = ipv4",
            "mynetworks = 127.0.0.0/8",
            "mydestination =",
            "local_recipient_maps =",
            "local_transport = error:local delivery disabled",
            "alias_maps =",
            "alias_database =",
            "relay_domains =",
            "smtpd_relay_restrictions = permit_mynetworks, reject",
            f"relayhost = [{self.relay_host}]:{self.relay_port}",
            "smtp_host_lookup = native",
            f"smtp_tls_security_level = {self.tls}",
            f"smtp_tls_CAfile = {self.ca_file or ''}",
            f"smtp_tls_verify_cert_match = {self.tls_match}",
            f"smtp_tls_secure_cert_match = {self.tls_match}",
            "smtp_tls_loglevel = 1",
            "message_size_limit = 52428800",
            "biff = no",
            "minimal_backoff_time = 2s",
            "maximal_backoff_time = 4s",
            "queue_run_delay = 2s",
        ]
        if self.sasl_user:
            lines += [
                "smtp_sasl_auth_enable = yes",
                f"smtp_sasl_password_maps = static:{self.sasl_user}:{self.sasl_password}",
                "smtp_sasl_security_options = noanonymous",
                "smtp_sasl_tls_security_options = noanonymous",
            ]
        return "\n".join(lines) + "\n"

    def start(self, timeout: float = 30.0) -> PostfixInstance:
        """
        Write the configuration, create the queue, start C{master -d} in its own
        session and wait until smtpd accepts connections.
        """
        reason = postfix_available()
        if reason:
            raise RuntimeError(reason)
        self.stop()
        d = self.dir
        d.mkdir(parents=True, exist_ok=True)
        for sub in ("etc", "spool", "data"):
            shutil.rmtree(d / sub, ignore_errors=True)
        os.chmod(d, 0o755)
        postfix_can_enter(d)
        (d / "etc").mkdir()
        (d / "spool").mkdir()
        (d / "data").mkdir(mode=0o700)
        shutil.chown(d / "data", user="postfix")
        for name in ("postfix-files", "postfix-files.d", "dynamicmaps.cf", "dynamicmaps.cf.d"):
            src = Path("/etc/postfix") / name
            if src.is_dir():
                shutil.copytree(src, d / "etc" / name)
            elif src.exists():
                shutil.copy(src, d / "etc" / name)
        (d / "etc" / "main.cf").write_text(self._main_cf())
        (d / "etc" / "master.cf").write_text(
            _MASTER_CF.format(port=self.listen_port, smtpd_limit=self.smtpd_limit)
        )
        check = subprocess.run(
            ["/usr/sbin/postfix", "-c", str(d / "etc"), "check"],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        if check.returncode != 0:
            raise RuntimeError(f"postfix check failed: {check.stdout}{check.stderr}")
        with open(d / "master.log", "wb") as log:
            # Own session: on SIGTERM master signals its process group to stop its children.
            self._proc = subprocess.Popen(
                [_MASTER, "-c", str(d / "etc"), "-d"],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        self.pid = self._proc.pid
        (d / "master.pid").write_text(f"{self.pid}\n")
        proc = self._proc
        try:
            wait_for_ports(
                "127.0.0.1", [self.listen_port], timeout, alive=lambda: proc.poll() is None
            )
        except Exception as e:
            self.stop()
            raise RuntimeError(f"{e}: {(d / 'master.log').read_text(errors='replace')}") from e
        return self

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM the master by its PID; it stops its children.  Then SIGKILL what is left."""
        pid = self.pid
        if pid is None:
            return
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._proc is not None and self._proc.poll() is not None:
                break
            if self._proc is None and not pid_alive(pid):
                break
            time.sleep(0.05)
        # The group is the one master's own session made (start_new_session): only ours.
        try:
            os.killpg(pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        if self._proc is not None:
            try:
                self._proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                pass
        self.pid = None
        self._proc = None
        try:
            (self.dir / "master.pid").unlink()
        except FileNotFoundError:
            pass

    def delivered(self) -> int:
        """How many deliveries the maillog reports as C{status=sent}."""
        try:
            return self.maillog.read_text(errors="replace").count("status=sent")
        except FileNotFoundError:
            return 0

    def __enter__(self) -> PostfixInstance:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
