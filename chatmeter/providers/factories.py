"""Which factory builds which kind of provider: the one place that names them all."""

from __future__ import annotations

from chatmeter.config import ModelConfig, Settings
from chatmeter.providers.base import Provider
from chatmeter.providers.registry import ProviderFactory
from chatmeter.providers.scripted import ScriptedProvider


async def create_scripted_provider(name: str, config: ModelConfig, _: Settings) -> Provider:
    return ScriptedProvider(name, config)


async def create_gemini(name: str, config: ModelConfig, settings: Settings) -> Provider:
    from chatmeter.providers.gemini import create_gemini_provider

    return await create_gemini_provider(name, config, settings)


async def create_openai(name: str, config: ModelConfig, settings: Settings) -> Provider:
    from chatmeter.providers.openai_compat import create_openai_provider

    return await create_openai_provider(name, config, settings)


async def create_local(name: str, config: ModelConfig, settings: Settings) -> Provider:
    from chatmeter.providers.local import create_local_provider

    return await create_local_provider(name, config, settings)


def default_factories() -> dict[str, ProviderFactory]:
    # SDKs are imported on first use: a deployment that only uses Gemini never pays
    # for importing the OpenAI SDK or loading llama.cpp
    return {
        "scripted": create_scripted_provider,
        "gemini": create_gemini,
        "openai": create_openai,
        "local": create_local,
    }
