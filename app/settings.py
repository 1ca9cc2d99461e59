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


def _env(*names: str, default: Any = None, **constraints: Any) -> Any:
    """A setting read from the first of ``names`` that is set in the environment or ``.env`` (most
    end with the field's own name); ``constraints`` as for pydantic's ``Field`` (``gt``, ``ge`` ...)."""
    return Field(default, validation_alias=AliasChoices(*names), **constraints)


class Settings(BaseSettings):
    """Every setting closeloop reads, from the environment (or a ``.env`` file)."""

    model_config = SettingsConfigDict(env_file=".env", extra="ignore", populate_by_name=True)

    database_url: str | None = _env("DATABASE_URL")
    data_dir: Path = _env("CLOSELOOP_DATA_DIR", "data_dir", default=Path(".closeloop"))
    host: str = _env("CLOSELOOP_HOST", "host", default="127.0.0.1")
    port: int = _env("CLOSELOOP_PORT", "PORT", "port", default=8080)
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
    allow_unsigned_twilio: bool = _env(
        "CLOSELOOP_ALLOW_UNSIGNED_TWILIO", "allow_unsigned_twilio", default=False
    )
    # Signs per-call media stream tokens; unset: a random key per process (streams then work only
    # with the process that answered the voice webhook, which is how Twilio connects anyway).
    secret_key: str | None = _env("CLOSELOOP_SECRET_KEY", "secret_key")
    max_calls: int = _env("CLOSELOOP_MAX_CALLS", "max_calls", default=20, ge=1)
    # Fleet: each node heartbeats this often; another node that sees no heartbeat for the timeout
    # ends the node's calls (node_lost) and books call backs (crm_bridge/nodes.py).
    node_heartbeat_seconds: float = _env(
        "CLOSELOOP_NODE_HEARTBEAT_SECONDS", "node_heartbeat_seconds", default=5.0, gt=0
    )
    node_timeout_seconds: float = _env(
        "CLOSELOOP_NODE_TIMEOUT_SECONDS", "node_timeout_seconds", default=20.0, gt=0
    )
    # On SIGTERM calls in progress may go on this long before they end with a goodbye (app/drain.py).
    drain_seconds: float = _env("CLOSELOOP_DRAIN_SECONDS", "drain_seconds", default=30.0, ge=0)
    media_start_timeout_s: float = _env(
        "CLOSELOOP_MEDIA_START_TIMEOUT", "media_start_timeout_s", default=5.0, gt=0
    )
    crm_backend: Literal["builtin", "rest"] = _env("CLOSELOOP_CRM", "crm_backend", default="builtin")
    crm_rest_url: str | None = _env("CRM_REST_URL", "crm_rest_url")
    crm_rest_token: str | None = _env("CRM_REST_TOKEN", "crm_rest_token")
    intents_file: Path = _env("CLOSELOOP_INTENTS_FILE", "intents_file", default=ROOT / "intents.yaml")
    intent_threshold: float | None = _env("CLOSELOOP_INTENT_THRESHOLD", "intent_threshold")
    # The held-out phrases the admin page offers for checking a threshold (absent: paste your own).
    intent_heldout_file: Path = _env(
        "CLOSELOOP_INTENT_HELDOUT_FILE",
        "intent_heldout_file",
        default=ROOT / "tests" / "data" / "intent_heldout.yaml",
    )
    demo_seed: bool | None = _env("CLOSELOOP_DEMO_SEED", "demo_seed")
    refund_window_days: int = _env("CLOSELOOP_REFUND_WINDOW_DAYS", "refund_window_days", default=30)
    refund_max_cents: int = _env("CLOSELOOP_REFUND_MAX_CENTS", "refund_max_cents", default=100_000)
    followup_hours: int = _env("CLOSELOOP_FOLLOWUP_HOURS", "followup_hours", default=48)
    job_poll_seconds: float = _env("CLOSELOOP_JOB_POLL_SECONDS", "job_poll_seconds", default=1.0)
    db_pool_size: int = _env("CLOSELOOP_DB_POOL_SIZE", "db_pool_size", default=20)
    # Turns running at once per process (a turn holds no database connection while it thinks, so
    # these bound work in flight, not the pool); voice and text apart, so chats never delay a caller.
    voice_turns: int = _env("CLOSELOOP_VOICE_TURNS", "voice_turns", default=50, ge=1)
    text_turns: int = _env("CLOSELOOP_TEXT_TURNS", "text_turns", default=200, ge=1)
    transfer_ring_seconds: int = _env("CLOSELOOP_TRANSFER_RING_SECONDS", "transfer_ring_seconds", default=20)
    transfer_callback_minutes: int = _env(
        "CLOSELOOP_TRANSFER_CALLBACK_MINUTES", "transfer_callback_minutes", default=30
    )
    # Waiting work of an open queue that nobody available can take moves to the queue's overflow
    # queue (when that one is open with a free agent) after this many minutes; 0 turns it off.
    overflow_after_minutes: int = _env(
        "CLOSELOOP_OVERFLOW_AFTER_MINUTES", "overflow_after_minutes", default=5, ge=0
    )
    voice_preload: bool = _env("CLOSELOOP_VOICE_PRELOAD", "voice_preload", default=True)
    voice_barge_in_ms: int = _env("CLOSELOOP_BARGE_IN_MS", "voice_barge_in_ms", default=900)
    voice_backchannels: str = _env(
        "CLOSELOOP_BACKCHANNELS",
        "voice_backchannels",
        default="mm,mmhmm,mm-hmm,mhm,uh-huh,okay,ok,yeah,yep,right,sure,i see,got it,alright",
    )
    voice_reprompt_seconds: float = _env("CLOSELOOP_REPROMPT_SECONDS", "voice_reprompt_seconds", default=10.0)
    voice_short_silence: float = _env("CLOSELOOP_SHORT_SILENCE", "voice_short_silence", default=0.3)
    voice_long_silence: float = _env("CLOSELOOP_LONG_SILENCE", "voice_long_silence", default=0.8)
    # Synthesized pieces kept for reuse by every call (fixed lines start at once); 0 turns it off.
    voice_speech_cache: int = _env("CLOSELOOP_SPEECH_CACHE", "voice_speech_cache", default=512, ge=0)
    whisper_model_path: Path | None = _env("CLOSELOOP_WHISPER_MODEL", "whisper_model_path")
    # The bundled Whisper model (voice.stt.BUNDLED_MODELS) when CLOSELOOP_WHISPER_MODEL names no folder.
    stt_model: Literal["tiny.en", "base"] = _env("CLOSELOOP_STT_MODEL", "stt_model", default="tiny.en")
    # Whisper's vocabulary prompt (unset: voice.stt.DEFAULT_PROMPT, contact-center words; "": none).
    stt_prompt: str | None = _env("CLOSELOOP_STT_PROMPT", "stt_prompt")
    whisper_threads: int = _env("CLOSELOOP_WHISPER_THREADS", "whisper_threads", default=2)
    whisper_workers: int = _env("CLOSELOOP_WHISPER_WORKERS", "whisper_workers", default=1)
    piper_voice_path: Path | None = _env("CLOSELOOP_PIPER_VOICE", "piper_voice_path")
    # Speech to text of calls: the embedded Whisper, Deepgram live, or the pipecat STT service below
    # (Whisper stays the fallback).
    stt_provider: Literal["whisper", "deepgram", "pipecat"] = _env(
        "CLOSELOOP_STT", "stt_provider", default="whisper"
    )
    deepgram_api_key: str | None = _env("DEEPGRAM_API_KEY", "deepgram_api_key")
    deepgram_url: str = _env("DEEPGRAM_URL", "deepgram_url", default="wss://api.deepgram.com")
    deepgram_model: str = _env("DEEPGRAM_MODEL", "deepgram_model", default="nova-3")
    # Any pipecat speech service (docs/speech_services.md): a class under pipecat.services and its
    # keyword arguments as a JSON object, where "$NAME" stands for the environment variable NAME.
    # STT is used with CLOSELOOP_STT=pipecat; TTS replaces Piper when set (Piper stays the fallback).
    stt_service: str | None = _env("CLOSELOOP_STT_SERVICE", "stt_service")
    stt_params: str = _env("CLOSELOOP_STT_PARAMS", "stt_params", default="")
    tts_service: str | None = _env("CLOSELOOP_TTS_SERVICE", "tts_service")
    tts_params: str = _env("CLOSELOOP_TTS_PARAMS", "tts_params", default="")
    log_level: str = _env("CLOSELOOP_LOG_LEVEL", "LOG_LEVEL", "log_level", default="INFO")
    # Card numbers (and the patterns below) are redacted from customer and agent text before it is
    # stored, from event payloads and from every log line. Patterns: a JSON object name -> regex,
    # e.g. CLOSELOOP_REDACT_PATTERNS='{"ssn": "\\b\\d{3}-\\d{2}-\\d{4}\\b"}'; '{}' for none.
    redact_cards: bool = _env("CLOSELOOP_REDACT_CARDS", "redact_cards", default=True)
    redact_patterns: dict[str, str] = Field(
        default_factory=lambda: dict(DEFAULT_PATTERNS),
        validation_alias=AliasChoices("CLOSELOOP_REDACT_PATTERNS", "redact_patterns"),
    )
    # Call recording (opt-in): the caller hears "This call is recorded." first; both sides are kept
    # as a stereo WAV (caller left, bot right) under <data dir>/recordings, card numbers silenced,
    # for this many days, then deleted. Supervisors play it from the conversation timeline.
    record_calls: bool = _env("CLOSELOOP_RECORD_CALLS", "record_calls", default=False)
    recording_retention_days: float = _env(
        "CLOSELOOP_RECORDING_RETENTION_DAYS", "recording_retention_days", default=30, gt=0
    )
    # Turn manager: "embedded" (intents + slots, no network) or "llm" (a model drives the
    # conversation; the same policy code decides every action). See README "LLM engine".
    engine: Literal["embedded", "llm"] = _env("CLOSELOOP_ENGINE", "engine", default="embedded")
    llm_provider: Literal["openai", "anthropic"] = _env("LLM_PROVIDER", "llm_provider", default="openai")
    llm_base_url: str | None = _env("LLM_BASE_URL", "llm_base_url")
    llm_api_key: str | None = _env("LLM_API_KEY", "OPENAI_API_KEY", "ANTHROPIC_API_KEY", "llm_api_key")
    llm_model: str | None = _env("LLM_MODEL", "llm_model")
    # More providers tried in order when the first fails: a JSON list of objects with
    # provider, base_url, api_key, model, e.g. '[{"provider": "openai", "base_url":
    # "http://127.0.0.1:11434/v1", "model": "llama3.1"}]' (a local Ollama as the fallback).
    llm_fallbacks: list[dict[str, str]] = Field(
        default_factory=list, validation_alias=AliasChoices("LLM_FALLBACKS", "llm_fallbacks")
    )
    llm_timeout_s: float = _env("LLM_TIMEOUT", "llm_timeout_s", default=4.0, gt=0)
    llm_filler_after_s: float = _env("LLM_FILLER_AFTER", "llm_filler_after_s", default=1.2, gt=0)
    llm_max_turns: int = _env("LLM_MAX_TURNS", "llm_max_turns", default=60)
    llm_max_tool_calls: int = _env("LLM_MAX_TOOL_CALLS", "llm_max_tool_calls", default=120)
    company_name: str = _env("CLOSELOOP_COMPANY", "company_name", default="Closeloop Demo Store")
    # Topics that always go to a person: JSON object name -> regex; unset keeps the built-in
    # legal-threat and contract-renegotiation patterns.
    protected_topics: dict[str, str] | None = _env("CLOSELOOP_PROTECTED_TOPICS", "protected_topics")
    frustration_detection: bool = _env("CLOSELOOP_FRUSTRATION", "frustration_detection", default=True)
    metrics_public: bool = _env("CLOSELOOP_METRICS_PUBLIC", "metrics_public", default=False)
    session_hours: float = _env("CLOSELOOP_SESSION_HOURS", "session_hours", default=12, gt=0)
    session_idle_minutes: float = _env(
        "CLOSELOOP_SESSION_IDLE_MINUTES", "session_idle_minutes", default=120, gt=0
    )
    # Failed sign-ins from one client address (any emails) inside 15 minutes before that address
    # is refused for 15 minutes; each email has its own limit of 5 besides.
    login_max_failures_per_client: int = _env(
        "CLOSELOOP_LOGIN_MAX_FAILURES_PER_CLIENT", "login_max_failures_per_client", default=50, ge=1
    )
    # Request bodies over this many bytes are refused with 413 body_too_large, on every route.
    max_body_bytes: int = _env("CLOSELOOP_MAX_BODY_BYTES", "max_body_bytes", default=1024 * 1024, ge=1)
    # Proxies whose X-Forwarded-For is believed for the client address (comma-separated addresses
    # or networks, e.g. "10.0.0.5,192.168.0.0/16"); empty: the peer address is the client.
    trusted_proxies: str = _env("CLOSELOOP_TRUSTED_PROXIES", "trusted_proxies", default="")
    # Browser calls (telephony/webrtc.py): ICE servers as JSON, e.g.
    # [{"urls": "stun:stun.example.org:3478"}, {"urls": "turn:turn.example.org", "username": "u", "credential": "p"}];
    # none needed on loopback or a LAN.
    ice_servers: str = _env("CLOSELOOP_ICE_SERVERS", "ice_servers", default="[]")
    webrtc_calls_per_client: int = _env(
        "CLOSELOOP_WEBRTC_CALLS_PER_CLIENT", "webrtc_calls_per_client", default=2, ge=1
    )
    # Web chat (WS /chat) per client address: open sockets, messages (a burst, then a rate), and
    # how long a socket may stay silent before it is closed.
    chat_max_connections: int = _env(
        "CLOSELOOP_CHAT_MAX_CONNECTIONS", "chat_max_connections", default=10, ge=1
    )
    chat_messages_burst: int = _env("CLOSELOOP_CHAT_MESSAGES_BURST", "chat_messages_burst", default=10, ge=1)
    chat_messages_per_minute: float = _env(
        "CLOSELOOP_CHAT_MESSAGES_PER_MINUTE", "chat_messages_per_minute", default=30, gt=0
    )
    chat_idle_seconds: float = _env("CLOSELOOP_CHAT_IDLE_SECONDS", "chat_idle_seconds", default=900, gt=0)
    # One-time verification codes issued in an hour, per customer and per client address.
    code_limit_per_customer_hour: int = _env(
        "CLOSELOOP_CODE_LIMIT_PER_CUSTOMER_HOUR", "code_limit_per_customer_hour", default=5, ge=1
    )
    code_limit_per_client_hour: int = _env(
        "CLOSELOOP_CODE_LIMIT_PER_CLIENT_HOUR", "code_limit_per_client_hour", default=10, ge=1
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
