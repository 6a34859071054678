"""
A throwaway OpenLDAP C{slapd} on loopback (Debian packages C{slapd} and
C{ldap-utils}), ported from the measured recipe in the project notes:
C{slapd.conf} plus an offline C{slapadd} of the fixture data, then
C{slapd -d stats} in the foreground of a child process, stopped by its PID.

It listens on C{ldap://127.0.0.1:PORT} (StartTLS offered) and
C{ldaps://127.0.0.1:LDAPS_PORT}; the certificate is self-signed (CN
localhost, SAN localhost and 127.0.0.1) and is its own CA (L{Slapd.ca_file}).

Fixture data under C{dc=example,dc=com} (test-only passwords):
  - service account C{cn=relay-svc,ou=services} / C{svcpw}
  - C{uid=alice} / C{alicepw}: mail alice@example.com and
    alice.smith@example.com; groups relay-users and admins
  - C{uid=bob} / C{bobpw}: mail bob@example.com; group relay-users
  - C{uid=carol} / C{carolpw}: mail carol@example.org; group team-c, which is
    itself a member of relay-users (nested)
  - C{uid=dan} / C{danpw}: member of admins with NO C{memberOf} value (as on a
    server without the memberof overlay)
  - C{uid=dup1}, C{uid=dup2} / C{duppw}: both with mail shared@example.com
  - groupOfNames relay-users (alice, bob, team-c), admins (alice, dan), team-c (carol)

slapadd does not run the memberof overlay, so C{memberOf} (direct
memberships only, as the overlay would write them) is in the LDIF itself.
"""

from __future__ import annotations

import base64
import hashlib
import os
import shutil
import subprocess
import time
from pathlib import Path
from urllib.parse import quote

import attrs

from tests.servers.certs import self_signed
from tests.servers.ports import free_ports, wait_for_ports
from tests.servers.procs import stop_process

BASE_DN = "dc=example,dc=com"
SERVICE_DN = f"cn=relay-svc,ou=services,{BASE_DN}"
SERVICE_PASSWORD = "svcpw"
PASSWORDS = {
    "alice": "alicepw", "bob": "bobpw", "carol": "carolpw", "dan": "danpw",
    "dup1": "duppw", "dup2": "duppw",
}  # fmt: skip

_SBIN = "/usr/sbin"


def user_dn(uid: str) -> str:
    """The DN of fixture user C{uid}."""
    return f"uid={uid},ou=people,{BASE_DN}"


def group_dn(cn: str) -> str:
    """The DN of fixture group C{cn}."""
    return f"cn={cn},ou=groups,{BASE_DN}"


def slapd_unavailable() -> str | None:
    """C{None} when slapd can run here, else why not."""
    for tool in ("slapd", "slapadd"):
        if shutil.which(tool, path=f"{_SBIN}:/usr/bin") is None:
            return f"{tool} is not installed (Debian packages slapd ldap-utils)"
    if shutil.which("ldapwhoami") is None:
        return "ldapwhoami is not installed (Debian package ldap-utils)"
    if not Path("/etc/ldap/schema/inetorgperson.schema").exists():
        return "the OpenLDAP schema files are missing (Debian package slapd)"
    return None


def _ssha(password: str) -> str:
    salt = os.urandom(8)
    digest = hashlib.sha1(password.encode() + salt).digest()
    return "{SSHA}" + base64.b64encode(digest + salt).decode()


def _conf(d: Path, allow_bind_anon_dn: bool) -> str:
    allow = "allow bind_anon_dn\n" if allow_bind_anon_dn else ""
    return f"""\
include /etc/ldap/schema/core.schema
include /etc/ldap/schema/cosine.schema
include /etc/ldap/schema/inetorgperson.schema
include /etc/ldap/schema/nis.schema
modulepath /usr/lib/ldap
moduleload back_mdb
moduleload memberof
moduleload refint
pidfile  {d}/slapd.pid
argsfile {d}/slapd.args
TLSCertificateFile    {d}/cert.pem
TLSCertificateKeyFile {d}/key.pem
loglevel stats
{allow}
database mdb
maxsize 67108864
suffix "{BASE_DN}"
rootdn "cn=admin,{BASE_DN}"
rootpw adminpw
directory {d}/db
dbnosync
index objectClass,uid,mail,member,memberOf eq
access to attrs=userPassword by self =xw by anonymous auth by * none
access to * by users read by * none
overlay memberof
memberof-group-oc groupOfNames
memberof-member-ad member
memberof-memberof-ad memberOf
memberof-refint TRUE
overlay refint
refint_attributes member
"""


def _person(uid: str, cn: str, mails: list[str], groups: list[str]) -> str:
    lines = [
        f"dn: {user_dn(uid)}",
        "objectClass: inetOrgPerson",
        f"uid: {uid}",
        f"cn: {cn}",
        f"sn: {cn.split()[-1]}",
        *(f"mail: {m}" for m in mails),
        f"userPassword: {_ssha(PASSWORDS[uid])}",
        *(f"memberOf: {group_dn(g)}" for g in groups),
    ]
    return "\n".join(lines) + "\n\n"


def _group(cn: str, members: list[str], member_of: list[str] = []) -> str:
    lines = [
        f"dn: {group_dn(cn)}",
        "objectClass: groupOfNames",
        f"cn: {cn}",
        *(f"member: {m}" for m in members),
        *(f"memberOf: {group_dn(g)}" for g in member_of),
    ]
    return "\n".join(lines) + "\n\n"


def _data() -> str:
    head = f"""\
dn: {BASE_DN}
objectClass: dcObject
objectClass: organization
o: Example
dc: example

dn: ou=people,{BASE_DN}
objectClass: organizationalUnit
ou: people

dn: ou=groups,{BASE_DN}
objectClass: organizationalUnit
ou: groups

dn: ou=services,{BASE_DN}
objectClass: organizationalUnit
ou: services

dn: {SERVICE_DN}
objectClass: organizationalRole
objectClass: simpleSecurityObject
cn: relay-svc
userPassword: {_ssha(SERVICE_PASSWORD)}

"""
    return (
        head
        + _person("alice", "Alice Smith", ["alice@example.com", "alice.smith@example.com"],
                  ["relay-users", "admins"])
        + _person("bob", "Bob Jones", ["bob@example.com"], ["relay-users"])
        + _person("carol", "Carol White", ["carol@example.org"], ["team-c"])
        + _person("dan", "Dan Brown", ["dan@example.com"], [])
        + _person("dup1", "Dup One", ["shared@example.com"], [])
        + _person("dup2", "Dup Two", ["shared@example.com"], [])
        + _group("team-c", [user_dn("carol")], ["relay-users"])
        + _group("relay-users", [user_dn("alice"), user_dn("bob"), group_dn("team-c")])
        + _group("admins", [user_dn("alice"), user_dn("dan")])
    )  # fmt: skip


@attrs.define
class Slapd:
    """A running slapd started by L{start_slapd}."""

    directory: Path
    port: int
    ldaps_port: int
    process: subprocess.Popen[bytes] | None

    @property
    def ca_file(self) -> Path:
        """Its self-signed certificate, the CA to verify it with."""
        return self.directory / "cert.pem"

    @property
    def ldap_url(self) -> str:
        """The plain port (StartTLS offered)."""
        return f"ldap://127.0.0.1:{self.port}"

    @property
    def ldaps_url(self) -> str:
        """The implicit-TLS port."""
        return f"ldaps://127.0.0.1:{self.ldaps_port}"

    def stop(self) -> None:
        """Stop it by PID (SIGTERM, then SIGKILL); idempotent."""
        if self.process is not None:
            stop_process(self.process, timeout=10)
            self.process = None


def start_slapd(directory: Path, *, allow_bind_anon_dn: bool = False) -> Slapd:
    """
    Start a slapd with the fixture data in C{directory} (created) on free
    loopback ports, and wait until it answers.

    @param allow_bind_anon_dn: the danger case: a DN with an empty password
        binds successfully (as anonymous).
    """
    d = directory.resolve()
    (d / "db").mkdir(parents=True, exist_ok=True)
    self_signed(d / "cert.pem", d / "key.pem", "localhost", ["localhost", "127.0.0.1"])
    (d / "slapd.conf").write_text(_conf(d, allow_bind_anon_dn))
    (d / "data.ldif").write_text(_data())
    subprocess.run(
        [f"{_SBIN}/slapadd", "-q", "-f", str(d / "slapd.conf"), "-l", str(d / "data.ldif")],
        check=True,
        capture_output=True,
        timeout=30,
    )
    port, ldaps_port = free_ports(2)
    ldapi = "ldapi://" + quote(str(d / "ldapi"), safe="")
    urls = f"ldap://127.0.0.1:{port}/ ldaps://127.0.0.1:{ldaps_port}/ {ldapi}"
    with open(d / "slapd.log", "wb") as log:
        process = subprocess.Popen(
            [f"{_SBIN}/slapd", "-d", "stats", "-f", str(d / "slapd.conf"), "-h", urls],
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
    server = Slapd(d, port, ldaps_port, process)
    try:
        wait_for_ports(
            "127.0.0.1", [port, ldaps_port], timeout=15, alive=lambda: process.poll() is None
        )
        _wait_answers(server)
    except BaseException:
        server.stop()
        raise
    return server


def _wait_answers(server: Slapd) -> None:
    # A listening socket is not yet a serving database: ask for whoami.
    for _ in range(100):
        done = subprocess.run(
            ["ldapwhoami", "-x", "-H", server.ldap_url],
            capture_output=True,
            timeout=5,
            check=False,
        )
        if done.returncode == 0:
            return
        if server.process is None or server.process.poll() is not None:
            break
        time.sleep(0.05)
    log = (server.directory / "slapd.log").read_text(errors="replace")[-2000:]
    raise RuntimeError(f"slapd did not answer:\n{log}")


def ldapwhoami(server: Slapd, dn: str, password: str) -> subprocess.CompletedProcess[str]:
    """C{ldapwhoami -x -D dn -w password} against its plain port (the server-side check)."""
    return subprocess.run(
        ["ldapwhoami", "-x", "-H", server.ldap_url, "-D", dn, "-w", password],
        capture_output=True,
        text=True,
        timeout=10,
        check=False,
    )
