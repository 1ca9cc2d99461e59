"""The Prometheus metrics of one process, and the conversation service wrapper that feeds them."""

from __future__ import annotations

import time
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from pipeline.model import Channel
from pipeline.service import ConversationService, Reply


class Metrics:
    """The Prometheus metrics of one process, in their own registry (one per app)."""

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
                # outcome rates over the last 7 days (docs/metrics.md has each formula)
                ("containment_rate", "Contacts resolved with no person involved, last 7 days"),
                ("resolution_rate", "Contacts resolved, last 7 days"),
                ("handoff_rate", "Contacts handed to a person, last 7 days"),
                ("recontact_rate", "Contacts from the same customer about the same intent within 7 days"),
                ("sla_compliance_rate", "Tickets that met their SLA, last 7 days"),
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
                ("voice_to_voice", "End of caller speech (last voiced audio) to first bot audio sent"),
                ("endpoint", "End of caller speech to the decision that their turn had ended"),
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


class MeteredService:
    """Wraps the conversation service to count messages and time turns."""

    def __init__(self, inner: ConversationService, metrics: Metrics) -> None:
        self._inner = inner
        self._metrics = metrics

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    async def handle_text(self, channel: Channel, address: str, text: str, **options: Any) -> Reply:
        """``ConversationService.handle_text``, counted and timed (``options`` passed on as given)."""
        start = time.perf_counter()
        reply = await self._inner.handle_text(channel, address, text, **options)
        self._metrics.turn_seconds.labels(str(channel)).observe(time.perf_counter() - start)
        if reply.duplicate:
            self._metrics.duplicates.inc()
        else:
            self._metrics.messages.labels(str(channel), "in").inc()
            self._metrics.messages.labels(str(channel), "out").inc(len(reply.messages))
        return reply
