"""Settings from the environment.

Names follow the seed's Appendix B where they apply (PORT, DATABASE_URL, REDIS_URL, REDIS_SESSION_TTL,
CREDENTIAL_ENCRYPTION_KEY, VM_*, NETWORK_*, FIRECRACKER_*). Everything has an embedded default so that a
bare `polydev serve` works: SQLite under the data directory, the in-process session store and a master
key generated into the data directory.
"""

from __future__ import annotations

import os
from functools import lru_cache
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from polydev.config.cli_versions import CliVersions, check_cli_versions, format_cli_versions, parse_cli_versions
from polydev.config.egress import AddressPool
from polydev.config.forwards import GuestForward, format_guest_forwards, parse_guest_forwards
from polydev.config.login_pool import LoginPoolSizes, check_login_pool, format_login_pool, parse_login_pool

PROVIDERS: tuple[str, ...] = ("claude_code", "codex", "gemini_cli")


def _default_data_dir() -> Path:
    # Root installs keep state with the system; a developer's run keeps it in their home.
    if os.geteuid() == 0:
        return Path("/var/lib/polydev")
    return Path.home() / ".local" / "share" / "polydev"


def _default_cache_dir() -> Path:
    if os.geteuid() == 0:
        return Path("/var/cache/polydev")
    return Path.home() / ".cache" / "polydev"


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_file=None, extra="ignore", case_sensitive=False)

    # Server
    host: str = Field("127.0.0.1", description="address the API listens on")
    port: int = Field(4000, ge=1, le=65535)
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    max_request_bytes: int = Field(1024 * 1024, ge=1024, description="larger request bodies answer 413")
    body_timeout_seconds: float = Field(15.0, gt=0, le=600, description="a request body not received in full "
                                        "this long after its headers answers 408 and its connection is closed")
    auth_cache_seconds: float = Field(5.0, ge=0, description="how long a checked API token is trusted without "
                                      "asking the database; bounds how late another replica sees a revocation")
    # More than one server on one database (polydev.core.cluster): where peers reach this one, and how often
    # it says it is alive (one silent for 3 intervals is taken for dead and its work ended on the others).
    server_url: str | None = Field(None, description="this server's internal URL for its peers; default "
                                   "http://HOST:PORT (0.0.0.0 and :: as loopback)")
    server_heartbeat_seconds: float = Field(5.0, gt=0, le=300, description="how often a server renews its "
                                            "entry in the registry")
    data_dir: Path = Field(default_factory=_default_data_dir, validation_alias="POLYDEV_DATA_DIR")
    cache_dir: Path = Field(default_factory=_default_cache_dir, validation_alias="POLYDEV_CACHE_DIR")
    # Where `polydev web vendor` unpacks the dashboard's noVNC; unset means POLYDEV_CACHE_DIR/web.
    web_vendor_dir: Path | None = Field(None, validation_alias="POLYDEV_WEB_VENDOR_DIR")

    # Database: unset means SQLite in the data directory.
    database_url: SecretStr | None = None

    # Session store: unset REDIS_URL means the in-process store.
    redis_url: SecretStr | None = None
    redis_session_ttl: int = Field(600, ge=1, description="seconds a login session lives without activity")

    # Credentials: base64 of 32 bytes. Unset means a key file generated in the data directory.
    credential_encryption_key: SecretStr | None = None
    # Older master keys, comma separated, kept for reading during a rotation.
    credential_encryption_previous_keys: SecretStr | None = None

    # VM sizing (seed Appendix B)
    vm_backend: Literal["qemu", "firecracker"] = "qemu"
    vm_browser_vcpu: int = Field(2, ge=1)
    vm_browser_memory_mb: int = Field(4096, ge=256)
    vm_cli_vcpu: int = Field(1, ge=1)
    vm_cli_memory_mb: int = Field(2048, ge=256)
    vm_image_profile: Literal["test", "full"] = Field("full", description="golden image the engine boots")
    vm_warm_pool_size: int = Field(0, ge=0, description="restored VMs kept ready to hand out")
    vm_ttl_seconds: int = Field(1800, ge=10, description="default lifetime of a VM before the reaper takes it")
    # User networking only: GUEST_IP:PORT=HOST_IP:PORT,... — the host loopback services a guest may reach
    # (NoDecode: the environment value is this list syntax, not JSON).
    vm_guest_forwards: Annotated[tuple[GuestForward, ...], NoDecode] = Field(
        (), description="guest addresses in 10.0.2.0/24 forwarded to host loopback services")

    # Network (seed Appendix B); the pool addresses are the host ends of per-VM slots.
    # user: QEMU user networking, agent port forwarded to 127.0.0.1 (no root needed).
    # tap: a network namespace per VM with nftables isolation (root; production).
    network_mode: Literal["user", "tap"] = "user"
    network_bridge: str = "fc-br0"
    network_ip_pool_start: str = "192.168.100.2"
    network_ip_pool_end: str = "192.168.100.254"

    # Firecracker backend
    firecracker_binary: Path = Path("/usr/local/bin/firecracker")
    firecracker_base: Path = Path("/var/lib/firecracker")
    firecracker_golden_rootfs: Path | None = None
    firecracker_golden_kernel: Path | None = None
    # Optional: run Firecracker under its jailer (chroot under FIRECRACKER_BASE, own uid/gid, --new-pid-ns).
    firecracker_jailer: Path | None = None
    firecracker_jailer_uid: int | None = Field(None, ge=1, description="uid the jailed VMM runs as (not root)")
    firecracker_jailer_gid: int | None = Field(None, ge=1)

    debug_keep_failed_vms: bool = False

    def vm_size(self, purpose: str) -> tuple[int, int]:
        """(vCPUs, MiB of memory) of a VM of `purpose`: browser (the login browser's) or cli."""
        if purpose == "browser":
            return self.vm_browser_vcpu, self.vm_browser_memory_mb
        return self.vm_cli_vcpu, self.vm_cli_memory_mb

    # Provider flows (login and runs)
    login_timeout_seconds: int = Field(300, ge=10, le=3600, description="a login session not completed "
                                       "by then is ended as timeout and its VM destroyed")
    # The login browser (Xtigervnc + Chromium in a `browser` VM, shown to the user over the VNC WebSocket).
    # auto: on when the image the engine boots has Chromium (the full profile), off otherwise (the test image:
    # logins then finish by the CLI's callback, a pasted code or a device code).
    login_browser: Literal["auto", "on", "off"] = "auto"
    # Pre-started logins (core/login_pool.py): per provider and login method, logins kept driven up to their
    # URL for the next user, e.g. "claude_code=1,codex:device=1" (no method: the provider's default one;
    # parsed by config/login_pool.py). Each holds a VM and a CLI. One nobody takes within the max age is
    # replaced: keep that below what the CLI and the provider allow a login (Codex's device code lasts 15
    # minutes) minus the user's time. (NoDecode: the environment value is this list syntax, not JSON.)
    login_pool: Annotated[LoginPoolSizes, NoDecode] = Field(default_factory=dict)
    # POLYDEV_CLI_VERSIONS (config/cli_versions.py): the CLIs' versions in the image where they differ from the
    # release's tested ones, e.g. `claude_code=2.1.210,codex=latest`.
    cli_versions: Annotated[CliVersions, NoDecode] = Field(default_factory=dict, validation_alias="POLYDEV_CLI_VERSIONS")
    login_pool_max_age_seconds: int = Field(300, ge=30, le=3600, description="a pre-started login nobody "
                                            "took by then is ended and replaced")
    vnc_ticket_seconds: int = Field(30, ge=1, le=60, description="lifetime of a single-use VNC WebSocket ticket")
    run_timeout_seconds: int = Field(900, ge=10, description="default time limit of a run")
    run_max_timeout_seconds: int = Field(3600, ge=10, description="largest `timeout` a run request may ask")
    max_prompt_bytes: int = Field(100_000, ge=1, description="longer prompts answer 413")
    max_run_files_bytes: int = Field(4 * 1024 * 1024, ge=0, description="total size of files sent with a run")
    # How the CLIs in a VM reach the outside: an HTTPS proxy as the guest sees it (in user networking, a
    # VM_GUEST_FORWARDS address), an extra CA the CLIs trust, and per-provider API base URLs (JSON object,
    # e.g. {"claude_code": "http://10.0.2.101"}); all unset means the CLIs' defaults.
    guest_https_proxy: str | None = None
    guest_ca_cert_file: Path | None = None
    provider_api_base_urls: dict[str, str] = Field(default_factory=dict)
    # The egress gateway (polydev.egress): every VM's outbound traffic as CONNECT tunnels through the host,
    # checked against the allow-list and the user's limits, leaving by the user's own egress identity. The
    # guests reach it at EGRESS_GUEST_ADDRESS (user networking; QEMU forwards it to the VM's own socket).
    # off: the VMs reach only what GUEST_HTTPS_PROXY and VM_GUEST_FORWARDS give them.
    egress_gateway: Literal["on", "off"] = "on"
    egress_guest_address: str = Field("10.0.2.99:3128", description="the gateway as a guest reaches it")
    egress_address_pool: Annotated[AddressPool, NoDecode] = Field(default_factory=AddressPool)
    egress_allow: Annotated[tuple[str, ...], NoDecode] = Field((), description="host names (or *.suffix) "
                                                               "every VM may reach, beside the providers' own")
    egress_sandbox_open: bool = Field(False, description="sandbox VMs may reach any public host on 80/443")
    sandbox_limit_per_user: int = Field(20, ge=0, description="E2B sandboxes a user may have running or paused")
    sandbox_default_user: str = Field("user", pattern=r"^[a-z_][a-z0-9_-]{0,31}$",
                                      description="E2B sandboxes: the guest account a call runs as when it names "
                                                  "none (E2B's is `user`, home /home/user; `root` also exists)")
    # Workspaces (polydev.core.workspaces): projects the CLIs work on across turns, each on a VM of its own.
    workspace_limit_per_user: int = Field(10, ge=0, description="workspaces a user may have")
    workspace_bytes_per_user: int = Field(5 * 1024**3, ge=0, description="bytes all of a user's workspaces "
                                          "may hold (as last measured)")
    workspace_upload_max_bytes: int = Field(100 * 1024**2, ge=1, description="the largest archive a workspace "
                                            "may be made from")
    workspace_idle_pause_seconds: int = Field(600, ge=1, description="a workspace unused this long has its VM "
                                              "paused (hibernated) until it is next used")
    workspace_paused_per_user: int = Field(3, ge=0, description="workspaces a user may have paused with their "
                                           "memory saved; past it the next is paused with its disk only and "
                                           "boots cold when used")
    workspace_git_hosts: Annotated[tuple[str, ...], NoDecode] = Field(
        ("github.com", "gitlab.com", "bitbucket.org", "codeberg.org"),
        description="git hosts (or *.suffix) workspaces may be cloned from and pushed to, through the egress "
                    "gateway (HTTPS)")
    sandbox_domain: str | None = Field(None, pattern=r"^[a-z0-9.-]+(:[0-9]+)?$", description="E2B sandboxes: "
                                       "the domain whose wildcard DNS (49983-{id}.DOMAIN) reaches this server")
    # Names answered without DNS, JSON {"name": ["address", ...]}: trusted as given (the address checks do not
    # apply), for an operator's own services and the tests' stand-ins.
    egress_hosts: dict[str, list[str]] = Field(default_factory=dict)
    # dns: other names are looked up on the host. pinned: only EGRESS_HOSTS is answered, every other name or
    # address is refused without a DNS query (a closed world: the tests, an air-gapped host).
    egress_resolve: Literal["dns", "pinned"] = "dns"
    egress_limit_concurrent: int = Field(64, ge=1, description="open tunnels per user")
    egress_limit_per_minute: int = Field(600, ge=1, description="new tunnels per user per minute")
    egress_limit_bytes_per_day: int = Field(20 * 1024**3, ge=0, description="bytes per user per UTC day")

    # Quotas per user (admins override them per user) and the host's admission control (polydev.core.quotas).
    quota_vms: int = Field(4, ge=0, description="live VMs per user")
    quota_logins: int = Field(2, ge=0, description="logins in progress per user")
    quota_runs: int = Field(4, ge=0, description="runs in progress per user")
    quota_vcpus: int = Field(8, ge=0, description="vCPUs of a user's live VMs")
    quota_memory_mb: int = Field(16384, ge=0, description="MiB of memory of a user's live VMs")
    # 0: read off the machine (its CPUs × HOST_VCPU_OVERCOMMIT; its memory less HOST_RESERVED_MEMORY_MB).
    host_vcpus: int = Field(0, ge=0, description="vCPUs all live VMs may hold")
    host_vcpu_overcommit: float = Field(4.0, gt=0)
    host_memory_mb: int = Field(0, ge=0, description="MiB all live VMs may hold")
    host_reserved_memory_mb: int = Field(2048, ge=0, description="MiB kept for the host itself")
    # VMs' disks grow into the data directory: below this much free space no new VM is admitted (0: no check).
    host_min_free_disk_mb: int = Field(1024, ge=0, description="MiB the data directory keeps free")

    @field_validator("database_url", "redis_url", "credential_encryption_key", "server_url",
                     "credential_encryption_previous_keys", "guest_https_proxy", "guest_ca_cert_file",
                     mode="before")
    @classmethod
    def _empty_is_unset(cls, value: Any) -> Any:
        if isinstance(value, str) and not value.strip():
            return None
        return value

    @field_validator("egress_address_pool", mode="before")
    @classmethod
    def _parse_address_pool(cls, value: Any) -> Any:
        return AddressPool.parse(value) if isinstance(value, str) else value

    @field_validator("egress_allow", "workspace_git_hosts", mode="before")
    @classmethod
    def _comma_list(cls, value: Any) -> Any:
        return tuple(v.strip().lower() for v in value.split(",") if v.strip()) if isinstance(value, str) else value

    @field_validator("provider_api_base_urls", "egress_hosts", mode="before")
    @classmethod
    def _json_object(cls, value: Any) -> Any:
        if isinstance(value, str):
            import json

            return json.loads(value) if value.strip() else {}
        return value

    @field_validator("provider_api_base_urls")
    @classmethod
    def _known_providers(cls, value: dict[str, str]) -> dict[str, str]:
        unknown = sorted(set(value) - set(PROVIDERS))
        if unknown:
            raise ValueError(f"unknown provider(s) {', '.join(unknown)}; use {', '.join(PROVIDERS)}")
        return value

    @field_validator("cli_versions", mode="before")
    @classmethod
    def _parse_cli_versions(cls, value: Any) -> Any:
        return parse_cli_versions(value) if isinstance(value, str) else value

    @field_validator("cli_versions")
    @classmethod
    def _check_cli_versions(cls, value: CliVersions) -> CliVersions:
        return check_cli_versions(value, PROVIDERS)

    @field_validator("login_pool", mode="before")
    @classmethod
    def _parse_login_pool(cls, value: Any) -> Any:
        return parse_login_pool(value) if isinstance(value, str) else value

    @field_validator("login_pool")
    @classmethod
    def _check_login_pool(cls, value: LoginPoolSizes) -> LoginPoolSizes:
        return check_login_pool(value, PROVIDERS)

    @field_validator("vm_guest_forwards", mode="before")
    @classmethod
    def _parse_guest_forwards(cls, value: Any) -> Any:
        return parse_guest_forwards(value) if isinstance(value, str) else value

    @property
    def effective_database_url(self) -> str:
        """The SQLAlchemy async URL, with the driver filled in for plain postgres/sqlite URLs."""
        if self.database_url is None:
            return f"sqlite+aiosqlite:///{self.data_dir / 'polydev.db'}"
        return normalize_database_url(self.database_url.get_secret_value())

    @property
    def internal_url(self) -> str:
        """Where the other servers of the deployment reach this one (SERVER_URL, or HOST:PORT)."""
        if self.server_url:
            return self.server_url.rstrip("/")
        host = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(self.host, self.host)
        return f"http://[{host}]:{self.port}" if ":" in host else f"http://{host}:{self.port}"

    @property
    def session_store_kind(self) -> str:
        return "redis" if self.redis_url else "memory"

    @property
    def master_key_file(self) -> Path:
        return self.data_dir / "master.keys"

    def redacted(self) -> dict[str, Any]:
        """The effective configuration with every secret replaced, for `polydev config`."""
        out: dict[str, Any] = {}
        for name in type(self).model_fields:
            value = getattr(self, name)
            if isinstance(value, SecretStr):
                value = "********"
            elif isinstance(value, Path):
                value = str(value)
            elif name == "vm_guest_forwards":
                value = format_guest_forwards(value)
            elif name == "login_pool":
                value = format_login_pool(value)
            elif name == "cli_versions":
                value = format_cli_versions(value)
            elif name == "egress_address_pool":
                value = value.describe()
            elif name in ("egress_allow", "workspace_git_hosts"):
                value = ",".join(value)
            prefixed = name in ("data_dir", "cache_dir", "web_vendor_dir", "cli_versions")  # their variables start POLYDEV_
            out[f"POLYDEV_{name.upper()}" if prefixed else name.upper()] = value
        out["DATABASE_URL"] = redact_url(self.effective_database_url)
        if self.redis_url is not None:
            out["REDIS_URL"] = redact_url(self.redis_url.get_secret_value())
        out["SESSION_STORE"] = self.session_store_kind
        out["CREDENTIAL_ENCRYPTION_KEY"] = (
            "******** (from environment)" if self.credential_encryption_key
            else f"(generated, kept in {self.master_key_file})"
        )
        return out


def normalize_database_url(url: str) -> str:
    """Accept the URLs operators write (postgres://, postgresql://, sqlite:///) and pick async drivers."""
    from sqlalchemy.engine import (
        make_url,  # imported here: SQLAlchemy costs ~0.3 s, and most commands never need it
    )

    if url.startswith("postgres://"):
        url = "postgresql://" + url[len("postgres://"):]
    parsed = make_url(url)
    backend = parsed.get_backend_name()
    if backend == "postgresql" and parsed.drivername == "postgresql":
        parsed = parsed.set(drivername="postgresql+asyncpg")
    elif backend == "sqlite" and parsed.drivername == "sqlite":
        parsed = parsed.set(drivername="sqlite+aiosqlite")
    elif backend not in ("postgresql", "sqlite"):
        raise ValueError(f"unsupported database {backend!r}: use postgresql:// or sqlite:///")
    return parsed.render_as_string(hide_password=False)


def redact_url(url: str) -> str:
    from sqlalchemy.engine import make_url

    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:  # not a URL SQLAlchemy understands (e.g. redis://): strip userinfo by hand
        if "@" in url and "://" in url:
            scheme, rest = url.split("://", 1)
            return f"{scheme}://***@{rest.split('@', 1)[1]}"
        return url


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    return Settings()
