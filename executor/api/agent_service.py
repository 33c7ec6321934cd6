"""agentrun.v1.AgentService on an executor, for the tenant its gateway names. A change to an
agent is announced to every executor's agent cache."""

from __future__ import annotations

import asyncio
from typing import Any

import grpc

from agentrun.v1 import agent_pb2, agent_service_pb2_grpc
from agentrun.v1 import agent_service_pb2 as agents
from common.errors import InvalidArgument
from common.rpc import RequestLimit, tenant_metadata, unary_errors
from eventstore.agent_config import MAX_AGENT_BYTES, AgentConfig
from eventstore.agents import StoredAgent
from executor.context import ExecutorContext
from executor.translation import MAX_AGENT_PROTO_BYTES, agent_from_proto, stored_agent_to_proto

Context = grpc.aio.ServicerContext[Any, Any]


# A request that carries an agent, larger than its agent may be (as protobuf) and anything else
# the request may hold, is refused before it is decoded (see common.rpc.RequestLimit).
_AGENT_REQUEST_LIMIT = RequestLimit(MAX_AGENT_PROTO_BYTES + (64 << 10), "agent", MAX_AGENT_BYTES)
_SERVICE = agents.DESCRIPTOR.services_by_name["AgentService"].full_name
REQUEST_LIMITS = {
    f"/{_SERVICE}/{method}": _AGENT_REQUEST_LIMIT for method in ("CreateAgent", "UpdateAgent")
}

# A ListAgents response holds agents up to about this many bytes (at least one agent, of at most
# about 1.5 MiB): far below the 16 MiB a gRPC message may have, whatever the agents' sizes.
LIST_PAGE_BYTES = 4 << 20


class AgentService(agent_service_pb2_grpc.AgentServiceServicer):
    """Translation and the catalog's use cases run in a worker thread: an agent may hold a
    megabyte, whose conversions would stall the event loop."""

    def __init__(self, ctx: ExecutorContext) -> None:
        self.ctx = ctx

    @unary_errors
    async def CreateAgent(
        self, request: agents.CreateAgentRequest, context: Context
    ) -> agents.CreateAgentResponse:
        tenant = tenant_metadata(context)

        def create() -> agents.CreateAgentResponse:
            config = agent_from_proto(request.agent)
            self._check_tool_urls(config)
            created = self.ctx.agents.create(tenant, config)
            return agents.CreateAgentResponse(agent=stored_agent_to_proto(created))

        response = await asyncio.to_thread(create)
        await self.ctx.agent_cache.announce_change(tenant, response.agent.id)
        return response

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
            if tool.mcp is not None and not allow.allows(tool.mcp.url):
                raise InvalidArgument(
                    f"agent.tools[{index}].mcp.url",
                    "its host is not one the executors allow (AGENTRUN_TOOL_URL_ALLOW)",
                )

    @unary_errors
    async def GetAgent(
        self, request: agents.GetAgentRequest, context: Context
    ) -> agents.GetAgentResponse:
        tenant = tenant_metadata(context)

        def get() -> agents.GetAgentResponse:
            stored = self.ctx.agents.get_stored(tenant, request.agent_id, request.version)
            return agents.GetAgentResponse(agent=stored_agent_to_proto(stored))

        return await asyncio.to_thread(get)

    @unary_errors
    async def ListAgents(
        self, request: agents.ListAgentsRequest, context: Context
    ) -> agents.ListAgentsResponse:
        tenant = tenant_metadata(context)

        def list_page() -> agents.ListAgentsResponse:
            translated: dict[str, agent_pb2.Agent] = {}

            def size_of(stored: StoredAgent) -> int:
                agent = translated[stored.config.agent_id] = stored_agent_to_proto(stored)
                return agent.ByteSize()

            listed, token = self.ctx.agents.list_agents(
                tenant,
                request.page_size,
                request.page_token,
                max_bytes=LIST_PAGE_BYTES,
                size_of=size_of,
            )
            return agents.ListAgentsResponse(
                agents=[translated[a.config.agent_id] for a in listed], next_page_token=token
            )

        return await asyncio.to_thread(list_page)

    @unary_errors
    async def UpdateAgent(
        self, request: agents.UpdateAgentRequest, context: Context
    ) -> agents.UpdateAgentResponse:
        tenant = tenant_metadata(context)

        def update() -> agents.UpdateAgentResponse:
            config = agent_from_proto(request.agent)
            paths = list(request.update_mask.paths)
            if not paths or "tools" in paths:
                self._check_tool_urls(config)
            updated = self.ctx.agents.update(tenant, config, paths, request.expected_version)
            return agents.UpdateAgentResponse(agent=stored_agent_to_proto(updated))

        response = await asyncio.to_thread(update)
        await self.ctx.agent_cache.announce_change(tenant, response.agent.id)
        return response

    @unary_errors
    async def DeleteAgent(
        self, request: agents.DeleteAgentRequest, context: Context
    ) -> agents.DeleteAgentResponse:
        tenant = tenant_metadata(context)
        await asyncio.to_thread(self.ctx.agents.delete, tenant, request.agent_id)
        await self.ctx.agent_cache.announce_change(tenant, request.agent_id)
        return agents.DeleteAgentResponse()
