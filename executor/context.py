"""Everything an executor process shares between its runs, opened and closed in one place."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

from common.nats_link import NatsLink
from common.settings import Settings
from common.tls import ssl_context
from eventstore.agents import AgentCatalog
from eventstore.conversations import ConversationLog
from eventstore.persistence import StoreConfig
from eventstore.run_list import RunList
from eventstore.run_store import RunStore
from executor.agent_cache import AgentCache
from executor.extensions import load_extensions
from executor.models import ModelProviders
from executor.tools import Tools


@dataclass
class ExecutorContext:
    settings: Settings
    store: StoreConfig
    agents: AgentCatalog
    conversations: ConversationLog
    run_list: RunList
    run_store: RunStore
    link: NatsLink
    models: ModelProviders
    agent_cache: AgentCache
    tools: Tools

    @property
    def executor_id(self) -> str:
        return self.settings.executor_id

    @staticmethod
    async def open(settings: Settings, *, nats_wait: float = 2.0) -> ExecutorContext:
        load_extensions()  # before anything validates an agent or creates the providers
        store = StoreConfig.from_url(settings.database_url, settings.data_dir)

        def open_store() -> tuple[RunList, AgentCatalog, ConversationLog, RunStore]:
            with store.creating_tables():
                return (
                    RunList(store),
                    AgentCatalog(store),
                    ConversationLog(store),
                    RunStore(store),
                )

        run_list, agents, conversations, run_store = await asyncio.to_thread(open_store)
        link = NatsLink(
            list(settings.nats_urls),
            name=settings.executor_id,
            event_retention=settings.event_retention,
            names=settings.nats_names,
            replicas=settings.nats_replicas,
            tls=(
                ssl_context(settings.nats_tls_ca, settings.nats_tls_cert, settings.nats_tls_key)
                if settings.nats_tls
                else None
            ),
            limits=settings.stream_limits,
        )
        agent_cache = AgentCache(link)
        await agent_cache.start()
        await link.start(wait=nats_wait)
        return ExecutorContext(
            settings=settings,
            store=store,
            agents=agents,
            conversations=conversations,
            run_list=run_list,
            run_store=run_store,
            link=link,
            models=ModelProviders(),
            agent_cache=agent_cache,
            tools=Tools(
                settings.data_dir,
                url_allow=settings.tool_url_allow,
                max_output_bytes=settings.max_tool_output_bytes,
            ),
        )

    async def close(self) -> None:
        await self.link.close()
        await self.models.aclose()
        await self.tools.aclose()

        def close_store() -> None:
            self.agents.close()
            self.conversations.close()
            self.run_store.close()
            self.run_list.close()

        await asyncio.to_thread(close_store)
