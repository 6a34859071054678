"""
Assembly: the gateway as one L{MultiService}.

Start order (SPEC section 4: nothing is received or delivered before the
spool is recovered)::

    privilegedStartService   bind every planned socket (root may be needed for
                             ports below 1024); connections wait for startService
    startService             create spool and log directories, recover the spool,
                             start delivery (the delivery process, or an in-process
                             scheduler), check or generate certificates, build the
                             selector and session factory, then open the sockets to
                             connections

twistd calls both before the reactor runs; when only L{startService} is
called (tests, embedding), it binds the sockets itself, last.
"""

from __future__ import annotations

import os
from datetime import timedelta
from pathlib import Path
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any, Literal, cast

from twisted.application.service import MultiService
from twisted.internet.defer import Deferred, DeferredList
from twisted.internet.interfaces import (
    IAddress,
    IReactorCore,
    IListeningPort,
    IReactorFromThreads,
    IReactorTime,
)
from twisted.internet.protocol import ServerFactory
from twisted.logger import Logger, globalLogPublisher

from relaygw._types import IServeReactor
from relaygw.config._model import Config, Connector
from relaygw.interfaces import IDirectory
from relaygw.listen.bindings import ListenError, ListenSocket, listen_on, plan_sockets
from relaygw.listen.proxy import ProxyFactory
from relaygw.listen.tls import ServerTLSOptions, TLSSetupError, ensure_certificate
from relaygw.reload import Sessions, install_signals, read_config, restart_only, socket_changes
from relaygw.runner import DeliveryProcess, Routes, build_routes, build_scheduler, reconfigure

if TYPE_CHECKING:
    from twisted.cred.portal import Portal
    from twisted.internet.protocol import _ProtoWithFactory
    from twisted.python.threadpool import ThreadPool

    from relaygw.deliver.scheduler import Scheduler
    from relaygw.ops.admin import AdminServer
    from relaygw.ops.protolog import ProtocolLog
    from relaygw.ops.tracking import TrackingLog
    from relaygw.session.factory import SessionFactory
    from relaygw.session.peers import PeerLimits
    from relaygw.spool.store import DirectorySpool
    from relaygw.events import TwistdCopy
    from relaygw.workers import ReceiveWorkers

__all__ = ["AUTH_THREADS", "RelayGatewayService", "StartupError", "build_directory",
           "build_portal", "spool_root"]

#: Threads of the pool the directory (ldap3 binds, scrypt) runs in.
AUTH_THREADS = 8
#: Seconds a stop waits for sessions in progress (one in DATA included)
#: before it closes them; Postfix's smtpd gets about as long from master.
STOP_SESSIONS_GRACE = 30.0


class StartupError(Exception):
    """
    The gateway cannot start: a socket cannot be bound, a certificate file is
    unusable, a directory cannot be created.  The message says which.
    """


def build_directory(
    config: Config,
    *,
    reactor: IReactorFromThreads | None,
    threadpool: ThreadPool | None,
    clock: IReactorTime | None = None,
) -> IDirectory:
    """
    The credential and address store of C{config}: the directory
    (L{relaygw.auth.directory.LDAPDirectory}) when C{[directory]} is set, its
    bind password read from C{bind_password_file}; else the users file.

    @param reactor: with C{threadpool}, where blocking work runs (required
        for a directory; the users file runs inline without them).
    @param clock: the users file's, for changes made in place.
    @raise StartupError: the bind password file cannot be read, or the
        directory settings are unusable.
    """
    from relaygw.auth.usersfile import UsersFile

    settings = config.directory
    if settings is None:
        users = config.users.file if config.users is not None else Path("users")
        return UsersFile(users, reactor=reactor, threadpool=threadpool, clock=clock)
    password = ""
    if settings.bind_password_file is not None:
        try:
            password = settings.bind_password_file.read_text(encoding="utf-8").rstrip("\r\n")
        except (OSError, UnicodeDecodeError) as error:
            raise StartupError(
                f"cannot read directory.bind_password_file {settings.bind_password_file}: "
                f"{getattr(error, 'strerror', None) or error}"
            ) from None
    if reactor is None or threadpool is None:
        raise StartupError("the directory needs a reactor and a thread pool")
    from relaygw.auth.directory import LDAPDirectory

    try:
        return LDAPDirectory(settings, reactor=reactor, threadpool=threadpool,
                             bind_password=password)
    except ValueError as error:
        raise StartupError(f"directory: {error}") from None


def build_portal(directory: IDirectory, config: Config, clock: IReactorTime) -> Portal:
    """
    The AUTH portal: L{relaygw.auth.realm.UserRealm} with a
    L{relaygw.auth.checker.DirectoryChecker} over C{directory}, caching
    successful logins for C{directory.cache_ttl} (no cache for the users file:
    it is local).
    """
    from twisted.cred.portal import Portal

    from relaygw.auth.checker import DirectoryChecker
    from relaygw.auth.realm import UserRealm

    ttl = config.directory.cache_ttl if config.directory is not None else timedelta(0)
    return Portal(UserRealm(), [DirectoryChecker(directory, clock, ttl)])


def spool_root(config: Config) -> Path:
    """
    The directory of the L{relaygw.spool.store.DirectorySpool}: the
    configured C{gateway.spool_dir} itself (it holds C{queue/} and C{corrupt/}).
    """
    return config.gateway.spool_dir


def _remove_partials(spool: DirectorySpool, delivery: object, pid: int, live: set[int]) -> None:
    """A receiving worker ended: remove its partial spool entries."""
    others = live | {os.getpid()}
    delivery_pid = getattr(delivery, "pid", None)
    if isinstance(delivery_pid, int):
        others.add(delivery_pid)
    try:
        spool.remove_partials_of(pid, others)
    except OSError as error:
        Logger().warn("Spool: partial entries of process {pid} not removed: {error}",
                          pid=pid, error=str(error))


class _Gate(ServerFactory):
    """
    The factory every listening socket is bound with.  It hands connections
    to the session factory once the service has started; before that (a
    socket bound in privilegedStartService, startService not yet run) it
    refuses them, so no session runs before the spool is recovered.
    """

    noisy = False

    def __init__(self) -> None:
        self.target: ServerFactory | None = None
        self.sessions = Sessions()

    def buildProtocol(self, addr: IAddress | None) -> _ProtoWithFactory | None:
        if self.target is None:
            return None
        protocol = self.target.buildProtocol(addr)
        if protocol is not None:
            self.sessions.add(protocol)
        return protocol


class RelayGatewayService(MultiService):
    """
    The whole gateway: listeners, the session factory, the spool and the
    delivery scheduler.

    @ivar config: the running configuration.
    """

    _log = Logger()

    def __init__(
        self,
        config: Config,
        reactor: IServeReactor,
        *,
        delivery: Literal["process", "inline", "none"] = "inline",
        config_path: str | None = None,
        signals: bool = False,
        stop_grace: float = STOP_SESSIONS_GRACE,
        admin: bool | None = None,
        tracking: bool = True,
        log_publisher: Any = globalLogPublisher,
        protocol_logs: bool = True,
        workers: int = 1,
        adopt: tuple[int, ...] | None = None,
    ) -> None:
        """
        @param config: a validated configuration.
        @param reactor: the reactor to listen, connect and keep time with;
            IPv6 sockets need a real (file-descriptor based) reactor, and
            C{delivery="process"} one that spawns processes.
        @param delivery: C{"process"} (what twistd runs): the scheduler runs
            in the delivery process (L{relaygw.runner}), which loads the same
            configuration from C{config_path} (C{None}: the embedded default);
            C{"inline"}: in this process (tests, embedding); C{"none"}: a
            receiving worker's (L{relaygw.workers}), whose parent tells
            delivery.
        @param signals: reload on SIGHUP and exit 0 after a graceful
            SIGTERM (what twistd runs; L{reload} is there either way).
        @param stop_grace: seconds L{stopService} waits for sessions.
        @param admin: serve the admin HTTP endpoint on C{admin_listen}
            (L{relaygw.ops.admin}); C{None}: with C{delivery="process"} (what
            twistd runs), not inline, so that tests and embedders do not take
            the default port 8025 unasked.
        @param tracking: write the message tracking log
            (L{relaygw.ops.tracking}) under C{gateway.log_dir}, in this
            process for both (the delivery process's events are re-published
            here), with either delivery mode.
        @param log_publisher: what the tracking log observes.
        @param protocol_logs: write the protocol logs (L{relaygw.ops.protolog})
            of verbose connectors and routes: SmtpReceive here, SmtpSend in
            the process that delivers (here with C{delivery="inline"}).
        @param workers: receiving processes in all, this one included; more
            than one (with C{delivery="process"}) starts
            L{relaygw.workers.ReceiveWorkers} on this process's sockets.
        @param adopt: a receiving worker's inherited listening sockets, in
            plan order: adopted instead of bound, and the spool is not
            recovered (the parent did that before starting the worker).
        """
        super().__init__()  # type: ignore[no-untyped-call]
        self.config = config
        self._reactor = reactor
        self._delivery_mode = delivery
        self._config_path = config_path
        self._delivery: DeliveryProcess | None = None
        self._routes: Routes | None = None
        self._signals = signals
        self._stop_grace = stop_grace
        self._plans: list[ListenSocket] = []
        self._gate = _Gate()
        self._ports: list[IListeningPort] = []
        self._tls = ServerTLSOptions()
        self._spool: DirectorySpool | None = None
        self._scheduler: Scheduler | None = None
        self._factory: SessionFactory | None = None
        self._auth_pool: ThreadPool | None = None
        self._admin_wanted = delivery == "process" if admin is None else admin
        self._admin: AdminServer | None = None
        self._tracking_wanted = tracking
        self._log_publisher = log_publisher
        self._tracking: TrackingLog | None = None
        self._protocol_logs_wanted = protocol_logs
        self._workers_wanted = workers
        self._workers: ReceiveWorkers | None = None
        self._adopt = adopt
        self._messages_copy: TwistdCopy | None = None
        self._receive_log: ProtocolLog | None = None
        self._send_log: ProtocolLog | None = None

    @property
    def ports(self) -> tuple[IListeningPort, ...]:
        """The listening ports, in plan order (empty when not listening)."""
        return tuple(self._ports)

    def privilegedStartService(self) -> None:
        """
        Bind every planned socket, before twistd drops privileges.

        @raise ListenError: a socket cannot be bound; the message names the
            binding and its connectors, and nothing stays bound.
        """
        self._listen()
        super().privilegedStartService()  # type: ignore[no-untyped-call]

    def startService(self) -> None:
        """
        Recover the spool, start delivery, then take connections.

        @raise StartupError: a directory or certificate problem.
        @raise ListenError: a socket cannot be bound.
        """
        try:
            self._start()
        except BaseException:
            self._close_ports()
            self._release_routes()
            self._stop_auth_pool()
            raise
        super().startService()  # type: ignore[no-untyped-call]

    def _start(self) -> None:
        from relaygw.connectors.selector import ConnectorSelector
        from relaygw.session.factory import SessionFactory
        from relaygw.spool.store import DirectorySpool

        config = self.config
        root = spool_root(config)
        for directory in (root, config.gateway.log_dir):
            try:
                directory.mkdir(parents=True, exist_ok=True)
            except OSError as error:
                raise StartupError(f"cannot create {directory}: {error.strerror}") from None
        self._check_certificates(config.connectors, self._tls)
        try:
            spool = DirectorySpool(root, self._reactor)
            # A worker's parent recovered the spool; a worker's own clean-up
            # would remove the other processes' entries in progress.
            recovered = spool.clean() if self._adopt is None else None
        except OSError as error:
            raise StartupError(f"cannot use the spool {root}: {error.strerror}") from None
        if recovered is not None:
            self._log.info(
                "spool {spool_dir}: {count} queued message(s) recovered",
                spool_dir=str(root),
                count=recovered,
            )
        scheduler: Scheduler | None = None
        delivery: DeliveryProcess | None = None
        receive_log = send_log = None
        if self._protocol_logs_wanted:
            from relaygw.ops.protolog import ProtocolLog

            # Built here, started below; they write nothing until started.
            receive_log = ProtocolLog(config.gateway.log_dir, "receive", self._reactor)
            if self._delivery_mode == "inline":
                send_log = ProtocolLog(config.gateway.log_dir, "send", self._reactor)
        if self._delivery_mode == "inline":
            scheduler, self._routes = build_scheduler(config, self._reactor, spool, send_log)
        elif self._delivery_mode == "process":
            delivery = DeliveryProcess(reactor=self._reactor, config_path=self._config_path)
        store = self._build_directory()
        factory = SessionFactory(
            selector=ConnectorSelector(config.connectors),
            config=config,
            spool=spool,
            reactor=self._reactor,
            tls_options=self._tls_options,
            portal=build_portal(store, config, self._reactor),
            directory=store,
            protocol_log=receive_log,
        )
        if not self._ports:
            self._listen()
        self._admin = self._start_admin()
        # Nothing above leaves timers or threads behind if it raises; from
        # here on nothing raises.
        self._spool, self._scheduler, self._factory = spool, scheduler, factory
        self._copy_messages(config)
        if self._tracking_wanted:
            # Before any session or delivery, so that every event is a row.
            from relaygw.ops.tracking import TrackingLog

            self._tracking = TrackingLog(config.gateway.log_dir, self._reactor)
            self._tracking.start(self._log_publisher)
        for log in (receive_log, send_log):
            if log is not None:
                log.start()
        self._receive_log, self._send_log = receive_log, send_log
        if scheduler is not None:
            scheduler.start(spool.iter_entries())
            spool.subscribe(scheduler.enqueue)
        if delivery is not None:
            # Spawned after recovery: the child lists the committed entries.
            self._delivery = delivery
            delivery.startService()
            spool.subscribe(lambda envelope: delivery.notify(envelope.id))
            if self._workers_wanted > 1 and self._adopt is None:
                from relaygw.workers import ReceiveWorkers

                # After recovery and the delivery process; their messages
                # reach delivery through their receive.queued events.
                self._workers = ReceiveWorkers(
                    reactor=self._reactor, config_path=self._config_path,
                    count=self._workers_wanted - 1,
                    fds=lambda: [cast(Any, port).fileno() for port in self._ports],
                    on_queued=delivery.notify,
                    on_peer=lambda line: factory.peers.apply(line) if factory.peers else False,
                    publisher=self._log_publisher, stop_grace=self._stop_grace + 5,
                    on_dead=lambda pid, live: _remove_partials(spool, delivery, pid, live),
                )
                factory.share_limits(os.getpid(), self._workers.broadcast, decides=True)
                self._workers.startService()
        factory.doStart()  # type: ignore[no-untyped-call]
        # PROXY bindings read the header before the session starts (SPEC section 2).
        self._gate.target = ProxyFactory(factory, lambda: factory.config, self._reactor)
        if self._signals:
            install_signals(cast(IReactorCore, self._reactor), self.reload)
        # Test fixtures and operators wait for this line: a bound socket
        # accepts TCP connections before this point, but no session yet.
        self._log.info(
            "relaygw ready: accepting connections on {count} socket(s)", count=len(self._ports)
        )

    def share_limits(self, send: Callable[[bytes], None]) -> PeerLimits:
        """
        A receiving worker's limits, shared with the other processes
        (L{relaygw.session.peers}): its changes go to C{send}; the returned
        object's C{apply} takes theirs.
        """
        assert self._factory is not None, "not started"
        return self._factory.share_limits(os.getpid(), send)

    def reload(self) -> Deferred[bool]:
        """
        SIGHUP: read the configuration file again and use it for new
        sessions and deliveries: new bindings open, removed ones close,
        certificates and the directory (or users file) are loaded anew, the
        delivery process reloads too.  Sessions in progress finish under the
        connector they started with.

        @return: fires with whether the new configuration runs; when not,
            the reason was logged in SPEC section 2's form and nothing changed.
        """
        return Deferred.fromCoroutine(self._reload())

    async def _reload(self) -> bool:
        from relaygw.connectors.selector import ConnectorSelector

        factory = self._factory
        if factory is None:  # not started, or stopping
            return False
        config = read_config(self._config_path)
        if config is None:
            return False
        tls = ServerTLSOptions()
        try:
            self._check_certificates(config.connectors, tls)
            store = build_directory(
                config,
                reactor=cast(IReactorFromThreads, self._reactor) if self._auth_pool else None,
                threadpool=self._auth_pool,
                clock=self._reactor,
            )
            planned = plan_sockets(config.connectors)
            moved = self._adopt is None and any(socket_changes(self._plans, planned))
            if self._adopt is None:  # a worker's sockets are its parent's
                await self._resocket(planned)
        except (StartupError, ListenError) as error:
            self._log.error(
                "reload refused, the running configuration stays: {problem}",
                event="reload.refused", problem=str(error),
            )
            return False
        for key in restart_only(self.config, config):
            self._log.warn("{key} changed; it takes effect at the next restart", key=key)
        self.config, self._tls = config, tls
        factory.reconfigure(
            config,
            ConnectorSelector(config.connectors),
            portal=build_portal(store, config, self._reactor),
            directory=store,
        )
        if self._scheduler is not None and self._routes is not None:
            routes = build_routes(config, self._reactor, self._send_log)
            reconfigure(self._scheduler, self._routes, routes, self._reactor)
            self._routes = routes
        if self._delivery is not None:
            self._delivery.reload()
        if self._workers is not None:
            # Inherited sockets cannot change: new workers get the new ones.
            if moved:
                self._workers.restart()
            else:
                self._workers.reload()
        self._copy_messages(config)
        if self._admin is not None and self._admin.metrics is not None:
            self._admin.metrics.prime(config)  # new connectors and routes show at zero
        self._log.info(
            "configuration reloaded from {source}: listening on {count} socket(s)",
            event="reload.done", source=config.source, count=len(self._ports),
        )
        return True

    async def _resocket(self, planned: tuple[ListenSocket, ...]) -> None:
        """
        Close the sockets no longer planned, then open the new ones; when
        one cannot be opened, put everything back as it was and raise.

        @raise ListenError: a new socket cannot be opened.
        """
        close, opening = socket_changes(self._plans, planned)
        closed = [(self._plans[i], self._ports[i]) for i in close]
        kept = [pair for i, pair in enumerate(zip(self._plans, self._ports)) if i not in close]
        self._plans, self._ports = [p for p, _ in kept], [port for _, port in kept]
        # Waited for: a socket planned anew on the same port binds it again.
        await _all(port.stopListening() for _, port in closed)
        try:
            for plan in opening:
                self._open(plan)
        except ListenError:
            fresh = [port for plan, port in zip(self._plans, self._ports) if plan in opening]
            self._plans, self._ports = [p for p, _ in kept], [port for _, port in kept]
            await _all(port.stopListening() for port in fresh)
            for plan, _ in closed:
                self._open(plan)
            raise
        for plan, _ in closed:
            self._log.info("stopped listening on {binding}", binding=str(plan.binding))
        order = {plan: i for i, plan in enumerate(planned)}
        pairs = sorted(zip(self._plans, self._ports), key=lambda pair: order[pair[0]])
        self._plans, self._ports = [p for p, _ in pairs], [port for _, port in pairs]

    def _copy_messages(self, config: Config | None) -> None:
        """
        C{gateway.log_messages} of C{config} (C{None}: stopping): copy the
        per-message events into twistd's log, or stop (L{relaygw.events});
        a receiving worker's go to the gateway's.
        """
        from relaygw.events import MESSAGES, TwistdCopy

        wanted = config is not None and config.gateway.log_messages and self._adopt is None
        if wanted and self._messages_copy is None:
            self._messages_copy = TwistdCopy()
            MESSAGES.addObserver(self._messages_copy)
        elif not wanted and self._messages_copy is not None:
            MESSAGES.removeObserver(self._messages_copy)
            self._messages_copy = None

    def _start_admin(self) -> AdminServer | None:
        """
        The admin HTTP endpoint, listening and counting events (before any
        session or delivery runs); C{None} when not wanted.

        @raise StartupError: the token file or C{admin_listen} is unusable.
        """
        from relaygw.ops.admin import AdminError, AdminServer
        from relaygw.ops.health import GatewayView

        if not self._admin_wanted or self.config.gateway.admin_listen is None:
            return None

        def directory() -> IDirectory | None:
            lookup = self._factory.addresses if self._factory is not None else None
            return lookup.directory if lookup is not None else None

        def delivery_pid() -> int | None:
            return self._delivery.pid if self._delivery is not None else None

        view = GatewayView(
            config=lambda: self.config,
            ports=lambda: self.ports,
            delivery_pid=delivery_pid if self._delivery_mode == "process" else None,
            directory=directory,
        )
        try:
            admin = AdminServer(self.config, view, self._reactor)
            admin.start()
        except AdminError as error:
            raise StartupError(str(error)) from None
        return admin

    def _build_directory(self) -> IDirectory:
        """
        The credential store, with a bounded thread pool (started here,
        stopped by L{stopService}) when the reactor can take results from
        threads.
        """
        from twisted.python.threadpool import ThreadPool

        reactor = self._reactor
        if not IReactorFromThreads.providedBy(reactor):
            return build_directory(self.config, reactor=None, threadpool=None, clock=reactor)
        pool = ThreadPool(minthreads=0, maxthreads=AUTH_THREADS, name="relaygw-auth")
        directory = build_directory(
            self.config, reactor=cast(IReactorFromThreads, reactor), threadpool=pool, clock=reactor
        )
        pool.start()
        self._auth_pool = pool
        return directory

    def _check_certificates(
        self, connectors: tuple[Connector, ...], tls: ServerTLSOptions
    ) -> None:
        """
        Generate missing certificates and load every TLS connector's into
        C{tls}, so a bad file stops the start (or the reload) rather than
        the first STARTTLS.
        """
        for connector in connectors:
            if not connector.enabled or connector.tls == "off" or connector.certificate is None:
                continue
            try:
                ensure_certificate(connector.certificate, connector.fqdn)
                tls(connector)
            except TLSSetupError as error:
                raise StartupError(f"connector {connector.name!r}: {error}") from None

    def _tls_options(self, connector: Connector) -> object | None:
        """The session factory's view: options, or C{None} when unusable now."""
        try:
            return self._tls(connector)
        except TLSSetupError as error:
            self._log.error(
                "TLS unavailable on connector {connector}: {problem}",
                connector=connector.name,
                problem=str(error),
            )
            return None

    def _listen(self) -> None:
        """Bind every planned socket, or none: on failure, close those bound."""
        plans = plan_sockets(self.config.connectors)
        if self._adopt is not None:
            self._adopt_sockets(plans, self._adopt)
            return
        try:
            for plan in plans:
                self._open(plan)
        except ListenError as error:
            self._log.error("{problem}", problem=str(error), binding=str(error.socket.binding))
            self._close_ports()
            raise

    def _adopt_sockets(self, plans: tuple[ListenSocket, ...], fds: tuple[int, ...]) -> None:
        """A worker's sockets: its parent's, inherited as C{fds} in plan order."""
        import socket as socketlib

        if len(plans) != len(fds):
            raise StartupError(f"{len(fds)} inherited socket(s) for {len(plans)} planned")
        for plan, fd in zip(plans, fds):
            family = socketlib.AF_INET6 if plan.binding.version == 6 else socketlib.AF_INET
            # adoptStreamPort duplicates the descriptor: the inherited one is closed.
            port = cast(Any, self._reactor).adoptStreamPort(fd, family, self._gate)
            os.close(fd)
            self._ports.append(port)
            self._plans.append(plan)

    def _open(self, plan: ListenSocket) -> None:
        self._ports.append(listen_on(self._reactor, plan, self._gate))
        self._plans.append(plan)
        self._log_listening(plan)

    def _log_listening(self, plan: ListenSocket) -> None:
        mode = ""
        if plan.binding.version == 6 and plan.binding.is_wildcard:
            mode = " (IPv6 only)" if plan.v6only else " (dual-stack)"
        self._log.info(
            "listening on {binding}{mode} for {connectors}",
            binding=str(plan.binding),
            mode=mode,
            connectors=", ".join(plan.connectors),
        )

    def _close_ports(self) -> list[Deferred[None]]:
        ports, self._ports, self._plans = self._ports, [], []
        self._gate.target = None
        waits: list[Deferred[None]] = []
        for port in ports:
            result = port.stopListening()
            if isinstance(result, Deferred):
                result.addErrback(
                    lambda failure: self._log.failure("closing a listener", failure)
                )
                waits.append(result)
        return waits

    def stopService(self) -> Deferred[None]:
        """
        Stop listening, finish the spool commits in progress, then stop
        delivery (which waits, bounded, for attempts in progress).

        @return: a Deferred firing when all of that is done.
        """
        return Deferred.fromCoroutine(self._stop())

    async def _stop(self) -> None:
        waits = self._close_ports()
        if waits:
            await DeferredList(waits, consumeErrors=True)
        self._log.info("stopped listening")
        # The workers drain their sessions while this process drains its own.
        workers, self._workers = self._workers, None
        workers_stopped = workers.stopService() if workers is not None else None
        # Sessions in progress finish (their commits reach the spool before
        # it closes); those still open after the grace are cut.
        await self._gate.sessions.drain(self._reactor, self._stop_grace)
        if workers_stopped is not None:
            # Before delivery stops: the workers' last messages are notified.
            await workers_stopped
        await _maybe(super().stopService())  # type: ignore[no-untyped-call]
        if self._spool is not None:
            # Commits already requested finish (their 250s go out); later
            # ones fail with 452 4.3.1, acknowledging nothing.
            await self._spool.close()
        if self._scheduler is not None:
            await self._scheduler.stop()
            self._scheduler = None
        if self._delivery is not None:
            await self._delivery.stopService()
            self._delivery = None
        if self._admin is not None:
            await self._admin.stop()
            self._admin = None
        if self._tracking is not None:
            # After delivery stopped: its last events are rows too.
            await self._tracking.stop()
            self._tracking = None
        for log in (self._receive_log, self._send_log):
            if log is not None:
                # After the sessions and deliveries: their last rows are written.
                await log.stop()
        self._receive_log = self._send_log = None
        if self._factory is not None:
            self._factory.doStop()  # type: ignore[no-untyped-call]
            self._factory = None
        self._release_routes()
        self._stop_auth_pool()
        self._spool = None
        self._copy_messages(None)
        self._log.info("relaygw stopped")

    def _release_routes(self) -> None:
        routes, self._routes = self._routes, None
        if routes is not None:
            routes.release()

    def _stop_auth_pool(self) -> None:
        pool, self._auth_pool = self._auth_pool, None
        if pool is not None:
            # Joins the workers; each directory call is bounded by its timeout.
            pool.stop()


async def _all(results: Iterable[object]) -> None:
    """Wait for every Deferred among C{results} (errors are logged, not raised)."""
    waits = [r for r in results if isinstance(r, Deferred)]
    if waits:
        for ok, failure in await DeferredList(waits, consumeErrors=True):
            if not ok:
                RelayGatewayService._log.failure("closing a listener", failure)


async def _maybe(result: object) -> None:
    if isinstance(result, Deferred):
        await result
