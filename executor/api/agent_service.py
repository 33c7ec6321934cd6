"""agentrun.v1.AgentService on an executor, for the tenant its gateway names. A change to an
agent is announced to every executor's agent cache."""

from __future__ import annotations

import asyncio
from typing import Any

import grpc

from agentrun.v1 import agent_service_pb2 as agents
from agentrun.v1 import agent_service_pb2_grpc
from common.errors import InvalidArgument
from common.rpc import tenant_metadata, unary_errors
from eventstore.agent_config import AgentConfig
from executor.context import ExecutorContext
from executor.translation import agent_from_proto, stored_agent_to_proto

Context = grpc.aio.ServicerContext[Any, Any]


class AgentService(agent_service_pb2_grpc.AgentServiceServicer):
    def __init__(self, ctx: ExecutorContext) -> None:
        self.ctx = ctx

    @unary_errors
    async def CreateAgent(
        self, request: agents.CreateAgentRequest, context: Context
    ) -> agents.CreateAgentResponse:
        tenant = tenant_metadata(context)
        config = agent_from_proto(request.agent)
        self._check_tool_urls(config)
        created = await asyncio.to_thread(self.ctx.agents.create, tenant, config)
        await self.ctx.agent_cache.announce_change(tenant, created.config.agent_id)
        return agents.CreateAgentResponse(agent=stored_agent_to_proto(created))

    def _check_tool_urls(self, config: AgentConfig) -> None:
        """Refuses a tool URL that AGENTRUN_TOOL_URL_ALLOW does not allow (a setting of the
        executors, not of the domain: it is checked again at every call)."""
        allow = self.ctx.settings.tool_url_allow
        for index, tool in enumerate(config.tools):
            if tool.http is not None and not allow.allows(tool.http.url):
                raise InvalidArgument(
                    f"agent.tools[{index}].http.url",
                    "its host is not one the executors allow (AGENTRUN_TOOL_URL_ALLOW)",
                )

    @unary_errors
    async def GetAgent(
        self, request: agents.GetAgentRequest, context: Context
    ) -> agents.GetAgentResponse:
        stored = await asyncio.to_thread(
            self.ctx.agents.get_stored, tenant_metadata(context), request.agent_id, request.version
        )
        return agents.GetAgentResponse(agent=stored_agent_to_proto(stored))

    @unary_errors
    async def ListAgents(
        self, request: agents.ListAgentsRequest, context: Context
    ) -> agents.ListAgentsResponse:
        listed, token = await asyncio.to_thread(
            self.ctx.agents.list_agents,
            tenant_metadata(context),
            request.page_size,
            request.page_token,
        )
        return agents.ListAgentsResponse(
            agents=[stored_agent_to_proto(a) for a in listed], next_page_token=token
        )

    @unary_errors
    async def UpdateAgent(
        self, request: agents.UpdateAgentRequest, context: Context
    ) -> agents.UpdateAgentResponse:
        tenant = tenant_metadata(context)
        config = agent_from_proto(request.agent)
        paths = list(request.update_mask.paths)
        if not paths or "tools" in paths:
            self._check_tool_urls(config)
        updated = await asyncio.to_thread(
            self.ctx.agents.update, tenant, config, paths, request.expected_version
        )
        await self.ctx.agent_cache.announce_change(tenant, updated.config.agent_id)
        return agents.UpdateAgentResponse(agent=stored_agent_to_proto(updated))

    @unary_errors
    async def DeleteAgent(
        self, request: agents.DeleteAgentRequest, context: Context
    ) -> agents.DeleteAgentResponse:
        tenant = tenant_metadata(context)
        await asyncio.to_thread(self.ctx.agents.delete, tenant, request.agent_id)
        await self.ctx.agent_cache.announce_change(tenant, request.agent_id)
        return agents.DeleteAgentResponse()
