"""Which execution mode a new run will probably have.

A gateway relays a durable run from the run's JetStream subject, through a consumer that takes a
round trip to the NATS server to create. Created only once the executor has said "durable", it
lies on the path to the first token; created while the executor stores the run, it does not. So
the gateway guesses: the mode the request asks for, else the mode the agent's last run had on
this gateway. A wrong guess costs one consumer, created and dropped unread.
"""

from __future__ import annotations

from collections import OrderedDict

from agentrun.v1 import agent_pb2, run_service_pb2

MODES_KEPT = 10_000  # agents remembered (least recently started forgotten first)


class RunModes:
    """The last seen mode of each agent's runs (see module docstring)."""

    def __init__(self, size: int = MODES_KEPT) -> None:
        self._durable: OrderedDict[tuple[str, str], bool] = OrderedDict()
        self._size = size

    def probably_durable(self, tenant: str, request: run_service_pb2.StreamRunRequest) -> bool:
        if request.execution_mode != agent_pb2.EXECUTION_MODE_UNSPECIFIED:
            return request.execution_mode == agent_pb2.EXECUTION_MODE_DURABLE
        return self._durable.get((tenant, request.agent_id), False)

    def saw(self, tenant: str, request: run_service_pb2.StreamRunRequest, durable: bool) -> None:
        """Records the mode a run of the request's agent turned out to have (a request that
        chose its mode says nothing about the agent's)."""
        if request.execution_mode != agent_pb2.EXECUTION_MODE_UNSPECIFIED:
            return
        key = (tenant, request.agent_id)
        self._durable[key] = durable
        self._durable.move_to_end(key)
        while len(self._durable) > self._size:
            self._durable.popitem(last=False)
