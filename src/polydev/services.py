"""Wiring: builds the store-layer objects from Settings once, for the API and the CLI alike.

The VM engine is wired separately (`start_vm_engine`): only the server runs VMs, and only the server may
reconcile, since reconcile kills every VM process of this data directory that it did not start itself.
CLI commands that work on the store use `open_services` and never touch VMs.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING

import structlog
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker

from polydev.config import Settings
from polydev.core.cluster import Cluster
from polydev.core.egress_admin import EgressAdmin
from polydev.core.image_follow import ImageFollower
from polydev.core.login_browser import LoginBrowser
from polydev.core.login_flow import LoginFlow
from polydev.core.login_sessions import LoginSessions
from polydev.core.quotas import Admission, Hold, HostCapacity, Kind, Quota
from polydev.core.run_flow import RunFlow
from polydev.core.sandbox_procs import ProcessTable
from polydev.core.sandboxes import Sandboxes
from polydev.core.vm_admin import VmAdmin
from polydev.core.vnc_tickets import VncTickets
from polydev.core.workspace_models import GitAccess
from polydev.core.workspace_models import Limits as WorkspaceLimits
from polydev.core.workspaces import Workspaces
from polydev.egress.limits import Limits
from polydev.providers.base import GuestEnv
from polydev.store import db
from polydev.store.auth_sessions import AuthSessionRepo
from polydev.store.conversations import ConversationRepo
from polydev.store.credentials import CredentialRepo
from polydev.store.egress import EgressRepo
from polydev.store.leases import LeaseRepo
from polydev.store.quotas import QuotaRepo
from polydev.store.runs import RunRepo
from polydev.store.sandboxes import SandboxRepo
from polydev.store.servers import ServerRepo
from polydev.store.sessions import SessionStore, create_session_store
from polydev.store.users import UserRepo
from polydev.store.vault import Vault, key_source_from_settings
from polydev.store.vms import VmRepo
from polydev.store.workspaces import WorkspaceRepo
from polydev.vm.disk_space import DiskSpace

if TYPE_CHECKING:  # the engine pulls in pyroute2 and the backends: loaded only when the server wires VMs
    from polydev.egress.service import EgressService
    from polydev.vm.engine import Backend, VMEngine
    from polydev.vm.network import SlotNetwork

log = structlog.get_logger(__name__)

BackendFactory = Callable[[Settings], "Backend"]


@dataclass
class Services:
    settings: Settings
    db_engine: AsyncEngine
    factory: async_sessionmaker[AsyncSession]
    vault: Vault
    # Short-lived shared state (live logins, VNC tickets, run signals): in-process, or Redis across replicas.
    session_store: SessionStore
    users: UserRepo
    credentials: CredentialRepo
    # Login sessions: their state (live in the session store, recorded in the database; `.repo` holds the
    # records); `login_flow` drives them.
    login_sessions: LoginSessions
    runs: RunRepo
    # The VM engine when this process runs VMs; None otherwise, with the reason in `engine_unavailable`
    # when the server tried and could not (no image, no QEMU, tap mode without root, ...).
    engine: VMEngine | None = None
    engine_unavailable: str | None = None
    # Where things live in the guest (home, working and login directories). Tests whose "guest" is an agent
    # on the host point these at a temporary directory.
    guest_paths: GuestEnv = field(default_factory=GuestEnv)
    login_flow: LoginFlow = None  # type: ignore[assignment]  # wired right after construction
    vnc_tickets: VncTickets = None  # type: ignore[assignment]
    terminal_tickets: VncTickets = None  # type: ignore[assignment]  # a workspace's terminal WebSocket
    run_flow: RunFlow = None  # type: ignore[assignment]
    vm_admin: VmAdmin = None  # type: ignore[assignment]  # the admin VM API's service
    # The egress gateway, when this process runs VMs that reach the outside through it (started with the
    # engine: EGRESS_GATEWAY=on, user networking, a backend that forwards its guests to it).
    egress: EgressService | None = None
    egress_admin: EgressAdmin = None  # type: ignore[assignment]  # each user's egress identity and accounting
    admission: Admission = None  # type: ignore[assignment]  # quotas and the host's capacity
    # This server among the others on the database: its id (new each start), registry entry and heartbeat.
    cluster: Cluster = None  # type: ignore[assignment]

    @property
    def server_id(self) -> uuid.UUID:
        return self.cluster.server_id

    # E2B-compatible sandboxes (api/e2b/): their rows and VMs, and the processes envd clients started in them.
    sandboxes: Sandboxes = None  # type: ignore[assignment]
    sandbox_procs: ProcessTable = field(default_factory=ProcessTable)
    workspaces: Workspaces = None  # type: ignore[assignment]
    image_follower: ImageFollower | None = None  # once the engine runs: follows `polydev image update`

    def engine_or_reason(self) -> tuple[VMEngine | None, str | None]:
        return self.engine, self.engine_unavailable

    def login_browser(self) -> LoginBrowser | None:
        """The in-VM login browser when LOGIN_BROWSER (and, for auto, the engine's image) says there is one."""
        mode = self.settings.login_browser
        if mode == "off" or self.engine is None:
            return None
        if mode == "auto":
            # Only an image whose manifest lists Chromium can run it; a backend without an image manifest
            # (a stand-in) counts as without. LOGIN_BROWSER=on overrides.
            if not self.engine.describe().has_login_browser:
                return None
        return LoginBrowser()

    async def admit(self, user_id: uuid.UUID, kind: Kind, purpose: str) -> Hold:
        """Quotas and the host's capacity for one more login, run or VM of `purpose` (cli or browser)."""
        return await self.admission.check(user_id, kind, *self.settings.vm_size(purpose))

    def guest_env(self, provider: str) -> GuestEnv:
        """How a VM for `provider` reaches the outside, per the settings."""
        from dataclasses import replace
        from urllib.parse import urlparse

        from polydev.providers.base import GUEST_CA_PATH

        s = self.settings
        base = s.provider_api_base_urls.get(provider)
        no_proxy = self.guest_paths.no_proxy
        host = urlparse(base).hostname if base else None
        forwarded = {str(f.guest_ip) for f in s.vm_guest_forwards}
        if host in forwarded and host not in no_proxy.split(","):
            # An API overridden onto a guest forward is reached directly; any other override goes through
            # the proxy (the gateway lets its host through for that provider: egress_hosts below).
            no_proxy += f",{host}"
        proxy = s.guest_https_proxy  # the operator's override wins over the gateway
        if proxy is None and self.egress is not None:
            proxy = f"http://{self.egress.guest_address}"
        return replace(self.guest_paths, https_proxy=proxy, no_proxy=no_proxy,
                       ca_cert_path=GUEST_CA_PATH if s.guest_ca_cert_file else None, api_base_url=base)

    async def close(self) -> None:
        # Flows first (they destroy their VMs), then VMs: destroying them updates their rows, so the
        # database must still be there.
        await self.sandboxes.close()
        await self.login_flow.close()
        await self.run_flow.close()
        await self.workspaces.close()  # (after the turns ended: pauses its running VMs, before the engine goes)
        if self.image_follower is not None:
            await self.image_follower.close()
        if self.engine is not None:
            engine, self.engine = self.engine, None
            await engine.close()
        if self.egress is not None:  # after the VMs: their tunnels end with them
            egress, self.egress = self.egress, None
            await egress.close()
        await self.cluster.stop()  # after the work it hosted has ended: then no peer has any to end
        await self.session_store.close()
        await self.db_engine.dispose()


def make_vault(settings: Settings) -> Vault:
    primary = settings.credential_encryption_key
    previous = settings.credential_encryption_previous_keys
    return Vault(key_source_from_settings(
        primary.get_secret_value() if primary else None,
        previous.get_secret_value() if previous else None,
        settings.master_key_file,
    ))


async def open_services(settings: Settings, *, migrate: bool = True) -> Services:
    # The data directory holds the database, the generated master key and the bootstrap token.
    settings.data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    engine = db.create_engine(settings.effective_database_url)
    try:
        if migrate:
            await db.migrate(engine)
        vault = make_vault(settings)
    except BaseException:
        await engine.dispose()
        raise
    factory = db.sessionmaker(engine)
    redis_url = settings.redis_url.get_secret_value() if settings.redis_url else None
    store = create_session_store(redis_url, settings.redis_session_ttl)
    server_id = uuid.uuid4()  # stamped on every VM, login and run this process creates
    svc = Services(
        settings=settings, db_engine=engine, factory=factory, vault=vault, session_store=store,
        users=UserRepo(factory, settings.auth_cache_seconds), credentials=CredentialRepo(factory, vault),
        login_sessions=LoginSessions(store, AuthSessionRepo(factory, server_id)), runs=RunRepo(factory, server_id),
    )
    ca_pem = settings.guest_ca_cert_file.read_bytes() if settings.guest_ca_cert_file else None
    capacity = HostCapacity.from_settings(settings)
    svc.admission = Admission(QuotaRepo(factory), Quota.from_settings(settings), capacity, server_id,
                              disk=DiskSpace(settings.data_dir, settings.host_min_free_disk_mb))
    svc.login_flow = LoginFlow(sessions=svc.login_sessions, credentials=svc.credentials, engine=svc.engine_or_reason,
                               guest_env=svc.guest_env, ca_pem=ca_pem, timeout=settings.login_timeout_seconds,
                               browser=svc.login_browser, pool=settings.login_pool,
                               pool_max_age=settings.login_pool_max_age_seconds, vault=vault, admit=svc.admit)
    svc.vnc_tickets = VncTickets(store, settings.vnc_ticket_seconds)
    svc.terminal_tickets = VncTickets(store, settings.vnc_ticket_seconds, prefix="terminal-ticket:")
    svc.run_flow = RunFlow(runs=svc.runs, credentials=svc.credentials, engine=svc.engine_or_reason,
                           guest_env=svc.guest_env, ca_pem=ca_pem, default_timeout=settings.run_timeout_seconds,
                           signals=store, admit=svc.admit)
    svc.vm_admin = VmAdmin(svc.engine_or_reason, default_ttl=timedelta(seconds=settings.vm_ttl_seconds),
                           admit=svc.admit)
    svc.cluster = Cluster(ServerRepo(factory), server_id=server_id, url=settings.internal_url,
                          instance=instance_of(settings), capacity=capacity,
                          interval=settings.server_heartbeat_seconds, peer_secret=vault.derive("peer hop"),
                          login_flow=svc.login_flow, run_flow=svc.run_flow, vms=VmRepo(factory, server_id),
                          leases=LeaseRepo(factory))
    svc.sandboxes = Sandboxes(SandboxRepo(factory), vault, svc.engine_or_reason, admit=svc.admit,
                              sizes=settings.vm_size, proxy=lambda: svc.guest_env("sandbox").https_proxy,
                              limit=settings.sandbox_limit_per_user, profile=settings.vm_image_profile,
                              default_user=settings.sandbox_default_user)
    svc.sandboxes.on_end.append(svc.sandbox_procs.forget)
    svc.workspaces = Workspaces(WorkspaceRepo(factory), vault, svc.engine_or_reason, admit=svc.admit,
                                limits=WorkspaceLimits(workspaces=settings.workspace_limit_per_user,
                                                       total_bytes=settings.workspace_bytes_per_user,
                                                       upload_bytes=settings.workspace_upload_max_bytes,
                                                       paused=settings.workspace_paused_per_user),
                                idle_pause_s=settings.workspace_idle_pause_seconds,
                                git=GitAccess(proxy=lambda: svc.guest_env("workspace").https_proxy, ca_pem=ca_pem,
                                              hosts=settings.workspace_git_hosts))
    svc.run_flow.workspaces = svc.workspaces
    svc.run_flow.conversations = ConversationRepo(factory)
    svc.egress_admin = EgressAdmin(
        EgressRepo(factory, svc.credentials), svc.users, settings.egress_address_pool,
        Limits.from_settings(settings),
        # A change applies to the gateway's next tunnel, not after its route cache expires.
        on_change=lambda user_id: svc.egress.forget(user_id) if svc.egress is not None else None)
    return svc


def instance_of(settings: Settings) -> str:
    """This server's data directory, by an id kept in it: a server that starts on the same one knows its
    earlier starts are gone (their VMs die with the engine's start-up reconcile). An id of its own rather than
    the host name and path, which two hosts may share."""
    path = settings.data_dir / "server.instance"
    try:
        return path.read_text().strip() or _new_instance(path)
    except FileNotFoundError:
        return _new_instance(path)


def _new_instance(path: Path) -> str:
    value = str(uuid.uuid4())
    path.write_text(value + "\n")
    return value


def slot_network(settings: Settings) -> SlotNetwork:
    """The tap mode's slot pool, or BackendUnavailable saying what is missing. Building it changes nothing
    on the machine; slots are made per VM."""
    from polydev.vm.backends import BackendUnavailable
    from polydev.vm.engine import engine_tag
    from polydev.vm.network import EGRESS_PORT, NetworkError, SlotNetwork

    if os.geteuid() != 0:
        raise BackendUnavailable("NETWORK_MODE=tap needs root (network namespaces, TAPs, nftables); "
                                 "run as root or use NETWORK_MODE=user")
    try:
        # The prefix carries the engine's tag, so a second Polydev on this machine (another data directory,
        # a test run) never reclaims this one's slots: reclaim removes every slot with its prefix.
        return SlotNetwork(settings.network_ip_pool_start, settings.network_ip_pool_end,
                           prefix="p" + engine_tag(settings.data_dir)[:5],
                           egress_port=EGRESS_PORT if settings.egress_gateway == "on" else None)
    except (NetworkError, ValueError) as exc:
        raise BackendUnavailable(f"bad NETWORK_IP_POOL_START..END: {exc}") from None


def build_vm_engine(services: Services, backend_factory: BackendFactory | None = None) -> VMEngine:
    """A VM engine from the settings; BackendUnavailable (with the reason) when this machine cannot run one."""
    from polydev.store.vms import CleanupTaskRepo
    from polydev.vm.backends import create_backend
    from polydev.vm.engine import VMEngine

    s = services.settings
    network = slot_network(s) if s.network_mode == "tap" else None
    backend = (backend_factory or create_backend)(s)
    # The gateway's address as the guests see it: the slots' (tap), or the one QEMU's user networking
    # forwards to each VM's own socket; none (Firecracker without slots) means no gateway to reach.
    guest_address = network.egress_guest_address if network is not None else backend.describe().egress_guest_address
    if s.egress_gateway == "on" and guest_address:
        services.egress = services.egress or build_egress(services, guest_address)
    return VMEngine(backend=backend, vms=VmRepo(services.factory, services.server_id), cleanup=CleanupTaskRepo(services.factory),
                    leases=LeaseRepo(services.factory), data_dir=s.data_dir, network=network,
                    vcpus={p: s.vm_size(p)[0] for p in ("cli", "browser")},
                    memory_mb={p: s.vm_size(p)[1] for p in ("cli", "browser")},
                    keep_failed=s.debug_keep_failed_vms, pool_size=s.vm_warm_pool_size,
                    pool_prepare=services.run_flow.prepare_vm,
                    egress=services.egress.hook if services.egress is not None else None,
                    min_free_disk_mb=s.host_min_free_disk_mb)


def build_egress(services: Services, guest_address: str | None = None) -> EgressService:
    """The egress gateway for this server's VMs; its sockets live in a short runtime directory (a Unix
    socket path has 108 bytes at most), named for the data directory like the engine's processes."""
    import tempfile

    from polydev.egress.service import EgressService
    from polydev.providers import ADAPTERS
    from polydev.vm.proc import engine_tag

    s = services.settings
    run_dir = Path(tempfile.gettempdir()) / f"polydev-egress-{engine_tag(s.data_dir)[:10]}"
    return EgressService(s, EgressRepo(services.factory, services.credentials),
                         {name: egress_hosts(adapter.egress_hosts, s.provider_api_base_urls.get(name))
                          for name, adapter in ADAPTERS.items()}, run_dir,
                         guest_address=guest_address)


def egress_hosts(hosts: Mapping[str, tuple[str, ...]], api_base_url: str | None) -> dict[str, tuple[str, ...]]:
    """A provider's allow-list per purpose, with the host of its API base-URL override (PROVIDER_API_BASE_URLS)
    added to every purpose: the operator sent the CLI there."""
    from urllib.parse import urlparse

    extra = urlparse(api_base_url).hostname if api_base_url else None
    if not extra:
        return dict(hosts)
    return {purpose: names if extra in names else (*names, extra) for purpose, names in hosts.items()}


async def start_vm_engine(services: Services, backend_factory: BackendFactory | None = None,
                          keep: Collection[uuid.UUID] = ()) -> None:
    """Build the engine, reclaim what an earlier run left behind (leaving the VM rows of the live servers
    in `keep` alone), start the reaper. Never raises for a machine that cannot run VMs: the API must keep
    serving credentials, so the engine is then None and the reason is kept for /health and for the VM
    routes' 503s."""
    from polydev.vm.backends import BackendUnavailable

    try:
        engine = build_vm_engine(services, backend_factory)
    except BackendUnavailable as exc:
        services.engine_unavailable = str(exc)
        log.warning("vm_engine_unavailable", reason=str(exc))
        return
    except Exception as exc:  # a broken backend module or setting: still serve the rest of the API
        services.engine_unavailable = f"{type(exc).__name__}: {exc}"
        log.error("vm_engine_failed", reason=services.engine_unavailable, exc_info=exc)
        return
    try:
        if services.egress is not None:
            await services.egress.start()
        engine.keeps_disk = services.workspaces.holds_vm  # before reconcile: a lost workspace VM's disk stays
        counts = await engine.reconcile(keep)
    except Exception as exc:
        # Without a successful reconcile, orphans may still hold slots and addresses: refuse to create more.
        services.engine_unavailable = f"start-up reconcile failed: {exc}"
        log.error("vm_engine_failed", reason=services.engine_unavailable, exc_info=exc)
        await engine.close(destroy_all=False)
        if services.egress is not None:
            egress, services.egress = services.egress, None
            await egress.close()
        return
    engine.start_reaper()
    engine.start_pool()
    services.login_flow.start_pool()
    services.engine = engine
    services.image_follower = ImageFollower(
        lambda: services.engine, services.login_flow.renew_pool, cache_dir=services.settings.cache_dir,
        data_dir=services.settings.data_dir, profile=services.settings.vm_image_profile,
        pinned=bool(services.settings.cli_versions))
    services.image_follower.start()
    services.engine_unavailable = None
    log.info("vm_engine_started", backend=engine.backend.name, network_mode=services.settings.network_mode,
             accel=engine.describe().accel, reclaimed=counts)
