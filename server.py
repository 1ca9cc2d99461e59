"""closeloop composition root: settings (read once), services, the FastAPI app and the CLI.

Only this module reads the environment and picks concrete adapters; everything below it gets
what it needs through constructors.
"""

from __future__ import annotations

import os

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")  # before numpy loads: halves model CPU here
os.environ.setdefault("OMP_NUM_THREADS", "1")

import argparse  # noqa: E402
import asyncio  # noqa: E402
import getpass  # noqa: E402
import logging  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from collections.abc import AsyncIterator, Awaitable, Callable  # noqa: E402
from contextlib import asynccontextmanager  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402
from datetime import timedelta  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any, Literal  # noqa: E402

import asyncpg  # noqa: E402
from fastapi import Depends, FastAPI, Request  # noqa: E402
from fastapi.exceptions import RequestValidationError  # noqa: E402
from fastapi.openapi.docs import get_swagger_ui_html  # noqa: E402
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse, RedirectResponse  # noqa: E402
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest  # noqa: E402
from pydantic import AliasChoices, Field  # noqa: E402
from pydantic_settings import BaseSettings, SettingsConfigDict  # noqa: E402
from starlette.exceptions import HTTPException as StarletteHTTPException  # noqa: E402

from crm_bridge import db  # noqa: E402
from crm_bridge.conversations import PgConversationStore  # noqa: E402
from crm_bridge.crm import BuiltinCRM  # noqa: E402
from crm_bridge.demo import seed_demo  # noqa: E402
from crm_bridge.desk import build_desk  # noqa: E402
from crm_bridge.intents_store import IntentStore, dump_yaml, load_yaml  # noqa: E402
from crm_bridge.jobs import JobRunner  # noqa: E402
from crm_bridge.reports import Reports  # noqa: E402
from crm_bridge.users import (  # noqa: E402
    MANAGERS,
    MIN_PASSWORD_LENGTH,
    ROLES,
    ApiTokenStore,
    LoginThrottle,
    Passwords,
    SessionStore,
    User,
    UserStore,
    check_password_strength,
)
from crm_bridge.verification import PgVerificationCodes, local_outbox  # noqa: E402
from pipeline.clock import SystemClock  # noqa: E402
from pipeline.model import Channel, OutboundText, SendResult  # noqa: E402
from pipeline.policy import RefundPolicy  # noqa: E402
from pipeline.ports import BusinessSystem, Clock, TextSender  # noqa: E402
from pipeline.redaction import DEFAULT_PATTERNS, Redactor, install_log_redaction  # noqa: E402
from pipeline.service import ConversationService, Reply  # noqa: E402
from pipeline.turn_manager import CoreConfig, TurnManager  # noqa: E402
from web.api import ApiError, api_router  # noqa: E402
from web.auth import Authenticator, LoginRequired, auth_router, login_redirect  # noqa: E402
from web.chat_routes import ChatLimits, WebChatHub, chat_router  # noqa: E402
from web.limits import BodyLimitMiddleware, parse_networks  # noqa: E402

log = logging.getLogger("closeloop")
ROOT = Path(__file__).resolve().parent


def _env(*names: str) -> Any:
    return Field(default=None, validation_alias=AliasChoices(*names))


class Settings(BaseSettings):
    """Every setting closeloop reads, from the environment (or a ``.env`` file)."""

    model_config = SettingsConfigDict(env_file=".env", extra="ignore", populate_by_name=True)

    database_url: str | None = _env("DATABASE_URL")
    data_dir: Path = Field(
        Path(".closeloop"), validation_alias=AliasChoices("CLOSELOOP_DATA_DIR", "data_dir")
    )
    host: str = Field("127.0.0.1", validation_alias=AliasChoices("CLOSELOOP_HOST", "host"))
    port: int = Field(8080, validation_alias=AliasChoices("CLOSELOOP_PORT", "PORT", "port"))
    public_base_url: str | None = _env("PUBLIC_BASE_URL", "public_base_url")
    twilio_account_sid: str | None = _env("TWILIO_ACCOUNT_SID", "twilio_account_sid")
    twilio_auth_token: str | None = _env("TWILIO_AUTH_TOKEN", "twilio_auth_token")
    twilio_sms_from: str | None = _env("TWILIO_SMS_FROM", "twilio_sms_from")
    twilio_whatsapp_from: str | None = _env("TWILIO_WHATSAPP_FROM", "twilio_whatsapp_from")
    twilio_whatsapp_template_sid: str | None = _env(
        "TWILIO_WHATSAPP_TEMPLATE_SID", "twilio_whatsapp_template_sid"
    )
    twilio_api_base_url: str | None = _env("TWILIO_API_BASE_URL", "twilio_api_base_url")
    # Without TWILIO_AUTH_TOKEN, Twilio requests are refused unless the server listens on loopback
    # only or this is set (a trusted network, a tunnel you control): then they are not verified.
    allow_unsigned_twilio: bool = Field(
        False, validation_alias=AliasChoices("CLOSELOOP_ALLOW_UNSIGNED_TWILIO", "allow_unsigned_twilio")
    )
    # Signs per-call media stream tokens; unset: a random key per process (streams then work only
    # with the process that answered the voice webhook, which is how Twilio connects anyway).
    secret_key: str | None = _env("CLOSELOOP_SECRET_KEY", "secret_key")
    max_calls: int = Field(20, ge=1, validation_alias=AliasChoices("CLOSELOOP_MAX_CALLS", "max_calls"))
    media_start_timeout_s: float = Field(
        5.0, gt=0, validation_alias=AliasChoices("CLOSELOOP_MEDIA_START_TIMEOUT", "media_start_timeout_s")
    )
    crm_backend: Literal["builtin", "rest"] = Field(
        "builtin", validation_alias=AliasChoices("CLOSELOOP_CRM", "crm_backend")
    )
    crm_rest_url: str | None = _env("CRM_REST_URL", "crm_rest_url")
    crm_rest_token: str | None = _env("CRM_REST_TOKEN", "crm_rest_token")
    intents_file: Path = Field(
        ROOT / "intents.yaml", validation_alias=AliasChoices("CLOSELOOP_INTENTS_FILE", "intents_file")
    )
    intent_threshold: float | None = _env("CLOSELOOP_INTENT_THRESHOLD", "intent_threshold")
    demo_seed: bool | None = _env("CLOSELOOP_DEMO_SEED", "demo_seed")
    refund_window_days: int = Field(
        30, validation_alias=AliasChoices("CLOSELOOP_REFUND_WINDOW_DAYS", "refund_window_days")
    )
    refund_max_cents: int = Field(
        100_000, validation_alias=AliasChoices("CLOSELOOP_REFUND_MAX_CENTS", "refund_max_cents")
    )
    followup_hours: int = Field(
        48, validation_alias=AliasChoices("CLOSELOOP_FOLLOWUP_HOURS", "followup_hours")
    )
    job_poll_seconds: float = Field(
        1.0, validation_alias=AliasChoices("CLOSELOOP_JOB_POLL_SECONDS", "job_poll_seconds")
    )
    db_pool_size: int = Field(20, validation_alias=AliasChoices("CLOSELOOP_DB_POOL_SIZE", "db_pool_size"))
    transfer_ring_seconds: int = Field(
        20, validation_alias=AliasChoices("CLOSELOOP_TRANSFER_RING_SECONDS", "transfer_ring_seconds")
    )
    transfer_callback_minutes: int = Field(
        30, validation_alias=AliasChoices("CLOSELOOP_TRANSFER_CALLBACK_MINUTES", "transfer_callback_minutes")
    )
    voice_preload: bool = Field(
        True, validation_alias=AliasChoices("CLOSELOOP_VOICE_PRELOAD", "voice_preload")
    )
    voice_barge_in_ms: int = Field(
        500, validation_alias=AliasChoices("CLOSELOOP_BARGE_IN_MS", "voice_barge_in_ms")
    )
    voice_backchannels: str = Field(
        "mm,mmhmm,mm-hmm,mhm,uh-huh,okay,ok,yeah,yep,right,sure,i see,got it,alright",
        validation_alias=AliasChoices("CLOSELOOP_BACKCHANNELS", "voice_backchannels"),
    )
    voice_reprompt_seconds: float = Field(
        10.0, validation_alias=AliasChoices("CLOSELOOP_REPROMPT_SECONDS", "voice_reprompt_seconds")
    )
    voice_short_silence: float = Field(
        0.3, validation_alias=AliasChoices("CLOSELOOP_SHORT_SILENCE", "voice_short_silence")
    )
    voice_long_silence: float = Field(
        0.8, validation_alias=AliasChoices("CLOSELOOP_LONG_SILENCE", "voice_long_silence")
    )
    # Synthesized pieces kept for reuse by every call (fixed lines start at once); 0 turns it off.
    voice_speech_cache: int = Field(
        512, ge=0, validation_alias=AliasChoices("CLOSELOOP_SPEECH_CACHE", "voice_speech_cache")
    )
    whisper_model_path: Path | None = _env("CLOSELOOP_WHISPER_MODEL", "whisper_model_path")
    whisper_threads: int = Field(
        2, validation_alias=AliasChoices("CLOSELOOP_WHISPER_THREADS", "whisper_threads")
    )
    whisper_workers: int = Field(
        1, validation_alias=AliasChoices("CLOSELOOP_WHISPER_WORKERS", "whisper_workers")
    )
    piper_voice_path: Path | None = _env("CLOSELOOP_PIPER_VOICE", "piper_voice_path")
    # Speech to text of calls: the embedded Whisper, or Deepgram live (Whisper stays the fallback).
    stt_provider: Literal["whisper", "deepgram"] = Field(
        "whisper", validation_alias=AliasChoices("CLOSELOOP_STT", "stt_provider")
    )
    deepgram_api_key: str | None = _env("DEEPGRAM_API_KEY", "deepgram_api_key")
    deepgram_url: str = Field(
        "wss://api.deepgram.com", validation_alias=AliasChoices("DEEPGRAM_URL", "deepgram_url")
    )
    deepgram_model: str = Field("nova-3", validation_alias=AliasChoices("DEEPGRAM_MODEL", "deepgram_model"))
    log_level: str = Field(
        "INFO", validation_alias=AliasChoices("CLOSELOOP_LOG_LEVEL", "LOG_LEVEL", "log_level")
    )
    # Card numbers (and the patterns below) are redacted from customer and agent text before it is
    # stored, from event payloads and from every log line. Patterns: a JSON object name -> regex,
    # e.g. CLOSELOOP_REDACT_PATTERNS='{"ssn": "\\b\\d{3}-\\d{2}-\\d{4}\\b"}'; '{}' for none.
    redact_cards: bool = Field(True, validation_alias=AliasChoices("CLOSELOOP_REDACT_CARDS", "redact_cards"))
    redact_patterns: dict[str, str] = Field(
        default_factory=lambda: dict(DEFAULT_PATTERNS),
        validation_alias=AliasChoices("CLOSELOOP_REDACT_PATTERNS", "redact_patterns"),
    )
    # Turn manager: "embedded" (intents + slots, no network) or "llm" (a model drives the
    # conversation; the same policy code decides every action). See README "LLM engine".
    engine: Literal["embedded", "llm"] = Field(
        "embedded", validation_alias=AliasChoices("CLOSELOOP_ENGINE", "engine")
    )
    llm_provider: Literal["openai", "anthropic"] = Field(
        "openai", validation_alias=AliasChoices("LLM_PROVIDER", "llm_provider")
    )
    llm_base_url: str | None = _env("LLM_BASE_URL", "llm_base_url")
    llm_api_key: str | None = _env("LLM_API_KEY", "OPENAI_API_KEY", "ANTHROPIC_API_KEY", "llm_api_key")
    llm_model: str | None = _env("LLM_MODEL", "llm_model")
    # More providers tried in order when the first fails: a JSON list of objects with
    # provider, base_url, api_key, model, e.g. '[{"provider": "openai", "base_url":
    # "http://127.0.0.1:11434/v1", "model": "llama3.1"}]' (a local Ollama as the fallback).
    llm_fallbacks: list[dict[str, str]] = Field(
        default_factory=list, validation_alias=AliasChoices("LLM_FALLBACKS", "llm_fallbacks")
    )
    llm_timeout_s: float = Field(4.0, gt=0, validation_alias=AliasChoices("LLM_TIMEOUT", "llm_timeout_s"))
    llm_filler_after_s: float = Field(
        1.2, gt=0, validation_alias=AliasChoices("LLM_FILLER_AFTER", "llm_filler_after_s")
    )
    llm_max_turns: int = Field(60, validation_alias=AliasChoices("LLM_MAX_TURNS", "llm_max_turns"))
    llm_max_tool_calls: int = Field(
        120, validation_alias=AliasChoices("LLM_MAX_TOOL_CALLS", "llm_max_tool_calls")
    )
    company_name: str = Field(
        "Closeloop Demo Store", validation_alias=AliasChoices("CLOSELOOP_COMPANY", "company_name")
    )
    # Topics that always go to a person: JSON object name -> regex; unset keeps the built-in
    # legal-threat and contract-renegotiation patterns.
    protected_topics: dict[str, str] | None = _env("CLOSELOOP_PROTECTED_TOPICS", "protected_topics")
    frustration_detection: bool = Field(
        True, validation_alias=AliasChoices("CLOSELOOP_FRUSTRATION", "frustration_detection")
    )
    metrics_public: bool = Field(
        False, validation_alias=AliasChoices("CLOSELOOP_METRICS_PUBLIC", "metrics_public")
    )
    session_hours: float = Field(
        12, gt=0, validation_alias=AliasChoices("CLOSELOOP_SESSION_HOURS", "session_hours")
    )
    session_idle_minutes: float = Field(
        120, gt=0, validation_alias=AliasChoices("CLOSELOOP_SESSION_IDLE_MINUTES", "session_idle_minutes")
    )
    # Failed sign-ins from one client address (any emails) inside 15 minutes before that address
    # is refused for 15 minutes; each email has its own limit of 5 besides.
    login_max_failures_per_client: int = Field(
        50,
        ge=1,
        validation_alias=AliasChoices(
            "CLOSELOOP_LOGIN_MAX_FAILURES_PER_CLIENT", "login_max_failures_per_client"
        ),
    )
    # Request bodies over this many bytes are refused with 413 body_too_large, on every route.
    max_body_bytes: int = Field(
        1024 * 1024, ge=1, validation_alias=AliasChoices("CLOSELOOP_MAX_BODY_BYTES", "max_body_bytes")
    )
    # Proxies whose X-Forwarded-For is believed for the client address (comma-separated addresses
    # or networks, e.g. "10.0.0.5,192.168.0.0/16"); empty: the peer address is the client.
    trusted_proxies: str = Field(
        "", validation_alias=AliasChoices("CLOSELOOP_TRUSTED_PROXIES", "trusted_proxies")
    )
    # Web chat (WS /chat) per client address: open sockets, messages (a burst, then a rate), and
    # how long a socket may stay silent before it is closed.
    chat_max_connections: int = Field(
        10, ge=1, validation_alias=AliasChoices("CLOSELOOP_CHAT_MAX_CONNECTIONS", "chat_max_connections")
    )
    chat_messages_burst: int = Field(
        10, ge=1, validation_alias=AliasChoices("CLOSELOOP_CHAT_MESSAGES_BURST", "chat_messages_burst")
    )
    chat_messages_per_minute: float = Field(
        30,
        gt=0,
        validation_alias=AliasChoices("CLOSELOOP_CHAT_MESSAGES_PER_MINUTE", "chat_messages_per_minute"),
    )
    chat_idle_seconds: float = Field(
        900, gt=0, validation_alias=AliasChoices("CLOSELOOP_CHAT_IDLE_SECONDS", "chat_idle_seconds")
    )

    @property
    def base_url(self) -> str:
        return (self.public_base_url or f"http://{self.host}:{self.port}").rstrip("/")

    @property
    def cookie_secure(self) -> bool:
        """Session cookies are ``Secure`` when people reach the server over HTTPS."""
        return self.base_url.startswith("https://")

    @property
    def twilio_unsigned_allowed(self) -> bool:
        """Twilio requests are accepted without a signature: no auth token, and the server listens
        on loopback only or ``CLOSELOOP_ALLOW_UNSIGNED_TWILIO`` is set."""
        from telephony.signatures import is_loopback_host  # noqa: PLC0415

        return not self.twilio_auth_token and (self.allow_unsigned_twilio or is_loopback_host(self.host))


# ---- shared models (one copy per process) ---------------------------------------------------------
_ENCODER: Any = None


def shared_encoder() -> Any:
    """The sentence encoder, loaded once per process and shared by every app and conversation."""
    global _ENCODER
    if _ENCODER is None:
        from adapters.minilm_encoder import MiniLMEncoder  # noqa: PLC0415

        _ENCODER = MiniLMEncoder()
    return _ENCODER


def build_classifier(settings: Settings) -> Any:
    from pipeline.intent_engine import EmbeddingIntentClassifier  # noqa: PLC0415

    kwargs = {"threshold": settings.intent_threshold} if settings.intent_threshold is not None else {}
    return EmbeddingIntentClassifier(shared_encoder(), **kwargs)


# ---- metrics ---------------------------------------------------------------------------------------
_DEFAULT_LLM = {
    "openai": ("https://api.openai.com/v1", "gpt-4o-mini"),
    "anthropic": ("https://api.anthropic.com", "claude-3-5-haiku-latest"),
}


def build_mood(settings: Settings) -> Any:
    """The model-free frustration scorer both engines use (None when switched off)."""
    if not settings.frustration_detection:
        return None
    from pipeline.frustration import FrustrationScorer  # noqa: PLC0415

    return FrustrationScorer()


def build_llm_engine(settings: Settings, embedded: Any) -> Any:
    """The LLM turn manager over the provider chain from settings (first: LLM_*; then LLM_FALLBACKS)."""
    from adapters.llm_providers import build_provider  # noqa: PLC0415
    from pipeline.llm_engine import Governance, LLMConfig, LLMTurnManager  # noqa: PLC0415

    specs = [
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


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.messages = Counter(
            "closeloop_messages_total",
            "Messages stored, by channel and direction",
            ["channel", "direction"],
            registry=self.registry,
        )
        self.turn_seconds = Histogram(
            "closeloop_turn_seconds",
            "Time to handle one customer turn (store + core + commit)",
            ["channel"],
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5),
            registry=self.registry,
        )
        self.rejected = Counter(
            "closeloop_webhooks_rejected_total", "Webhooks refused", ["reason"], registry=self.registry
        )
        self.duplicates = Counter(
            "closeloop_duplicate_deliveries_total",
            "Inbound messages seen before (idempotent replays)",
            registry=self.registry,
        )
        self.gauges = {
            name: Gauge(f"closeloop_{name}", help_text, registry=self.registry)
            for name, help_text in (
                ("open_conversations", "Conversations not closed"),
                ("open_tickets", "Tickets open or pending"),
                ("breached_tickets", "Open tickets past an SLA"),
                ("scheduled_followups", "Follow-ups waiting to be sent"),
                ("queued_texts", "Outbox texts waiting to be sent"),
            )
        }
        voice_buckets = (0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0)
        self.voice = {
            name: Histogram(
                f"closeloop_voice_{name}_seconds", help_text, buckets=voice_buckets, registry=self.registry
            )
            for name, help_text in (
                ("stt", "Speech-to-text time per caller turn"),
                ("turn_manager", "Conversation core time per caller turn (store + core + commit)"),
                ("tts_first_audio", "Time from the core's reply to the first synthesized audio sent"),
                ("voice_to_voice", "End of caller speech to first bot audio sent"),
            )
        }
        self.calls_active = Gauge(
            "closeloop_calls_active", "Phone calls with an open media stream", registry=self.registry
        )
        self.media_violations = Counter(
            "closeloop_media_frames_rejected_total",
            "Media stream frames rejected",
            ["reason", "fatal"],
            registry=self.registry,
        )
        self.webchat_online = Gauge(
            "closeloop_webchat_sessions_online",
            "Web-chat sessions with an open socket",
            registry=self.registry,
        )
        self.password_checks = Counter(
            "closeloop_password_checks_total",
            "Password verifications (argon2), the cost the sign-in throttle bounds",
            registry=self.registry,
        )
        self.stt_fallbacks = Counter(
            "closeloop_stt_fallbacks_total",
            "Calls whose streaming STT switched to Whisper, by reason",
            ["reason"],
            registry=self.registry,
        )


class LoggingSender:
    """Stands in for Twilio when no credentials are configured: records, does not send."""

    def __init__(self, channel: Channel) -> None:
        self._channel = channel

    async def send(self, message: OutboundText) -> SendResult:
        log.info(
            "twilio not configured; text kept in the transcript only",
            extra={"channel": str(message.channel), "kind": message.kind},
        )
        return SendResult(provider_ref="local-only", channel_used=self._channel, detail="not_sent_no_twilio")


# ---- services ---------------------------------------------------------------------------------------
@dataclass
class Services:
    settings: Settings
    clock: Clock
    pool: asyncpg.Pool
    business: BusinessSystem
    store: PgConversationStore
    intents: IntentStore
    turns: TurnManager
    service: ConversationService
    jobs: JobRunner
    hub: WebChatHub
    reports: Reports
    metrics: Metrics
    users: UserStore
    sessions: SessionStore
    api_tokens: ApiTokenStore
    login_throttle: LoginThrottle
    embedded: db.EmbeddedPostgres | None = None
    closers: list[Any] = field(default_factory=list)
    calls: Any = None
    speech: Any = None
    call_control: Any = None
    desk: Any = None
    transfer: Any = None
    active_calls: set[Any] = field(default_factory=set)
    redactor: Redactor = field(default_factory=Redactor)
    twilio_guard: Any = None  # telephony.twilio_guard.TwilioGuard, set when the routes are mounted

    async def reload_intents(self) -> None:
        self.turns.set_intents(await self.intents.list())

    async def close(self) -> None:
        for session in list(self.active_calls):
            await session.close("server_shutdown")
        if self.speech is not None:
            await self.speech.stop()
        await self.jobs.stop()
        for closer in reversed(self.closers):
            try:
                await closer()
            except Exception:
                log.exception("error while closing")
        await self.pool.close()
        if self.embedded is not None:
            await self.embedded.stop()


async def open_database(settings: Settings) -> tuple[str, db.EmbeddedPostgres | None, bool]:
    """The DSN to use, the embedded server when one was started, and whether it is brand new."""
    if settings.database_url:
        return settings.database_url, None, False
    embedded = db.EmbeddedPostgres(settings.data_dir / "pgdata")
    first_run = embedded.first_run
    print(
        f"closeloop: starting embedded PostgreSQL in {embedded.data_dir}"
        + (" (first run)" if first_run else ""),
        file=sys.stderr,
    )
    return await embedded.start(), embedded, first_run


def build_redactor(settings: Settings) -> Redactor:
    """The redactor the settings ask for.

    Raises:
        ValueError: a configured pattern is not a valid regular expression.
    """
    return Redactor(tuple(settings.redact_patterns.items()), cards=settings.redact_cards)


async def build_services(settings: Settings, clock: Clock | None = None) -> Services:
    clock = clock or SystemClock()
    redactor = build_redactor(settings)
    dsn, embedded, first_run = await open_database(settings)
    try:
        pool = await db.create_pool(dsn, min_size=2, max_size=settings.db_pool_size)
    except Exception:
        if embedded:
            await embedded.stop()
        raise
    closers: list[Any] = []
    try:
        async with pool.acquire() as conn:
            await db.migrate(conn)
        business: BusinessSystem
        if settings.crm_backend == "rest":
            if not settings.crm_rest_url:
                raise RuntimeError("CLOSELOOP_CRM=rest needs CRM_REST_URL")
            from crm_bridge.rest_adapter import RestBusinessSystem  # noqa: PLC0415

            rest = RestBusinessSystem(settings.crm_rest_url, settings.crm_rest_token)
            closers.append(rest.aclose)
            business = rest
        else:
            business = BuiltinCRM(pool, label_base_url=f"{settings.base_url}/labels")
        if settings.demo_seed or (settings.demo_seed is None and first_run):
            count = await seed_demo(pool, clock.now())
            print(f"closeloop: demo company loaded ({count} orders)", file=sys.stderr)
        intents = IntentStore(pool)
        seeded = await intents.seed_if_empty(load_yaml(settings.intents_file))
        if seeded:
            log.info("seeded intents", extra={"count": seeded})
        turns: Any = TurnManager(
            build_classifier(settings),
            business,
            await intents.list(),
            CoreConfig(
                refund=RefundPolicy(settings.refund_window_days, settings.refund_max_cents),
                followup_hours=settings.followup_hours,
                **(
                    {"protected_topics": tuple(settings.protected_topics.items())}
                    if settings.protected_topics is not None
                    else {}
                ),
            ),
            mood=build_mood(settings),
            codes=PgVerificationCodes(pool),
        )
        if settings.engine == "llm":
            turns = build_llm_engine(settings, turns)
            closers.append(turns.aclose)
        hub = WebChatHub(clock)
        senders: dict[Channel, TextSender] = {Channel.WEBCHAT: hub}
        if settings.twilio_account_sid and settings.twilio_auth_token:
            from telephony.sender import TwilioTextSender  # noqa: PLC0415

            twilio = TwilioTextSender(
                settings.twilio_account_sid,
                settings.twilio_auth_token,
                sms_from=settings.twilio_sms_from,
                whatsapp_from=settings.twilio_whatsapp_from,
                api_base_url=settings.twilio_api_base_url,
                whatsapp_template_sid=settings.twilio_whatsapp_template_sid,
            )
            closers.append(twilio.aclose)
            senders[Channel.SMS] = senders[Channel.WHATSAPP] = twilio
        else:
            senders[Channel.SMS] = LoggingSender(Channel.SMS)
            senders[Channel.WHATSAPP] = LoggingSender(Channel.WHATSAPP)
        from crm_bridge.agent_events import PgEventBridge  # noqa: PLC0415

        events = PgEventBridge(dsn, pool)
        desk = build_desk(pool, senders, clock, redactor=redactor, on_event=events.publish)
        await events.start(desk.deliver_local)
        closers.append(events.stop)
        jobs = JobRunner(
            pool, senders, clock, poll_seconds=settings.job_poll_seconds, extra_passes=[desk.routing_pass]
        )
        store = PgConversationStore(pool, redactor=redactor)
        metrics = Metrics()

        async def after_commit(reply: Reply) -> None:
            try:
                await jobs.dispatch_outbox(reply.outbox_ids)
            except Exception:  # the runner retries queued texts; the reply must still go out
                log.exception("immediate outbox dispatch failed")

        service = ConversationService(
            store,
            turns,
            business,
            clock,
            after_commit=after_commit,
            on_customer_message=desk.customer_message,
            redactor=redactor,
        )
        from crm_bridge.calls import CallStore  # noqa: PLC0415
        from voice.speech_stack import SpeechStack  # noqa: PLC0415

        calls = CallStore(pool)
        speech = SpeechStack(
            whisper_model_path=settings.whisper_model_path,
            piper_voice_path=settings.piper_voice_path,
            whisper_threads=settings.whisper_threads,
            whisper_workers=settings.whisper_workers,
            short_silence=settings.voice_short_silence,
            long_silence=settings.voice_long_silence,
            speech_cache_size=settings.voice_speech_cache,
        )
        call_control = None
        if settings.twilio_account_sid and settings.twilio_auth_token:
            from telephony.call_control import TwilioCallControl  # noqa: PLC0415

            call_control = TwilioCallControl(
                settings.twilio_account_sid,
                settings.twilio_auth_token,
                api_base_url=settings.twilio_api_base_url,
            )
            closers.append(call_control.aclose)
    except Exception:
        for closer in closers:
            await closer()
        await pool.close()
        if embedded:
            await embedded.stop()
        raise
    now = clock.now
    sessions = SessionStore(
        pool,
        lifetime=timedelta(hours=settings.session_hours),
        idle=timedelta(minutes=settings.session_idle_minutes),
        now=now,
    )
    return Services(
        settings,
        clock,
        pool,
        business,
        store,
        intents,
        turns,
        service,
        jobs,
        hub,
        Reports(pool),
        metrics,
        UserStore(pool, passwords=Passwords(on_check=metrics.password_checks.inc), now=now),
        sessions,
        ApiTokenStore(pool, now=now),
        LoginThrottle(pool, max_client_failures=settings.login_max_failures_per_client, now=now),
        embedded,
        closers,
        calls=calls,
        speech=speech,
        call_control=call_control,
        desk=desk,
        redactor=redactor,
    )


class _MeteredService:
    """Wraps the conversation service to count messages and time turns."""

    def __init__(self, inner: ConversationService, metrics: Metrics) -> None:
        self._inner = inner
        self._metrics = metrics

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    async def handle_text(
        self,
        channel: Channel,
        address: str,
        text: str,
        *,
        external_id: str | None = None,
        kind: str = "message",
        speak: Callable[[str], Awaitable[None]] | None = None,
        stream: Callable[[str], Awaitable[None]] | None = None,
        channel_signed: bool = False,
        client: str | None = None,
    ) -> Reply:
        start = time.perf_counter()
        reply = await self._inner.handle_text(
            channel,
            address,
            text,
            external_id=external_id,
            kind=kind,
            speak=speak,
            stream=stream,
            channel_signed=channel_signed,
            client=client,
        )
        self._metrics.turn_seconds.labels(str(channel)).observe(time.perf_counter() - start)
        if reply.duplicate:
            self._metrics.duplicates.inc()
        else:
            self._metrics.messages.labels(str(channel), "in").inc()
            self._metrics.messages.labels(str(channel), "out").inc(len(reply.messages))
        return reply


# ---- the app -----------------------------------------------------------------------------------------
def create_app(
    settings: Settings | None = None, *, clock: Clock | None = None, start_jobs: bool = True
) -> FastAPI:
    """Build the FastAPI app. Services start in the lifespan and are at ``app.state.services``."""
    settings = settings or Settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        # Before anything can log: every handler configured so far (root, uvicorn's) redacts.
        install_log_redaction(build_redactor(settings))
        services = await build_services(settings, clock)
        app.state.services = services
        _twilio_banner(settings)
        _mount(app, services)
        if start_jobs:
            services.jobs.start()
        preload: asyncio.Task[None] | None = None
        if settings.voice_preload:
            preload = asyncio.create_task(_preload_speech(services), name="closeloop-speech-preload")
        log.info("closeloop ready", extra={"base_url": settings.base_url})
        try:
            yield
        finally:
            if preload is not None and not preload.done():
                preload.cancel()
            await services.close()

    # /docs and /openapi.json are mounted with the other routes, behind sign-in
    app = FastAPI(
        title="closeloop",
        version="0.1.0",
        lifespan=lifespan,
        docs_url=None,
        redoc_url=None,
        openapi_url=None,
        description="Voice-first AI contact center that completes work. Sign in at /login, or send "
        "`Authorization: Bearer <API token>` (`closeloop token create`).",
    )
    app.add_exception_handler(LoginRequired, login_redirect)
    # Every route: bodies over the limit are refused with 413 before they are read in full.
    app.add_middleware(BodyLimitMiddleware, max_bytes=settings.max_body_bytes)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = getattr(exc, "code", None) or {404: "not_found", 405: "method_not_allowed"}.get(
            exc.status_code, "http_error"
        )
        return JSONResponse(
            {"error": {"code": code, "message": str(exc.detail)}},
            status_code=exc.status_code,
            headers=exc.headers,
        )

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        return JSONResponse(
            {
                "error": {
                    "code": "invalid_request",
                    "message": "request failed validation",
                    "details": exc.errors(),
                }
            },
            status_code=422,
        )

    @app.exception_handler(asyncpg.PostgresError)
    async def database_error(request: Request, exc: asyncpg.PostgresError) -> JSONResponse:
        log.exception("database error", extra={"path": request.url.path})
        return JSONResponse(
            {
                "error": {
                    "code": "database_error",
                    "message": "the database refused the request; nothing was changed",
                }
            },
            status_code=503,
        )

    return app


def _twilio_banner(settings: Settings) -> None:
    """Say loudly (stderr) when Twilio requests are not verified, and when they are all refused."""
    if settings.twilio_auth_token:
        return
    if settings.allow_unsigned_twilio:
        why = "CLOSELOOP_ALLOW_UNSIGNED_TWILIO=true"
    elif settings.twilio_unsigned_allowed:
        why = f"the server listens on loopback only ({settings.host})"
    else:
        print(
            f"closeloop: TWILIO_AUTH_TOKEN is not set and the server listens on {settings.host}: every /twilio/* "
            "request is refused (403). Set TWILIO_AUTH_TOKEN to take calls and texts.",
            file=sys.stderr,
        )
        return
    print(
        f"closeloop: WARNING: TWILIO_AUTH_TOKEN is not set; /twilio/* requests are NOT verified ({why}). "
        "Anyone who can reach this server can fake calls and texts. Set TWILIO_AUTH_TOKEN before exposing it.",
        file=sys.stderr,
    )


def _mount(app: FastAPI, s: Services) -> None:
    from telephony.messaging_routes import messaging_router  # noqa: PLC0415
    from telephony.twilio_guard import TwilioGuard  # noqa: PLC0415

    metered = _MeteredService(s.service, s.metrics)
    s.twilio_guard = TwilioGuard(
        auth_token=s.settings.twilio_auth_token,
        public_base_url=s.settings.public_base_url,
        allow_unsigned=s.settings.twilio_unsigned_allowed,
        on_rejected=lambda reason: s.metrics.rejected.labels(reason).inc(),
    )
    # Who may call what: every page and /api route names its roles with auth.require(...) /
    # auth.require_page(...). Public on purpose: /healthz, the customer's /chat and /labels/{code},
    # /login; /twilio/* is checked by Twilio signatures instead.
    auth = Authenticator(s.sessions, s.api_tokens, cookie_secure=s.settings.cookie_secure)
    trusted_proxies = parse_networks(s.settings.trusted_proxies)
    app.include_router(
        auth_router(
            auth,
            s.users,
            s.login_throttle,
            public_base_url=s.settings.public_base_url,
            trusted_proxies=trusted_proxies,
        )
    )
    chat_limits = ChatLimits(
        max_connections_per_client=s.settings.chat_max_connections,
        messages_burst=s.settings.chat_messages_burst,
        messages_per_minute=s.settings.chat_messages_per_minute,
        idle_timeout_s=s.settings.chat_idle_seconds,
    )
    app.include_router(
        chat_router(metered, s.store, s.hub, s.clock, limits=chat_limits, trusted_proxies=trusted_proxies)  # type: ignore[arg-type]
    )
    app.include_router(messaging_router(metered, guard=s.twilio_guard))  # type: ignore[arg-type]
    from telephony.transfer import mount_transfer  # noqa: PLC0415

    mount_transfer(app, s)
    if s.transfer is not None and s.desk is not None:
        s.desk.routing.skip_voice_handoffs = True
    _mount_voice(app, s, metered)
    label_lookup = s.business.get_label if isinstance(s.business, BuiltinCRM) else None
    from crm_bridge.access import AccessPolicy  # noqa: PLC0415

    access = AccessPolicy(s.pool)  # what each staff member may read, for every route below
    app.include_router(
        api_router(
            s.reports,
            s.intents,
            s.business,
            require=auth.require,
            access=access,
            on_intents_changed=s.reload_intents,
            label_lookup=label_lookup,
        )
    )
    from web.console import console_router  # noqa: PLC0415
    from web.outbox_routes import outbox_router  # noqa: PLC0415

    app.include_router(outbox_router(s.pool, auth.require))
    from web.supervisor import supervisor_router  # noqa: PLC0415

    app.include_router(
        console_router(auth, s.desk, s.reports, access, public_base_url=s.settings.public_base_url)
    )
    app.include_router(
        supervisor_router(
            auth,
            s.desk.routing,
            s.reports,
            access,
            active_calls=lambda: len(s.active_calls),
            webchat_online=lambda: s.hub.online,
        )
    )

    @app.get("/openapi.json", include_in_schema=False, dependencies=[Depends(auth.require())])
    async def openapi() -> JSONResponse:
        return JSONResponse(app.openapi())

    @app.get(
        "/docs",
        include_in_schema=False,
        response_class=HTMLResponse,
        dependencies=[Depends(auth.require_page())],
    )
    async def docs() -> HTMLResponse:
        return get_swagger_ui_html(openapi_url="/openapi.json", title="closeloop API")

    @app.get("/", include_in_schema=False)
    async def index() -> RedirectResponse:
        return RedirectResponse("/chat")

    @app.get("/healthz", tags=["ops"])
    async def healthz() -> JSONResponse:
        try:
            await s.pool.fetchval("SELECT 1")
        except Exception as e:
            return JSONResponse({"status": "error", "database": type(e).__name__}, status_code=503)
        return JSONResponse({"status": "ok", "database": "ok"})

    metrics_access = [] if s.settings.metrics_public else [Depends(auth.require(*MANAGERS))]

    @app.get("/metrics", tags=["ops"], response_class=PlainTextResponse, dependencies=metrics_access)
    async def metrics() -> PlainTextResponse:
        for name, value in (await s.reports.counts()).items():
            s.metrics.gauges[name].set(value)
        s.metrics.webchat_online.set(s.hub.online)
        return PlainTextResponse(
            generate_latest(s.metrics.registry).decode(), media_type="text/plain; version=0.0.4"
        )

    _ = ApiError  # the API's error type is rendered by the StarletteHTTPException handler above


async def _preload_speech(s: Services) -> None:
    try:
        started = time.perf_counter()
        await s.speech.start()
        print(
            f"closeloop: speech models ready in {time.perf_counter() - started:.1f} s (calls: POST /twilio/voice)",
            file=sys.stderr,
        )
    except asyncio.CancelledError:
        raise
    except Exception:
        log.exception("could not start the speech stack; calls will retry on arrival")


def _mount_voice(app: FastAPI, s: Services, metered: Any) -> None:
    from crm_bridge.conversations import record_event  # noqa: PLC0415
    from telephony.voice_routes import BUSY_MESSAGE, StreamCaller, voice_router  # noqa: PLC0415
    from voice.call_session import CallSession, TurnTimings, VoiceConfig  # noqa: PLC0415
    from voice.speech_stack import Upsampler  # noqa: PLC0415

    settings = s.settings
    config = VoiceConfig(
        barge_in_min_ms=settings.voice_barge_in_ms,
        backchannels=frozenset(
            w.strip().lower() for w in settings.voice_backchannels.split(",") if w.strip()
        ),
        reprompt_after_s=settings.voice_reprompt_seconds,
    )
    new_transcriber = _transcriber_factory(s)

    async def on_turn(conversation_id: int, t: TurnTimings) -> None:
        for name, value in (
            ("stt", t.stt_ms),
            ("turn_manager", t.core_ms),
            ("tts_first_audio", t.tts_first_audio_ms),
            ("voice_to_voice", t.voice_to_voice_ms),
        ):
            if value is not None:
                s.metrics.voice[name].observe(value / 1000)
        async with s.pool.acquire() as conn:
            await record_event(
                conn,
                conversation_id,
                "voice_turn",
                {
                    "stt_ms": _ms(t.stt_ms),
                    "turn_manager_ms": _ms(t.core_ms),
                    "tts_first_audio_ms": _ms(t.tts_first_audio_ms),
                    "voice_to_voice_ms": _ms(t.voice_to_voice_ms),
                    "reply_chars": t.text_chars,
                },
                s.clock.now(),
            )

    class _TrackedSession(CallSession):
        stream_sid = ""

        async def start(self) -> None:
            await super().start()
            await s.calls.stream_started(
                self.call_sid, self.stream_sid, self.conversation_id, self.caller, s.clock.now()
            )

        async def close(self, reason: str) -> None:
            try:
                await super().close(reason)
            finally:
                s.active_calls.discard(self)
                s.metrics.calls_active.set(len(s.active_calls))

    async def session_factory(start: Any, line: Any, identity: StreamCaller) -> CallSession:
        # The caller comes from the call row the signed voice webhook wrote (identity), never
        # from the stream's customParameters, which whoever opens the socket chooses.
        await s.speech.start()
        session = _TrackedSession(
            call_sid=start.call_sid,
            caller=identity.caller,
            caller_attested=identity.attested,
            conversation=metered,
            line=line,
            detector=s.speech.detector(),
            stt=await new_transcriber(start.call_sid),
            tts=s.speech.synthesizer(),
            resample_8k_to_16k=Upsampler(),
            config=config,
            on_turn=on_turn,
            on_handoff=s.transfer.on_handoff if s.transfer else None,
        )
        session.stream_sid = start.stream_sid
        s.active_calls.add(session)
        s.metrics.calls_active.set(len(s.active_calls))
        return session

    fallback_queue = CoreConfig().fallback_queue

    async def lines_busy(call_sid: str, caller: str | None, called: str | None) -> None:
        now = s.clock.now()
        await s.calls.lines_busy(
            call_sid,
            caller,
            queue=fallback_queue,
            said=BUSY_MESSAGE,
            due=now + timedelta(minutes=settings.transfer_callback_minutes),
            now=now,
        )

    app.include_router(
        voice_router(
            guard=s.twilio_guard,
            calls=s.calls,
            clock=s.clock,
            tokens=_stream_tokens(s),
            session_factory=session_factory,
            hangup=s.call_control.hangup if s.call_control else None,
            on_violation=lambda reason, fatal: s.metrics.media_violations.labels(
                reason, str(fatal).lower()
            ).inc(),
            active_calls=lambda: len(s.active_calls),
            max_calls=settings.max_calls,
            lines_busy=lines_busy,
            busy_message=BUSY_MESSAGE,
            start_timeout_s=settings.media_start_timeout_s,
        )
    )


def _stream_tokens(s: Services) -> Any:
    """The media stream tokens, keyed by CLOSELOOP_SECRET_KEY (or a random key for this process)."""
    import secrets  # noqa: PLC0415

    from telephony.stream_tokens import StreamTokens  # noqa: PLC0415

    key = s.settings.secret_key
    if not key:
        key = secrets.token_urlsafe(32)
        log.warning(
            "CLOSELOOP_SECRET_KEY is not set: media stream tokens use a random key of this process "
            "(set it when several processes answer calls behind one address)"
        )
    return StreamTokens(key.encode(), lambda: s.clock.now().timestamp())


def _transcriber_factory(s: Services) -> Any:
    """``async (call_sid) -> transcriber`` for new calls: the shared Whisper, or (``CLOSELOOP_STT=deepgram``
    with a key) a per-call Deepgram stream that falls back to the shared Whisper."""
    settings = s.settings

    async def whisper(call_sid: str) -> Any:
        return s.speech.transcriber()

    if settings.stt_provider != "deepgram":
        return whisper
    if not settings.deepgram_api_key:
        log.warning("CLOSELOOP_STT=deepgram but DEEPGRAM_API_KEY is not set; calls use Whisper")
        return whisper
    from voice.deepgram_stt import DeepgramOptions, DeepgramTranscriber, deepgram_client  # noqa: PLC0415

    client = deepgram_client(settings.deepgram_api_key, settings.deepgram_url)
    options = DeepgramOptions(model=settings.deepgram_model)

    async def deepgram(call_sid: str) -> Any:
        stt = DeepgramTranscriber(
            client,
            s.speech.transcriber(),
            call_id=call_sid,
            options=options,
            on_fallback=lambda reason: s.metrics.stt_fallbacks.labels(reason).inc(),
        )
        await stt.start()
        return stt

    return deepgram


def _ms(value: float | None) -> float | None:
    return round(value, 1) if value is not None else None


# ---- CLI -----------------------------------------------------------------------------------------------
def _configure_logging(level: str) -> None:
    logging.basicConfig(level=level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")


async def _with_pool(settings: Settings, work: Any) -> Any:
    dsn, embedded, _ = await open_database(settings)
    pool = await db.create_pool(dsn, min_size=1, max_size=2)
    try:
        async with pool.acquire() as conn:
            await db.migrate(conn)
        return await work(pool)
    finally:
        await pool.close()
        if embedded:
            await embedded.stop()


def _cmd_serve(args: argparse.Namespace, settings: Settings) -> int:
    import uvicorn  # noqa: PLC0415

    if args.host:
        settings.host = args.host
    if args.port:
        settings.port = args.port
    _configure_logging(settings.log_level)
    print(
        f"closeloop: serving on http://{settings.host}:{settings.port}  (web chat: /chat, API docs: /docs)",
        file=sys.stderr,
    )
    uvicorn.run(
        create_app(settings),
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level.lower(),
        ws_max_size=65536,
        access_log=False,
        timeout_graceful_shutdown=10,
        proxy_headers=False,  # X-Forwarded-For is believed only from CLOSELOOP_TRUSTED_PROXIES (web/limits.py)
    )
    return 0


def _cmd_chat(args: argparse.Namespace, settings: Settings) -> int:
    from web.chat_client import run_from_args  # noqa: PLC0415

    if args.url is None:
        args.url = settings.base_url
    return run_from_args(args)


def _cmd_call(args: argparse.Namespace, settings: Settings) -> int:
    from telephony.simulator import run_from_args  # noqa: PLC0415

    if args.url is None:
        args.url = settings.base_url
    if args.auth_token is None:
        args.auth_token = settings.twilio_auth_token
    return run_from_args(args)


def _cmd_demo(args: argparse.Namespace, settings: Settings) -> int:
    async def work(pool: asyncpg.Pool) -> int:
        return await seed_demo(pool, SystemClock().now())

    count = asyncio.run(_with_pool(settings, work))
    print(
        f"demo company loaded: 3 customers, {count} orders (try: closeloop chat, then 'my phone is +15550100001')"
    )
    return 0


def _cmd_intents(args: argparse.Namespace, settings: Settings) -> int:
    async def work(pool: asyncpg.Pool) -> int:
        store = IntentStore(pool)
        await store.seed_if_empty(load_yaml(settings.intents_file))
        if args.intents_cmd == "import":
            intents = load_yaml(Path(args.file))
            await store.replace_all(intents)
            print(f"imported {len(intents)} intents from {args.file}")
        else:
            text = dump_yaml(await store.list())
            if args.file and args.file != "-":
                Path(args.file).write_text(text, encoding="utf-8")
                print(f"exported intents to {args.file}", file=sys.stderr)
            else:
                sys.stdout.write(text)
        return 0

    return int(asyncio.run(_with_pool(settings, work)))


def _read_password(args: argparse.Namespace) -> str:
    """The new password: the first line of stdin with ``--password-stdin``, else asked twice."""
    if args.password_stdin:
        password = sys.stdin.readline().rstrip("\r\n")
    else:
        if not sys.stdin.isatty():
            raise ValueError("no terminal to ask for the password: pipe it in with --password-stdin")
        password = getpass.getpass(f"Password for {args.email} ({MIN_PASSWORD_LENGTH}+ characters): ")
        check_password_strength(password)
        if getpass.getpass("Repeat the password: ") != password:
            raise ValueError("the two passwords differ; nothing was changed")
    check_password_strength(password)
    return password


def _cmd_user(args: argparse.Namespace, settings: Settings) -> int:
    # Ask for the password before starting a database: a typo should not cost a server start.
    password = _read_password(args) if args.user_cmd in ("add", "password") else ""

    async def work(pool: asyncpg.Pool) -> int:
        users = UserStore(pool)
        if args.user_cmd == "add":
            user = await users.create_user(args.email, args.name, args.role, password, phone=args.phone)
            print(f"created {user.role} {user.name} <{user.email}> (user {user.id})")
        elif args.user_cmd == "password":
            user = await _user_by_email(users, args.email)
            await users.set_password(user.id, password)
            print(f"new password set for {user.email}; their browser sessions were ended")
        else:
            for u in await users.list():
                flags = " (disabled)" if u.disabled else ""
                print(f"{u.id:>5}  {u.role:<10}  {u.email:<32}  {u.name}{flags}")
        return 0

    return int(asyncio.run(_with_pool(settings, work)))


async def _user_by_email(users: UserStore, email: str) -> User:
    user = await users.get_by_email(email)
    if user is None:
        raise ValueError(f"no user with the email {email} (see: closeloop user list)")
    return user


def _cmd_agent(args: argparse.Namespace, settings: Settings) -> int:
    from crm_bridge.routing import Routing  # noqa: PLC0415

    async def work(pool: asyncpg.Pool) -> int:
        user = await _user_by_email(UserStore(pool), args.email)
        routing = Routing(pool, SystemClock())
        agent = None
        if args.queues is not None:
            agent = await routing.set_queues(
                user.id, [q.strip() for q in args.queues.split(",") if q.strip()]
            )
        if args.skills is not None:
            agent = await routing.set_skills(
                user.id, [k.strip() for k in args.skills.split(",") if k.strip()]
            )
        if args.capacity is not None:
            agent = await routing.set_capacity(user.id, args.capacity)
        if args.presence is not None:
            agent = await routing.set_presence(user.id, args.presence)
        agent = agent or await routing.agent(user.id)
        if agent is None:
            print(f"{user.email} has no agent settings yet (give --queues)")
            return 0
        print(
            f"{user.email}: queues {', '.join(agent.queues) or '-'}; skills {', '.join(agent.skills) or '-'}; "
            f"capacity {agent.capacity}; {agent.presence}"
        )
        return 0

    return int(asyncio.run(_with_pool(settings, work)))


def _cmd_token(args: argparse.Namespace, settings: Settings) -> int:
    async def work(pool: asyncpg.Pool) -> int:
        tokens = ApiTokenStore(pool)
        if args.token_cmd == "create":
            user = await _user_by_email(UserStore(pool), args.email)
            token = await tokens.create(user, args.name)
            print(
                f"API token {args.name!r} acts as {user.email} ({user.role}). It is shown only this once; "
                "send it as 'Authorization: Bearer <token>':",
                file=sys.stderr,
            )
            print(token)
        elif args.token_cmd == "revoke":
            if not await tokens.revoke_id(args.id):
                raise ValueError(f"no live API token {args.id} (see: closeloop token list)")
            print(f"revoked API token {args.id}")
        else:
            users = {u.id: u.email for u in await UserStore(pool).list()}
            for t in await tokens.list():
                used = t.last_used_at.strftime("%Y-%m-%d %H:%M") if t.last_used_at else "never"
                state = "revoked" if t.revoked_at else "live"
                print(
                    f"{t.id:>5}  {state:<7}  {users.get(t.user_id, '?'):<32}  {t.name:<24}  last used: {used}"
                )
        return 0

    return int(asyncio.run(_with_pool(settings, work)))


def _cmd_outbox(args: argparse.Namespace, settings: Settings) -> int:
    async def work(pool: asyncpg.Pool) -> int:
        rows = await local_outbox(pool, limit=args.limit)
        if not rows:
            print("the local outbox is empty (no verification codes waiting)", file=sys.stderr)
        for r in reversed(rows):
            print(
                f"{r['created_at']:%Y-%m-%d %H:%M:%S}  {r['channel']:<8}  to {r['address']:<18}  {r['body']}"
            )
        return 0

    return int(asyncio.run(_with_pool(settings, work)))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="closeloop", description="closeloop: an AI contact center that completes work."
    )
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="run the server (embedded PostgreSQL when DATABASE_URL is unset)")
    serve.add_argument("--host")
    serve.add_argument("--port", type=int)
    chat = sub.add_parser("chat", help="talk to a running server from the terminal")
    from web.chat_client import main_args  # noqa: PLC0415

    main_args(chat)
    chat.set_defaults(url=None)
    call = sub.add_parser("call", help="place a simulated Twilio phone call to a running server")
    from telephony.simulator import add_arguments  # noqa: PLC0415

    add_arguments(call)
    call.set_defaults(url=None, auth_token=None)
    demo = sub.add_parser("demo", help="demo data")
    demo_sub = demo.add_subparsers(dest="demo_cmd", required=True)
    demo_sub.add_parser("seed", help="load the demo company into the database")
    intents = sub.add_parser("intents", help="import or export intents as YAML")
    intents_sub = intents.add_subparsers(dest="intents_cmd", required=True)
    imp = intents_sub.add_parser("import", help="replace the stored intents with a YAML file")
    imp.add_argument("file")
    exp = intents_sub.add_parser("export", help="write the stored intents as YAML")
    exp.add_argument("file", nargs="?", default="-")
    user = sub.add_parser("user", help="people who sign in: agents, supervisors, admins")
    user_sub = user.add_subparsers(dest="user_cmd", required=True)
    add = user_sub.add_parser("add", help="create a user (asks for the password twice)")
    add.add_argument("email")
    add.add_argument("--name", required=True)
    add.add_argument("--role", required=True, choices=ROLES)
    add.add_argument("--phone", help="where the agent takes warm transfers, e.g. +15550100001")
    add.add_argument(
        "--password-stdin", action="store_true", help="read the password from the first line of stdin"
    )
    password = user_sub.add_parser("password", help="set a new password (ends the user's browser sessions)")
    password.add_argument("email")
    password.add_argument(
        "--password-stdin", action="store_true", help="read the password from the first line of stdin"
    )
    user_sub.add_parser("list", help="list users")
    agent = sub.add_parser("agent", help="an agent's queues, skills, capacity and presence")
    agent_sub = agent.add_subparsers(dest="agent_cmd", required=True)
    agent_set = agent_sub.add_parser(
        "set", help="e.g. closeloop agent set maya@example.com --queues support,billing"
    )
    agent_set.add_argument("email")
    agent_set.add_argument("--queues", help="comma-separated queue names")
    agent_set.add_argument("--skills", help="comma-separated skills")
    agent_set.add_argument("--capacity", type=int, help="conversations at once")
    agent_set.add_argument("--presence", choices=("available", "busy", "away"))
    token = sub.add_parser("token", help="API tokens for integrations (Authorization: Bearer ...)")
    token_sub = token.add_subparsers(dest="token_cmd", required=True)
    create = token_sub.add_parser("create", help="create a token acting as a user; printed once")
    create.add_argument("email")
    create.add_argument("--name", required=True, help="what uses the token, e.g. 'prometheus' or 'crm sync'")
    revoke = token_sub.add_parser("revoke", help="revoke a token by id")
    revoke.add_argument("id", type=int)
    token_sub.add_parser("list", help="list tokens (never their values)")
    outbox = sub.add_parser(
        "outbox", help="verification codes waiting in the local outbox (embedded demo: no SMS provider)"
    )
    outbox.add_argument("--limit", type=int, default=20, help="how many of the latest to show")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    settings = Settings()
    handler = {
        "serve": _cmd_serve,
        "chat": _cmd_chat,
        "call": _cmd_call,
        "demo": _cmd_demo,
        "intents": _cmd_intents,
        "user": _cmd_user,
        "token": _cmd_token,
        "outbox": _cmd_outbox,
        "agent": _cmd_agent,
    }[args.command]
    try:
        return handler(args, settings)
    except KeyboardInterrupt:
        return 130
    except (RuntimeError, ValueError, OSError) as e:
        print(f"closeloop: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
