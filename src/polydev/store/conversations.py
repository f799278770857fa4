"""Conversation rows: which CLI session a workspace's turns with one provider continue."""

from __future__ import annotations

import uuid
from typing import Any

from sqlalchemy import delete, select, update
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from polydev.store.db import session_scope
from polydev.store.models import Conversation, utcnow


class ConversationRepo:
    def __init__(self, factory: async_sessionmaker[AsyncSession]) -> None:
        self._factory = factory

    async def create(self, user_id: uuid.UUID, workspace_id: uuid.UUID, provider: str) -> Conversation:
        row = Conversation(user_id=user_id, workspace_id=workspace_id, provider=provider, turns=0)
        async with session_scope(self._factory) as s:
            s.add(row)
        return row

    async def delete(self, conversation_id: uuid.UUID) -> None:
        async with session_scope(self._factory) as s:
            await s.execute(delete(Conversation).where(Conversation.id == conversation_id))

    async def get_owned(self, user_id: uuid.UUID, conversation_id: uuid.UUID) -> Conversation | None:
        async with self._factory() as s:
            return await s.scalar(select(Conversation).where(Conversation.id == conversation_id,
                                                             Conversation.user_id == user_id))

    async def for_workspace(self, workspace_id: uuid.UUID) -> list[Conversation]:
        async with self._factory() as s:
            return list(await s.scalars(select(Conversation).where(Conversation.workspace_id == workspace_id)
                                        .order_by(Conversation.created_at, Conversation.id)))

    async def turn_done(self, conversation_id: uuid.UUID, cli_session: str | None) -> None:
        """One more turn; the CLI's session id is kept from the first turn that reported one."""
        values: dict[str, Any] = {"turns": Conversation.turns + 1, "updated_at": utcnow()}
        async with session_scope(self._factory) as s:
            row = await s.get(Conversation, conversation_id)
            if row is not None and row.cli_session is None and cli_session:
                values["cli_session"] = cli_session[:200]
            await s.execute(update(Conversation).where(Conversation.id == conversation_id).values(**values))
