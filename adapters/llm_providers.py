"""LLM providers by kind: the SDK adapters behind :class:`pipeline.llm_providers.LLMProvider`."""

from __future__ import annotations

from adapters.anthropic_llm import AnthropicProvider
from adapters.openai_llm import OpenAICompatibleProvider
from pipeline.llm_providers import LLMProvider

__all__ = ["AnthropicProvider", "OpenAICompatibleProvider", "build_provider"]


def build_provider(
    kind: str, *, base_url: str, api_key: str, model: str, timeout_s: float = 20.0
) -> LLMProvider:
    """A provider by kind: ``"openai"`` (OpenAI, vLLM, llama.cpp server, Ollama) or ``"anthropic"``.

    Raises:
        ValueError: for any other kind.
    """
    if kind == "openai":
        return OpenAICompatibleProvider(base_url, api_key, model, timeout_s=timeout_s)
    if kind == "anthropic":
        return AnthropicProvider(base_url, api_key, model, timeout_s=timeout_s)
    raise ValueError(
        f"unknown LLM provider kind {kind!r}: use 'openai' (also vLLM, llama.cpp, Ollama) or 'anthropic'"
    )
