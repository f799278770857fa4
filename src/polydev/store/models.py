"""Tables. The seed's §11 (vms, auth_sessions, credentials, vm_cleanup_tasks, with the same status
vocabularies) plus users, api_tokens and runs. Every change here needs an Alembic revision."""

from __future__ import annotations

import uuid
from datetime import datetime, timezone
from typing import Any

from sqlalchemy import (
    BigInteger,
    Boolean,
    DateTime,
    Float,
    ForeignKey,
    Integer,
    MetaData,
    String,
    Text,
    TypeDecorator,
    UniqueConstraint,
    Uuid,
    false,
    true,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

# Status vocabularies, kept as data so the API, the metrics and the tests share them.
# The seed's three, plus the two an engine that can crash mid-way needs to say honestly.
VM_STATUSES = ("creating", "running", "hibernated", "destroyed", "failed")
VM_PURPOSES = ("cli", "browser")
AUTH_SESSION_STATUSES = (
    "initializing", "vm_created", "ready", "awaiting_user_auth", "completed", "failed", "timeout", "cancelled",
)
AUTH_SESSION_TERMINAL = ("completed", "failed", "timeout", "cancelled")
CLEANUP_STATUSES = ("pending", "processing", "completed", "failed")
RUN_STATUSES = ("queued", "running", "succeeded", "failed", "cancelled", "timeout")
USER_ROLES = ("admin", "user")
CREDENTIAL_KINDS = ("oauth", "api_key")


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


class Base(DeclarativeBase):
    # Named constraints keep Alembic migrations identical on SQLite and PostgreSQL.
    metadata = MetaData(naming_convention={
        "ix": "ix_%(column_0_label)s",
        "uq": "uq_%(table_name)s_%(column_0_name)s",
        "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
        "pk": "pk_%(table_name)s",
    })


class UTCDateTime(TypeDecorator[datetime]):
    """Timezone-aware UTC on every backend: SQLite stores no zone and hands back naive datetimes."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            value = value.replace(tzinfo=timezone.utc)
        return value.astimezone(timezone.utc)

    def process_result_value(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is not None and value.tzinfo is None:
            value = value.replace(tzinfo=timezone.utc)
        return value


Timestamp = UTCDateTime


class User(Base):
    __tablename__ = "users"

    id: Mapped[uuid.UUID] = mapped_column(Uuid, primary_key=True, default=uuid.uuid4)
    name: Mapped[str] = mapped_column(String(64), unique=True)
    role: Mapped[str] = mapped_column(String(16), default="user")
    created_at: Mapped[datetime] = mapped_column(Timestamp, default=utcnow)
    disabled: Mapped[bool] = mapped_column(Boolean, default=False)
    # The user's own quota limits (JSON object, polydev.core.quotas.LIMITS), set by admins; null: the defaults.
    quotas_json: Mapped[str | None] = mapped_column(Text, nullable=True)


class ApiToken(Base):
    __tablename__ = "api_tokens"

    id: Mapped[uuid.UUID] = mapped_column(Uuid, primary_key=True, default=uuid.uuid4)
    user_id: Mapped[uuid.UUID] = mapped_column(Uuid, ForeignKey("users.id", ondelete="CASCADE"), index=True)
    name: Mapped[str] = mapped_column(String(64))
    # SHA-256 of the token: tokens carry 256 random bits, so a fast hash is enough and lookups stay O(1).
    token_hash: Mapped[str] = mapped_column(String(64), unique=True)
    # The first characters, so a user can tell their tokens apart without the secret.
    prefix: Mapped[str] = mapped_column(String(16))
    created_at: Mapped[datetime] = mapped_column(Timestamp, default=utcnow)
    last_used_at: Mapped[datetime | None] = mapped_column(Timestamp, nullable=True)
    revoked_at: Mapped[datetime | None] = mapped_column(Timestamp, nullable=True)


class VmRecord(Base):
    """A VM's row (the engine's durable state); `polydev.vm.types.VM` is the engine's description of it."""

    __tablename__ = "vms"

    vm_id: Mapped[uuid.UUID] = mapped_column(Uuid, primary_key=True, default=uuid.uuid4)
    user_id: Mapped[uuid.UUID | None] = mapped_column(Uuid, ForeignKey("users.id", ondelete="SET NULL"),
                                                      nullable=True, index=True)
    # cli or browser (VM_PURPOSES). The column keeps the seed's name, `type`.
    purpose: Mapped[str] = mapped_column("type", String(16))
    status: Mapped[str] = mapped_column(String(16), index=True)
    ip_address: Mapped[str | None] = mapped_column(String(64), nullable=True)
    tap_device: Mapped[str | None] = mapped_column(String(32), nullable=True)
    vcpu_count: Mapped[int | None] = mapped_column(Integer, nullable=True)
    memory_mb: Mapped[int | None] = mapped_column(Integer, nullable=True)
    # The seed's firecracker_pid, named for what it is: the hypervisor process of whichever backend.
    backend_pid: Mapped[int | None] = mapped_column(Integer, nullable=True)
    backend: Mapped[str | None] = mapped_column(String(16), nullable=True)
    socket_path: Mapped[str | None] = mapped_column(String(255), nullable=True)
    workdir: Mapped[str | None] = mapped_column(String(255), nullable=True)  # overlay, sockets, console log
    agent_port: Mapped[int | None] = mapped_column(Integer, nullable=True)
    slot_index: Mapped[int | None] = mapped_column(Integer, nullable=True)
    expires_at: Mapped[datetime | None] = mapped_column(Timestamp, nullable=True, index=True)
    error_message: Mapped[str | None] = mapped_column(Text, nullable=True)
    cpu_usage_percent: Mapped[float | None] = mapped_column(Float, nullable=True)
    memory_usage_mb: Mapped[float | None] = mapped_column(Float, nullable=True)
    last_heartbeat: Mapped[datetime | None] = mapped_column(Timestamp, nullable=True)
    created_at: Mapped[datetime] = mapped_column(Timestamp, default=utcnow)
    destroyed_at: Mapped[datetime | None] = mapped_column(Timestamp, nullable=True)
    # The server process hosting it (`servers.id`); NULL for rows written before there was a registry.
    server_id: Mapped[uuid.UUID | None] = mapped_column(Uuid, nullable=True, index=True)


class AuthSession(Base):
    __tablename__ = "auth_sessions"

    session_id: Mapped[uuid.UUID] = mapped_column(Uuid, primary_key=True, default=uuid.uuid4)
    user_id: Mapped[uuid.UUID] = mapped_column(Uuid, ForeignKey("users.id", ondelete="CASCADE"), index=True)
    provider: Mapped[str] = mapped_column(String(32))
    status: Mapped[str] = mapped_column(String(32), index=True)
    browser_vm_id: Mapped[uuid.UUID | None] = mapped_column(Uuid, nullable=True)
    vm_ip: Mapped[str | None] = mapped_column(String(64), nullable=True)
    vnc_url: Mapped[str | None] = mapped_column(Text, nullable=True)
    auth_url: Mapped[str | None] = mapped_column(Text, nullable=True)
    error_message: Mapped[str | None] = mapped_column(Text, nullable=True)
    method: Mapped[str | None] = mapped_column(String(16), nullable=True)  # browser | device
    last_heartbeat: Mapped[datetime | None] = mapped_column(Timestamp, nullable=True)
    started_at: Mapped[datetime] = mapped_column(Timestamp, default=utcnow)
    completed_at: Mapped[datetime | None] = mapped_column(Timestamp, nullable=True)
    server_id: Mapped[uuid.UUID | None] = mapped_column(Uuid, nullable=True, index=True)  # the one driving it


class Credential(Base):
    __tablename__ = "credentials"
    __table_args__ = (UniqueConstraint("user_id", "provider", name="uq_credentials_user_provider"),)

    credential_id: Mapped[uuid.UUID] = mapped_column(Uuid, primary_key=True, default=uuid.uuid4)
    user_id: Mapped[uuid.UUID] = mapped_column(Uuid, ForeignKey("users.id", ondelete="CASCADE"), index=True)
    provider: Mapped[str] = mapped_column(String(32))
    kind: Mapped[str] = mapped_column(String(16), default="oauth")
    # The seed's four columns, base64 text; key_id names the master key that sealed the record.
    encrypted_credentials: Mapped[str] = mapped_column(Text)
    encryption_iv: Mapped[str] = mapped_column(Text)
    encryption_tag: Mapped[str] = mapped_column(Text)
    encryption_salt: Mapped[str] = mapped_column(Text)
    key_id: Mapped[str] = mapped_column(String(32), index=True)
    is_valid: Mapped[bool] = mapped_column(Boolean, default=True)
    created_at: Mapped[datetime] = mapped_column(Timestamp, default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(Timestamp, default=utcnow)
    last_validated: Mapped[datetime | None] = mapped_column(Timestamp, nullable=True)


class VmCleanupTask(Base):
    __tablename__ = "vm_cleanup_tasks"

    id: Mapped[uuid.UUID] = mapped_column(Uuid, primary_key=True, default=uuid.uuid4)
    vm_id: Mapped[uuid.UUID] = mapped_column(Uuid, index=True)
    session_id: Mapped[uuid.UUID | None] = mapped_column(Uuid, nullable=True)
    cleanup_at: Mapped[datetime] = mapped_column(Timestamp, index=True)
    status: Mapped[str] = mapped_column(String(16), default="pending", index=True)
    error_message: Mapped[str | None] = mapped_column(Text, nullable=True)
    completed_at: Mapped[datetime | None] = mapped_column(Timestamp, nullable=True)
    created_at: Mapped[datetime] = mapped_column(Timestamp, default=utcnow)


class Run(Base):
    """One prompt execution."""

    __tablename__ = "runs"

    id: Mapped[uuid.UUID] = mapped_column(Uuid, primary_key=True, default=uuid.uuid4)
    user_id: Mapped[uuid.UUID] = mapped_column(Uuid, ForeignKey("users.id", ondelete="CASCADE"), index=True)
    provider: Mapped[str] = mapped_column(String(32))
    status: Mapped[str] = mapped_column(String(16), default="queued", index=True)
    prompt: Mapped[str] = mapped_column(Text)
    vm_id: Mapped[uuid.UUID | None] = mapped_column(Uuid, nullable=True)
    exit_code: Mapped[int | None] = mapped_column(Integer, nullable=True)
    error_message: Mapped[str | None] = mapped_column(Text, nullable=True)
    created_at: Mapped[datetime] = mapped_column(Timestamp, default=utcnow)
    started_at: Mapped[datetime | None] = mapped_column(Timestamp, nullable=True)
    finished_at: Mapped[datetime | None] = mapped_column(Timestamp, nullable=True)
    # "<user>:<provider>" while the run is live, NULL once it ended. Unique, so the database itself refuses a
    # second live run on one stored credential (Codex refresh tokens are single-use: two VMs holding the
    # same auth.json would log each other out). NULLs never collide, on SQLite and PostgreSQL alike.
    live_key: Mapped[str | None] = mapped_column(String(80), nullable=True, unique=True)
    timeout_seconds: Mapped[int | None] = mapped_column(Integer, nullable=True)
    credential_kind: Mapped[str | None] = mapped_column(String(16), nullable=True)
    credential_refreshed: Mapped[bool] = mapped_column(Boolean, default=False)
    usage_json: Mapped[str | None] = mapped_column(Text, nullable=True)
    result_text: Mapped[str | None] = mapped_column(Text, nullable=True)
    server_id: Mapped[uuid.UUID | None] = mapped_column(Uuid, nullable=True, index=True)  # the one driving it
    # A turn of a conversation on a workspace (polydev.core.workspaces); NULL for a one-off run in a fresh VM.
    workspace_id: Mapped[uuid.UUID | None] = mapped_column(Uuid, nullable=True, index=True)
    conversation_id: Mapped[uuid.UUID | None] = mapped_column(Uuid, nullable=True, index=True)
    # "ws:<workspace>" while the turn is live, NULL once it ended: one live turn per workspace, as live_key
    # makes one live run per credential.
    turn_key: Mapped[str | None] = mapped_column(String(80), nullable=True, unique=True)
    # What the turn changed in the workspace (git, against the turn's start): [{path, status, binary}], and
    # the whole diff as a patch (binary files named, not included).
    changes_json: Mapped[str | None] = mapped_column(Text, nullable=True)
    patch: Mapped[str | None] = mapped_column(Text, nullable=True)


class RunEvent(Base):
    """One normalized event of a run, kept so a client that connects late (or reconnects with
    Last-Event-ID) sees the whole run."""

    __tablename__ = "run_events"

    run_id: Mapped[uuid.UUID] = mapped_column(Uuid, ForeignKey("runs.id", ondelete="CASCADE"), primary_key=True)
    seq: Mapped[int] = mapped_column(Integer, primary_key=True)
    type: Mapped[str] = mapped_column(String(16))
    data: Mapped[str] = mapped_column(Text)  # the event as JSON
    created_at: Mapped[datetime] = mapped_column(Timestamp, default=utcnow)


class NetworkLease(Base):
    """A network slot (one /31 of the address pool) held by a VM. The primary key makes leasing atomic
    across processes and replicas; rows outlive restarts, so a restart never hands out a slot in use."""

    __tablename__ = "network_leases"

    slot_index: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    vm_id: Mapped[uuid.UUID] = mapped_column(Uuid, unique=True)
    host_ip: Mapped[str] = mapped_column(String(64))
    leased_at: Mapped[datetime] = mapped_column(Timestamp, default=utcnow)


class Server(Base):
    """One server process of the deployment, from its start (a new id each time) to its stop or death.

    Its heartbeat says it is alive; its URL is where peers reach it (polydev.core.cluster); its capacity is
    what its host admits. `reaped_by` is set once, by the live server that ended what a dead one hosted."""

    __tablename__ = "servers"

    id: Mapped[uuid.UUID] = mapped_column(Uuid, primary_key=True)
    url: Mapped[str] = mapped_column(String(255))  # internal: peers only, never shown to users
    # Its data directory's id: a start on the same one knows its predecessors are dead.
    instance: Mapped[str] = mapped_column(String(128), index=True)
    vcpus: Mapped[int] = mapped_column(Integer)
    memory_mb: Mapped[int] = mapped_column(Integer)
    runs_vms: Mapped[bool] = mapped_column(Boolean)  # whether its VM engine started
    started_at: Mapped[datetime] = mapped_column(Timestamp, default=utcnow)
    heartbeat_at: Mapped[datetime] = mapped_column(Timestamp, default=utcnow)
    stopped_at: Mapped[datetime | None] = mapped_column(Timestamp, nullable=True)
    reaped_by: Mapped[uuid.UUID | None] = mapped_column(Uuid, nullable=True)
    reaped_at: Mapped[datetime | None] = mapped_column(Timestamp, nullable=True)


EGRESS_MODES = ("direct", "address", "proxy")


class EgressIdentity(Base):
    """How a user's VMs reach the outside (polydev.egress): the host's route, their own source address, or
    their upstream proxy, whose URL is sealed in `credentials` under the pseudo-provider `egress_proxy`.
    `address` is kept once assigned, whatever the mode later, so a user who comes back to `address` mode
    gets the same one; unique, so no two users ever share one."""

    __tablename__ = "egress_identities"

    user_id: Mapped[uuid.UUID] = mapped_column(Uuid, ForeignKey("users.id", ondelete="CASCADE"), primary_key=True)
    mode: Mapped[str] = mapped_column(String(16), default="direct")
    address: Mapped[str | None] = mapped_column(String(64), nullable=True, unique=True)
    limits_json: Mapped[str | None] = mapped_column(Text, nullable=True)  # the user's overrides of the defaults
    updated_at: Mapped[datetime] = mapped_column(Timestamp, default=utcnow)


class EgressUsage(Base):
    """Accounting per user, destination host and UTC day (the gateway's batches added up)."""

    __tablename__ = "egress_usage"
    __table_args__ = (UniqueConstraint("user_id", "host", "day", name="uq_egress_usage_user_host_day"),)

    id: Mapped[uuid.UUID] = mapped_column(Uuid, primary_key=True, default=uuid.uuid4)
    # NULL: traffic of VMs that belong to nobody yet (pre-started logins before a user takes one).
    user_id: Mapped[uuid.UUID | None] = mapped_column(Uuid, ForeignKey("users.id", ondelete="CASCADE"),
                                                      nullable=True, index=True)
    host: Mapped[str] = mapped_column(String(255))
    day: Mapped[str] = mapped_column(String(10))  # YYYY-MM-DD, UTC
    connections: Mapped[int] = mapped_column(Integer, default=0)
    bytes_up: Mapped[int] = mapped_column(BigInteger, default=0)
    bytes_down: Mapped[int] = mapped_column(BigInteger, default=0)
    refusals: Mapped[int] = mapped_column(Integer, default=0)
    last_refusal: Mapped[str | None] = mapped_column(Text, nullable=True)
    first_seen: Mapped[datetime] = mapped_column(Timestamp, default=utcnow)
    last_seen: Mapped[datetime] = mapped_column(Timestamp, default=utcnow)


SANDBOX_STATES = ("running", "paused", "killed")


class Sandbox(Base):
    """An E2B-compatible sandbox (polydev.core.sandboxes): one of the user's VMs under an E2B-style id.

    The envd access token must be answered again on every connect, so it is sealed by the vault (with the
    sandbox's env vars, which may hold secrets) under the pseudo-provider `sandbox:<id>`; `token_hash` lets
    each envd call be checked without opening the seal."""

    __tablename__ = "sandboxes"

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    user_id: Mapped[uuid.UUID] = mapped_column(Uuid, ForeignKey("users.id", ondelete="CASCADE"), index=True)
    vm_id: Mapped[uuid.UUID | None] = mapped_column(Uuid, nullable=True, index=True)
    template: Mapped[str] = mapped_column(String(64))
    state: Mapped[str] = mapped_column(String(16), index=True)  # SANDBOX_STATES
    metadata_json: Mapped[str] = mapped_column(Text, default="{}")
    token_hash: Mapped[str] = mapped_column(String(64))
    sealed: Mapped[str] = mapped_column(Text)  # JSON of the vault's SealedRecord: {"token", "envs"} inside
    cpu_count: Mapped[int] = mapped_column(Integer)
    memory_mb: Mapped[int] = mapped_column(Integer)
    auto_pause: Mapped[bool] = mapped_column(Boolean, default=False)
    # The pause at its timeout keeps its memory (processes run on after resume), or only its disk (a cold boot).
    auto_pause_memory: Mapped[bool] = mapped_column(Boolean, default=True, server_default=true())
    internet: Mapped[bool] = mapped_column(Boolean, default=True)
    started_at: Mapped[datetime] = mapped_column(Timestamp, default=utcnow)
    end_at: Mapped[datetime] = mapped_column(Timestamp, index=True)
    ended_at: Mapped[datetime | None] = mapped_column(Timestamp, nullable=True)


WORKSPACE_STATES = ("creating", "ready", "paused", "failed", "deleted")
WORKSPACE_SOURCES = ("empty", "archive", "git")


class Workspace(Base):
    """A project the CLIs work on across turns (polydev.core.workspaces): its files live on the disk of a VM of
    its own, under /workspace; the VM runs while it is used and is hibernated when idle."""

    __tablename__ = "workspaces"

    id: Mapped[uuid.UUID] = mapped_column(Uuid, primary_key=True, default=uuid.uuid4)
    user_id: Mapped[uuid.UUID] = mapped_column(Uuid, ForeignKey("users.id", ondelete="CASCADE"), index=True)
    name: Mapped[str] = mapped_column(String(100))
    source: Mapped[str] = mapped_column(String(16))  # WORKSPACE_SOURCES
    repo_url: Mapped[str | None] = mapped_column(Text, nullable=True)  # git: as given, never with a token in it
    branch: Mapped[str | None] = mapped_column(String(255), nullable=True)  # git: the one cloned (None: default)
    # git: the user's token for the repository (clone and push), sealed by the vault; never leaves it but into
    # the environment of the one git command that needs it.
    sealed_git_token: Mapped[str | None] = mapped_column(Text, nullable=True)
    state: Mapped[str] = mapped_column(String(16), index=True)  # WORKSPACE_STATES
    vm_id: Mapped[uuid.UUID | None] = mapped_column(Uuid, nullable=True, index=True)
    size_bytes: Mapped[int] = mapped_column(BigInteger, default=0)  # of /workspace, as last measured
    error: Mapped[str | None] = mapped_column(Text, nullable=True)
    # While its VM sleeps: the VM agent's token, sealed by the vault (the engine keeps tokens in memory only).
    sealed_agent: Mapped[str | None] = mapped_column(Text, nullable=True)
    # Paused with its memory (a hibernated VM: ~its RAM on disk), which count against the per-user limit;
    # past it a workspace is paused with its disk only and boots cold.
    paused_memory: Mapped[bool] = mapped_column(Boolean, default=False, server_default=false())
    created_at: Mapped[datetime] = mapped_column(Timestamp, default=utcnow)
    used_at: Mapped[datetime] = mapped_column(Timestamp, default=utcnow)  # the last call that needed its VM
    deleted_at: Mapped[datetime | None] = mapped_column(Timestamp, nullable=True)


class Conversation(Base):
    """Turns on a workspace that continue one provider CLI session: each turn's run resumes `cli_session`."""

    __tablename__ = "conversations"

    id: Mapped[uuid.UUID] = mapped_column(Uuid, primary_key=True, default=uuid.uuid4)
    user_id: Mapped[uuid.UUID] = mapped_column(Uuid, ForeignKey("users.id", ondelete="CASCADE"), index=True)
    workspace_id: Mapped[uuid.UUID] = mapped_column(Uuid, ForeignKey("workspaces.id", ondelete="CASCADE"),
                                                    index=True)
    provider: Mapped[str] = mapped_column(String(32))
    cli_session: Mapped[str | None] = mapped_column(String(200), nullable=True)  # the CLI's own session id
    turns: Mapped[int] = mapped_column(Integer, default=0)
    created_at: Mapped[datetime] = mapped_column(Timestamp, default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(Timestamp, default=utcnow)
