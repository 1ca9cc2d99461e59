"""Builders of the turn engines: the embedded engine (intents + slots) and the LLM engine over it.

The sentence encoder is loaded once per process and shared by every app built in it (tests build
many apps in one process).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

from app.settings import Settings
from pipeline.intent_engine import EmbeddingIntentClassifier
from pipeline.model import Intent
from pipeline.policy import RefundPolicy
from pipeline.ports import BusinessSystem, QueueHours, VerificationCodes
from pipeline.turn_manager import CoreConfig, TurnManager

if TYPE_CHECKING:  # the encoder, the mood scorer and the LLM engine load lazily (model and SDK imports)
    from adapters.minilm_encoder import MiniLMEncoder
    from pipeline.frustration import FrustrationScorer
    from pipeline.llm_engine import LLMTurnManager

# Default endpoint and model of each LLM provider kind.
_DEFAULT_LLM = {
    "openai": ("https://api.openai.com/v1", "gpt-4o-mini"),
    "anthropic": ("https://api.anthropic.com", "claude-3-5-haiku-latest"),
}

_ENCODER: MiniLMEncoder | None = None


def shared_encoder() -> MiniLMEncoder:
    """The sentence encoder, loaded once per process and shared by every app and conversation."""
    global _ENCODER
    if _ENCODER is None:
        from adapters.minilm_encoder import MiniLMEncoder  # noqa: PLC0415

        _ENCODER = MiniLMEncoder()
    return _ENCODER


def build_classifier(settings: Settings) -> EmbeddingIntentClassifier:
    """The intent classifier over the shared encoder (``CLOSELOOP_INTENT_THRESHOLD`` when set)."""
    if settings.intent_threshold is not None:
        return EmbeddingIntentClassifier(shared_encoder(), threshold=settings.intent_threshold)
    return EmbeddingIntentClassifier(shared_encoder())


def build_mood(settings: Settings) -> FrustrationScorer | None:
    """The model-free frustration scorer both engines use (None when switched off)."""
    if not settings.frustration_detection:
        return None
    from pipeline.frustration import FrustrationScorer  # noqa: PLC0415

    return FrustrationScorer()


def build_core_config(settings: Settings) -> CoreConfig:
    """The embedded engine's policy settings: refund limits, follow-ups, protected topics."""
    refund = RefundPolicy(settings.refund_window_days, settings.refund_max_cents)
    if settings.protected_topics is None:
        return CoreConfig(refund=refund, followup_hours=settings.followup_hours)
    return CoreConfig(
        refund=refund,
        followup_hours=settings.followup_hours,
        protected_topics=tuple(settings.protected_topics.items()),
    )


def build_embedded_engine(
    settings: Settings,
    business: BusinessSystem,
    intents: list[Intent],
    codes: VerificationCodes,
    *,
    hours: QueueHours | None = None,
) -> TurnManager:
    """The embedded turn engine: intents and slots, policy-checked actions, templated replies;
    ``hours``: the queues' business hours a handoff follows (None: queues never close)."""
    return TurnManager(
        build_classifier(settings),
        business,
        intents,
        build_core_config(settings),
        mood=build_mood(settings),
        codes=codes,
        hours=hours,
    )


def build_llm_engine(settings: Settings, embedded: TurnManager) -> LLMTurnManager:
    """The LLM turn manager over the provider chain from settings (first: LLM_*; then LLM_FALLBACKS)."""
    from adapters.llm_providers import build_provider  # noqa: PLC0415
    from pipeline.llm_engine import Governance, LLMConfig, LLMTurnManager  # noqa: PLC0415

    specs: list[Mapping[str, str | None]] = [
        {
            "provider": settings.llm_provider,
            "base_url": settings.llm_base_url,
            "api_key": settings.llm_api_key,
            "model": settings.llm_model,
        },
        *settings.llm_fallbacks,
    ]
    providers = []
    for spec in specs:
        kind = spec.get("provider") or "openai"
        if kind not in _DEFAULT_LLM:
            raise RuntimeError(
                f"unknown LLM provider {kind!r}: use 'openai' (any OpenAI-compatible server) or 'anthropic'"
            )
        base_url, model = _DEFAULT_LLM[kind]
        providers.append(
            build_provider(
                kind,
                base_url=spec.get("base_url") or base_url,
                api_key=spec.get("api_key") or "none",
                model=spec.get("model") or model,
                timeout_s=max(10.0, settings.llm_timeout_s * 3),
            )
        )
    return LLMTurnManager(
        embedded,
        providers,
        governance=Governance(
            max_llm_turns=settings.llm_max_turns, max_tool_calls=settings.llm_max_tool_calls
        ),
        config=LLMConfig(
            company=settings.company_name,
            first_token_timeout_s=settings.llm_timeout_s,
            filler_after_s=settings.llm_filler_after_s,
        ),
        mood=build_mood(settings),
    )
