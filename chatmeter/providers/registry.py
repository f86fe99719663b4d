"""One registry of the configured models, built from settings in the app's lifespan."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Mapping

from chatmeter.config import ModelConfig, Settings
from chatmeter.providers.base import Provider

# A factory builds the provider of one configured model; it may start things (the local
# model's server) and so is async.
ProviderFactory = Callable[[str, ModelConfig, Settings], Awaitable[Provider]]


class UnknownModel(KeyError):
    pass


class ProviderRegistry:
    """The providers by model name. Providers are built lazily on first use, so a
    configured model that is never used costs nothing (the local model is not loaded
    when every chat uses Gemini)."""

    def __init__(self, settings: Settings, factories: Mapping[str, ProviderFactory]) -> None:
        self._settings = settings
        self._factories = dict(factories)
        self._providers: dict[str, Provider] = {}
        self._lock = asyncio.Lock()

    def names(self) -> list[str]:
        return sorted(self._settings.models)

    def has(self, name: str) -> bool:
        return name in self._settings.models

    def config(self, name: str) -> ModelConfig:
        try:
            return self._settings.models[name]
        except KeyError:
            raise UnknownModel(name) from None

    async def get(self, name: str) -> Provider:
        provider = self._providers.get(name)
        if provider is not None:
            return provider
        async with self._lock:  # two first requests must not load the model twice
            provider = self._providers.get(name)
            if provider is None:
                config = self.config(name)
                provider = await self._factories[config.provider](name, config, self._settings)
                self._providers[name] = provider
            return provider

    def add(self, provider: Provider) -> None:
        """Put an already-built provider in place (tests use it for doubles)."""
        self._providers[provider.name] = provider

    async def aclose(self) -> None:
        for provider in self._providers.values():
            await provider.aclose()
        self._providers.clear()
