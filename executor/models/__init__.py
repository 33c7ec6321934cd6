"""Model providers, chosen by an agent's ``model.provider``.

Each provider registers itself in its module (base.register_provider); executor.extensions
loads the shipped ones.
"""

from __future__ import annotations

from common.errors import InvalidArgument
from executor.models.base import FACTORIES, ModelProvider


class ModelProviders:
    """One instance of each registered provider, shared by all runs of an executor."""

    def __init__(self) -> None:
        self._providers = {name: create() for name, create in FACTORIES.items()}

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(sorted(self._providers))

    def get(self, name: str) -> ModelProvider:
        provider = self._providers.get(name)
        if provider is None:
            raise InvalidArgument("agent.model.provider", f"unknown model provider {name!r}")
        return provider

    async def aclose(self) -> None:
        for provider in self._providers.values():
            await provider.aclose()
