"""Model providers, chosen by an agent's ``model.provider``."""

from __future__ import annotations

from common.errors import InvalidArgument
from executor.models.base import ModelProvider
from executor.models.openai import OpenAIProvider
from executor.models.scripted import ScriptedProvider


class ModelProviders:
    """One instance of each provider, shared by all runs of an executor."""

    def __init__(self) -> None:
        self._openai = OpenAIProvider()
        self._providers: dict[str, ModelProvider] = {
            "scripted": ScriptedProvider(),
            "openai": self._openai,
        }

    def get(self, name: str) -> ModelProvider:
        provider = self._providers.get(name)
        if provider is None:
            raise InvalidArgument("agent.model.provider", f"unknown model provider {name!r}")
        return provider

    async def aclose(self) -> None:
        await self._openai.aclose()
