"""
A throwaway Samba Active Directory domain controller on its own loopback
address (Debian packages C{samba samba-ad-dc samba-ad-provision ldb-tools}),
ported from the measured recipe in the project notes.

Realm EXAMPLE.TEST, NetBIOS domain EXAMPLE, base DN C{DC=example,DC=test},
LDAP only (389 with StartTLS, 636 LDAPS).  Samba's LDAP ports cannot be
moved, so each DC binds its own C{127.x.y.z}, added to C{lo} as a /32 when
missing (root) and removed afterwards only if this module added it.

Provisioning costs seconds, so L{provision_template} provisions once into a
template directory (one per test session) and L{start_dc} copies it and
re-points the paths and the address in C{smb.conf}: nothing in C{sam.ldb}
embeds them.

Fixture accounts (test-only passwords; password policy switched off):
  - C{svc-relay} / C{svcpw}: the service account
  - C{alice} / C{alicepw}: mail alice@example.test, proxyAddresses
    C{SMTP:alice@example.test} and C{smtp:alice.smith@example.test},
    C{X400:...}; member of relay-users
  - C{bob} / C{bobpw}: member of team-b, which is a member of relay-users
  - C{dave} / C{davepw}: disabled (userAccountControl 514)
  - C{erin} / C{erinpw}: for lockout tests (the domain locks an account
    after L{LOCKOUT_THRESHOLD} bad passwords)
"""

from __future__ import annotations

import base64
import ipaddress
import os
import random
import shutil
import subprocess
import time
from pathlib import Path

import attrs

from tests.servers.certs import self_signed
from tests.servers.ports import accepts
from tests.servers.procs import stop_process

REALM = "EXAMPLE.TEST"
DOMAIN = "EXAMPLE"
BASE_DN = "DC=example,DC=test"
ADMIN_PASSWORD = "Adm1n!Passw0rd"
SERVICE_DN = f"CN=svc-relay,CN=Users,{BASE_DN}"
SERVICE_PASSWORD = "svcpw"
PASSWORDS = {"alice": "alicepw", "bob": "bobpw", "dave": "davepw", "erin": "erinpw"}
LOCKOUT_THRESHOLD = 5

_SBIN = "/usr/sbin:/sbin:/usr/bin:/bin"


def dn(cn: str) -> str:
    """The DN of a fixture user or group (all live in CN=Users)."""
    return f"CN={cn},CN=Users,{BASE_DN}"


def samba_unavailable() -> str | None:
    """C{None} when a Samba DC can run here, else why not."""
    for tool in ("samba", "samba-tool", "ldbmodify", "ip"):
        if shutil.which(tool, path=_SBIN) is None:
            return (
                f"{tool} is not installed (Debian packages samba samba-ad-dc "
                "samba-ad-provision ldb-tools iproute2)"
            )
    if not Path("/usr/share/samba/setup").is_dir():
        return "the AD schema files are missing (Debian package samba-ad-provision)"
    if os.geteuid() != 0:
        return "a Samba DC needs root (it binds port 389 and adds a loopback address)"
    return None


def _tool(name: str) -> str:
    path = shutil.which(name, path=_SBIN)
    assert path is not None, name
    return path


def _pw(password: str) -> str:
    return base64.b64encode(f'"{password}"'.encode("utf-16-le")).decode()


def _fixture_ldif() -> str:
    def user(name: str, uac: int, extra: str = "") -> str:
        return (
            f"dn: {dn(name)}\nchangetype: add\nobjectClass: user\n"
            f"sAMAccountName: {name}\nuserPrincipalName: {name}@example.test\n"
            f"{extra}unicodePwd:: {_pw(PASSWORDS.get(name, SERVICE_PASSWORD))}\n"
            f"userAccountControl: {uac}\n\n"
        )

    return (
        f"dn: {BASE_DN}\nchangetype: modify\n"
        "replace: pwdProperties\npwdProperties: 0\n-\n"
        "replace: minPwdLength\nminPwdLength: 1\n-\n"
        "replace: pwdHistoryLength\npwdHistoryLength: 0\n-\n"
        "replace: minPwdAge\nminPwdAge: 0\n-\n"
        "replace: maxPwdAge\nmaxPwdAge: -9223372036854775808\n-\n"
        f"replace: lockoutThreshold\nlockoutThreshold: {LOCKOUT_THRESHOLD}\n\n"
        + user("svc-relay", 66048)
        + user(
            "alice",
            512,
            "givenName: Alice\nsn: Smith\ndisplayName: Alice Smith\n"
            "mail: alice@example.test\nproxyAddresses: SMTP:alice@example.test\n"
            "proxyAddresses: smtp:alice.smith@example.test\n"
            "proxyAddresses: X400:c=US;a= ;p=Example;o=Exchange;s=Smith;g=Alice;\n",
        )
        + user("bob", 512, "mail: bob@example.test\n")
        + user("dave", 514, "mail: dave@example.test\n")
        + user("erin", 512, "mail: erin@example.test\n")
        + f"dn: {dn('team-b')}\nchangetype: add\nobjectClass: group\n"
        f"sAMAccountName: team-b\nmember: {dn('bob')}\n\n"
        + f"dn: {dn('relay-users')}\nchangetype: add\nobjectClass: group\n"
        f"sAMAccountName: relay-users\nmember: {dn('alice')}\nmember: {dn('team-b')}\n"
    )


def provision_template(template: Path, ip: str) -> Path:
    """
    Provision a domain with the fixture accounts into C{template} (about 4-8
    s); L{start_dc} copies it.  C{ip} is only written into C{smb.conf}.
    """
    t = template.resolve()
    t.mkdir(parents=True, exist_ok=True)
    log = t / "provision.log"
    options = [
        f"interfaces={ip}", "bind interfaces only=yes", "server services=ldap",
        "disable netbios=yes", f"pid directory={t}/run", f"ncalrpc dir={t}/run/ncalrpc",
        f"winbindd socket directory={t}/run/winbindd", f"log file={t}/log.%m",
        "tls enabled=yes", f"tls keyfile={t}/tls/key.pem", f"tls certfile={t}/tls/cert.pem",
        "tls cafile=",
    ]  # fmt: skip
    with open(log, "wb") as out:
        done = subprocess.run(
            [_tool("samba-tool"), "domain", "provision", f"--targetdir={t}",
             f"--realm={REALM}", f"--domain={DOMAIN}", "--server-role=dc",
             "--dns-backend=NONE", "--use-rfc2307", "--host-name=dc1", f"--host-ip={ip}",
             f"--adminpass={ADMIN_PASSWORD}", *(f"--option={o}" for o in options)],
            stdout=out, stderr=subprocess.STDOUT, timeout=120, check=False,
        )  # fmt: skip
    if done.returncode != 0:
        raise RuntimeError("samba-tool domain provision failed:\n" + log.read_text()[-3000:])
    (t / "fixture.ldif").write_text(_fixture_ldif())
    subprocess.run(
        [_tool("ldbmodify"), "-H", str(t / "private" / "sam.ldb"), str(t / "fixture.ldif")],
        check=True,
        capture_output=True,
        timeout=60,
    )
    (t / "template-ip").write_text(ip)
    return t


def pick_ip() -> str:
    """A random 127.x.y.z not currently on any interface (Samba binds exactly it)."""
    held = _lo_addresses()
    for _ in range(100):
        ip = f"127.{random.randint(100, 254)}.{random.randint(0, 255)}.{random.randint(2, 254)}"
        if ip not in held and not accepts(ip, 389, timeout=0.2):
            return ip
    raise RuntimeError("no free 127.x.y.z address found")


def _lo_addresses() -> set[str]:
    out = subprocess.run(
        [_tool("ip"), "-4", "-o", "addr", "show"], capture_output=True, text=True, check=True
    ).stdout
    found = set()
    for line in out.splitlines():
        parts = line.split()
        if "inet" in parts:
            found.add(parts[parts.index("inet") + 1].split("/")[0])
    return found


@attrs.define
class SambaDC:
    """A running DC started by L{start_dc}."""

    directory: Path
    ip: str
    process: subprocess.Popen[bytes] | None
    added_ip: bool

    @property
    def ca_file(self) -> Path:
        """Its self-signed certificate (SAN dc1.example.test, localhost and the IP)."""
        return self.directory / "tls" / "cert.pem"

    @property
    def ldap_url(self) -> str:
        """Port 389 (StartTLS)."""
        return f"ldap://{self.ip}"

    @property
    def ldaps_url(self) -> str:
        """Port 636 (implicit TLS)."""
        return f"ldaps://{self.ip}"

    def stop(self) -> None:
        """Stop it by PID, then drop the loopback address if we added it; idempotent."""
        if self.process is not None:
            stop_process(self.process, timeout=10)
            self.process = None
        if self.added_ip:
            subprocess.run(
                [_tool("ip"), "addr", "del", f"{self.ip}/32", "dev", "lo"],
                capture_output=True,
                check=False,
            )
            self.added_ip = False


def start_dc(template: Path, directory: Path, ip: str) -> SambaDC:
    """
    Copy the provisioned C{template} into C{directory}, re-point it at
    C{ip}, give it a fresh certificate, and start C{samba -M single} bound
    to C{ip} only; return once LDAPS answers.
    """
    ipaddress.IPv4Address(ip)  # refuse anything that could mean something else to sed-like code
    t = template.resolve()
    d = directory.resolve()
    shutil.copytree(t, d, symlinks=True, dirs_exist_ok=True)
    conf = d / "etc" / "smb.conf"
    old_ip = (t / "template-ip").read_text().strip()
    text = conf.read_text().replace(str(t), str(d))
    text = "\n".join(
        line.replace(old_ip, ip) if line.strip().startswith("interfaces") else line
        for line in text.splitlines()
    )
    conf.write_text(text + "\n")
    (d / "run").mkdir(exist_ok=True)
    (d / "tls").mkdir(exist_ok=True)
    self_signed(
        d / "tls" / "cert.pem",
        d / "tls" / "key.pem",
        "dc1.example.test",
        ["dc1.example.test", "localhost", ip],
    )
    added = False
    if ip not in _lo_addresses():
        subprocess.run([_tool("ip"), "addr", "add", f"{ip}/32", "dev", "lo"], check=True)
        added = True
    dc = SambaDC(d, ip, None, added)
    try:
        with open(d / "samba.log", "wb") as log:
            dc.process = subprocess.Popen(
                [_tool("samba"), "-i", "-M", "single", "-s", str(conf), "--debug-stdout", "-d1"],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )
        deadline = time.monotonic() + 30
        while not (accepts(ip, 389, 0.2) and _answers(ip)):
            if dc.process.poll() is not None or time.monotonic() > deadline:
                tail = (d / "samba.log").read_text(errors="replace")[-2000:]
                raise RuntimeError(f"samba did not start on {ip}:\n{tail}")
            time.sleep(0.05)
    except BaseException:
        dc.stop()
        raise
    return dc


def _answers(ip: str) -> bool:
    # An open port is not yet a serving directory: read the root DSE over LDAPS.
    done = subprocess.run(
        ["ldapsearch", "-x", "-H", f"ldaps://{ip}", "-s", "base", "-b", "", "dnsHostName"],
        env={**os.environ, "LDAPTLS_REQCERT": "never"},
        capture_output=True,
        timeout=10,
        check=False,
    )
    return done.returncode == 0
