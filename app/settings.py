"""Every setting closeloop reads, from the environment (or a ``.env`` file), read once.

The composition root builds one :class:`Settings` and passes it (or the values it holds) down; no
module below reads ``os.environ`` itself.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import AliasChoices, Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from pipeline.redaction import DEFAULT_PATTERNS
from telephony.signatures import is_loopback_host

# The project root: where ``server.py`` and ``intents.yaml`` live (the checkout, or site-packages).
ROOT = Path(__file__).resolve().parent.parent


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
    # Turns running at once per process (a turn holds no database connection while it thinks, so
    # these bound work in flight, not the pool); voice and text apart, so chats never delay a caller.
    voice_turns: int = Field(50, ge=1, validation_alias=AliasChoices("CLOSELOOP_VOICE_TURNS", "voice_turns"))
    text_turns: int = Field(200, ge=1, validation_alias=AliasChoices("CLOSELOOP_TEXT_TURNS", "text_turns"))
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
        return not self.twilio_auth_token and (self.allow_unsigned_twilio or is_loopback_host(self.host))
