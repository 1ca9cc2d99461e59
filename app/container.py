"""The typed service container of one app, built from per-feature builders.

:func:`build_services` opens the database, then builds each feature from the settings and what
it depends on; on any failure what was already started is stopped again.
"""

from __future__ import annotations

import asyncio
import logging
import sys
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import timedelta
from typing import TYPE_CHECKING

import asyncpg

from app.database import DatabaseHealth, open_database
from app.drain import Drain
from app.engines import build_embedded_engine, build_llm_engine
from app.metrics import Metrics
from app.settings import Settings
from app.texting import build_senders
from app.voice import build_call_control, build_speech
from crm_bridge import db, matching
from crm_bridge.agent_events import PgEventBridge
from crm_bridge.calls import CallStore
from crm_bridge.conversations import PgConversationStore
from crm_bridge.crm import BuiltinCRM
from crm_bridge.demo import seed_demo
from crm_bridge.desk import AgentDesk, build_desk
from crm_bridge.intents_store import IntentStore, load_yaml
from crm_bridge.jobs import JobRunner
from crm_bridge.nodes import ChatSessions, NodeRegistry
from crm_bridge.overflow import PgQueueHours
from crm_bridge.recordings import Recordings
from crm_bridge.reports import Reports
from crm_bridge.transfers import TransferStore
from crm_bridge.users import ApiTokenStore, LoginThrottle, Passwords, SessionStore, UserStore
from crm_bridge.verification import CodeLimits, PgVerificationCodes
from pipeline.clock import SystemClock
from pipeline.ports import BusinessSystem, Clock
from pipeline.redaction import Redactor
from pipeline.service import ConversationService, Reply
from pipeline.turn_engine import TurnEngine
from pipeline.turn_manager import CoreConfig
from telephony.call_control import TwilioCallControl
from telephony.transfer import TransferConfig, WarmTransfer
from telephony.twilio_guard import TwilioGuard
from voice.call_session import CallSession
from web.chat_routes import WebChatHub

if TYPE_CHECKING:
    from voice.speech_stack import SpeechStack

log = logging.getLogger("closeloop")

Closer = Callable[[], Awaitable[None]]


@dataclass
class Services:
    """Everything one app runs on; built by :func:`build_services`, closed by :meth:`close`."""

    settings: Settings
    clock: Clock
    pool: asyncpg.Pool
    business: BusinessSystem
    store: PgConversationStore
    intents: IntentStore
    turns: TurnEngine
    service: ConversationService
    jobs: JobRunner
    hub: WebChatHub
    reports: Reports
    metrics: Metrics
    users: UserStore
    sessions: SessionStore
    api_tokens: ApiTokenStore
    login_throttle: LoginThrottle
    calls: CallStore
    nodes: NodeRegistry
    chat_sessions: ChatSessions  # the web-chat sockets this node holds
    speech: SpeechStack
    desk: AgentDesk
    twilio_guard: TwilioGuard
    call_control: TwilioCallControl | None = None
    transfer: WarmTransfer | None = None  # on with Twilio call control: it routes phone-call handoffs
    embedded: db.EmbeddedPostgres | None = None
    db_health: DatabaseHealth = field(default_factory=DatabaseHealth)
    drain: Drain = field(default_factory=Drain)
    calls_idle: asyncio.Event = field(default_factory=asyncio.Event)  # no call runs (see CallTracker)
    closers: list[Closer] = field(default_factory=list)
    active_calls: set[CallSession] = field(default_factory=set)
    redactor: Redactor = field(default_factory=Redactor)
    recordings: Recordings | None = None  # call recordings kept (crm_bridge/recordings.py)

    async def reload_intents(self) -> None:
        self.turns.set_intents(await self.intents.list())

    async def close(self) -> None:
        for session in list(self.active_calls):
            await session.close("server_shutdown")
        await self.speech.stop()
        await self.jobs.stop()
        try:
            await self.nodes.stop()
        except Exception:
            log.warning("could not mark this node stopped", exc_info=True)
        for closer in reversed(self.closers):
            try:
                await closer()
            except Exception:
                log.exception("error while closing")
        await self.pool.close()
        if self.embedded is not None:
            await self.embedded.stop()


def build_redactor(settings: Settings) -> Redactor:
    """The redactor the settings ask for.

    Raises:
        ValueError: a configured pattern is not a valid regular expression.
    """
    return Redactor(tuple(settings.redact_patterns.items()), cards=settings.redact_cards)


def build_business(settings: Settings, pool: asyncpg.Pool, closers: list[Closer]) -> BusinessSystem:
    """The business system: the built-in CRM, or a REST CRM (``CLOSELOOP_CRM=rest``)."""
    if settings.crm_backend != "rest":
        return BuiltinCRM(pool, label_base_url=f"{settings.base_url}/labels")
    if not settings.crm_rest_url:
        raise RuntimeError("CLOSELOOP_CRM=rest needs CRM_REST_URL")
    from crm_bridge.rest_adapter import RestBusinessSystem  # noqa: PLC0415

    rest = RestBusinessSystem(settings.crm_rest_url, settings.crm_rest_token)
    closers.append(rest.aclose)
    return rest


def build_twilio_guard(settings: Settings, metrics: Metrics) -> TwilioGuard:
    """The one check every /twilio/* request passes (signatures, or the unsigned opt-in)."""
    return TwilioGuard(
        auth_token=settings.twilio_auth_token,
        public_base_url=settings.public_base_url,
        allow_unsigned=settings.twilio_unsigned_allowed,
        on_rejected=lambda reason: metrics.rejected.labels(reason).inc(),
    )


def build_transfer(
    settings: Settings, pool: asyncpg.Pool, desk: AgentDesk, control: TwilioCallControl, clock: Clock
) -> WarmTransfer:
    """The Twilio warm transfer (needs call control); its ring timers are closed with the app."""
    return WarmTransfer(
        TransferStore(pool),
        desk.routing,
        control,
        clock,
        TransferConfig(
            base_url=settings.base_url,
            caller_id=settings.twilio_sms_from,
            ring_seconds=settings.transfer_ring_seconds,
            callback_minutes=settings.transfer_callback_minutes,
        ),
    )


async def build_services(settings: Settings, clock: Clock | None = None) -> Services:
    """Open the database and build every service of one app from ``settings``."""
    clock = clock or SystemClock()
    redactor = build_redactor(settings)
    dsn, embedded, first_run = await open_database(settings)
    try:
        pool = await db.create_pool(dsn, min_size=2, max_size=settings.db_pool_size)
    except Exception:
        if embedded:
            await embedded.stop()
        raise
    closers: list[Closer] = []
    try:
        async with pool.acquire() as conn:
            await db.migrate(conn)
        business = build_business(settings, pool, closers)
        if settings.demo_seed or (settings.demo_seed is None and first_run):
            count = await seed_demo(pool, clock.now())
            print(f"closeloop: demo company loaded ({count} orders)", file=sys.stderr)
        intents = IntentStore(pool)
        seeded = await intents.seed_if_empty(load_yaml(settings.intents_file))
        if seeded:
            log.info("seeded intents", extra={"count": seeded})
        code_limits = CodeLimits(
            per_customer=settings.code_limit_per_customer_hour, per_client=settings.code_limit_per_client_hour
        )
        embedded_engine = build_embedded_engine(
            settings,
            business,
            await intents.list(),
            PgVerificationCodes(pool, code_limits),
            hours=PgQueueHours(pool),
        )
        await matching.apply_stored(pool, embedded_engine)  # the admin's threshold, if one was saved
        turns: TurnEngine = embedded_engine
        if settings.engine == "llm":
            llm = build_llm_engine(settings, embedded_engine)
            closers.append(llm.aclose)
            turns = llm
        hub = WebChatHub(clock)
        senders = build_senders(settings, hub, closers)
        call_control = build_call_control(settings)
        events = PgEventBridge(dsn, pool)
        # With call control on, the warm transfer routes phone-call handoffs itself (to agents
        # reachable by phone): the desk's general routing pass leaves them alone.
        desk = build_desk(
            pool,
            senders,
            clock,
            redactor=redactor,
            on_event=events.publish,
            skip_voice_handoffs=call_control is not None,
            overflow_after_minutes=settings.overflow_after_minutes,
        )
        await events.start(desk.deliver_local)
        closers.append(events.stop)
        if call_control is not None:
            closers.append(call_control.aclose)
        transfer = None
        if call_control is not None:
            transfer = build_transfer(settings, pool, desk, call_control, clock)
            closers.append(transfer.aclose)
        recordings = Recordings(
            pool,
            settings.data_dir / "recordings",
            clock,
            retention=timedelta(days=settings.recording_retention_days),
        )
        jobs = JobRunner(
            pool,
            senders,
            clock,
            poll_seconds=settings.job_poll_seconds,
            extra_passes=[desk.routing_pass, recordings.cleanup_pass],
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
            voice_turns=settings.voice_turns,
            text_turns=settings.text_turns,
        )
        nodes = NodeRegistry(
            pool,
            timeout=timedelta(seconds=settings.node_timeout_seconds),
            callback_after=timedelta(minutes=settings.transfer_callback_minutes),
            callback_queue=CoreConfig().fallback_queue,
        )
        await nodes.register()
        calls = CallStore(pool, nodes.id)
        speech = build_speech(settings)
    except Exception:
        for closer in closers:
            await closer()
        await pool.close()
        if embedded:
            await embedded.stop()
        raise
    now = clock.now
    return Services(
        settings=settings,
        clock=clock,
        pool=pool,
        business=business,
        store=store,
        intents=intents,
        turns=turns,
        service=service,
        jobs=jobs,
        hub=hub,
        reports=Reports(pool),
        metrics=metrics,
        users=UserStore(pool, passwords=Passwords(on_check=metrics.password_checks.inc), now=now),
        sessions=SessionStore(
            pool,
            lifetime=timedelta(hours=settings.session_hours),
            idle=timedelta(minutes=settings.session_idle_minutes),
            now=now,
        ),
        api_tokens=ApiTokenStore(pool, now=now),
        login_throttle=LoginThrottle(
            pool, max_client_failures=settings.login_max_failures_per_client, now=now
        ),
        calls=calls,
        nodes=nodes,
        chat_sessions=ChatSessions(pool, nodes.id),
        speech=speech,
        desk=desk,
        twilio_guard=build_twilio_guard(settings, metrics),
        call_control=call_control,
        transfer=transfer,
        embedded=embedded,
        closers=closers,
        redactor=redactor,
        recordings=recordings,
    )
