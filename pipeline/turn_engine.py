"""What every turn engine speaks: the :class:`TurnEngine` interface and the types of one turn.

Both engines implement :class:`TurnEngine`: the embedded one
(:class:`~pipeline.turn_manager.TurnManager`: intent + slots -> policy-checked business actions
-> templated replies) and the LLM one (:class:`~pipeline.llm_engine.LLMTurnManager`, whose tools
run the embedded engine's actions). :class:`~pipeline.service.ConversationService` drives either
through this interface alone.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Protocol

from pipeline.identity import Identity
from pipeline.model import Channel, ConversationState, Customer, Intent, IntentMatch, Priority
from pipeline.policy import RefundPolicy
from pipeline.ports import TurnWork


@dataclass
class TurnContext:
    """The conversation as the turn manager sees it; mutated in place by a turn."""

    conversation_id: int
    channel: Channel
    address: str
    now: datetime
    state: ConversationState = field(default_factory=ConversationState)
    customer: Customer | None = None
    owner: str = "ai"
    status: str = "open"
    ticket_id: int | None = None
    next_step: str | None = None
    next_step_due: datetime | None = None
    # Speaks a line right away on a call (a filler while a slow answer is on its way); None on
    # text channels. Not stored with the turn: the engine records an event instead.
    speak: Callable[[str], Awaitable[None]] | None = None
    # Speaks a sentence of the reply as soon as it is written (LLM engine, calls only). The
    # stored reply starts with exactly the sentences streamed, so the call knows what is left.
    stream: Callable[[str], Awaitable[None]] | None = None
    # Who the conversation is with (see pipeline.identity); stored with the conversation.
    identity: Identity = field(default_factory=Identity)
    # The client's network address (web chat), for rate limiting one-time codes.
    client: str | None = None


@dataclass
class TurnResult:
    replies: list[str]
    intent: str | None = None
    match: IntentMatch | None = None
    action: str | None = None  # the action run this turn ("goodbye" ends a call)
    to_agent: bool = False  # the message is for the agent who owns the conversation (no bot reply)


#: (name, regex) of topics the AI never handles alone: a customer message matching one hands off.
DEFAULT_PROTECTED_TOPICS: tuple[tuple[str, str], ...] = (
    (
        "legal",
        r"\b(lawyers?|attorneys?|solicitors?|sue|suing|lawsuit|legal action|take (you|this) to court|small claims)\b",
    ),
    (
        "contract",
        r"\b(renegotiat\w*|contract terms|(change|amend|rewrite) (my|the|our) contract|breach of contract)\b",
    ),
)


@dataclass(frozen=True)
class CoreConfig:
    refund: RefundPolicy = field(default_factory=RefundPolicy)
    followup_hours: int = 48
    max_misses: int = 2
    fallback_queue: str = "support"
    history_size: int = 12  # customer/bot texts kept in the conversation state (LLM context)
    protected_topics: tuple[tuple[str, str], ...] = DEFAULT_PROTECTED_TOPICS


class MoodScorer(Protocol):
    """Scores how frustrated a customer message reads (see :mod:`pipeline.frustration`)."""

    def score_turn(self, text: str, previous_customer_texts: Sequence[str]) -> Any: ...


#: A frustrated turn raises escalations to at least this priority; angry ones to ``high``.
_PRIORITY_ORDER = [str(p) for p in (Priority.LOW, Priority.NORMAL, Priority.HIGH, Priority.URGENT)]


def higher_priority(a: str, b: str | None) -> str:
    if b is None or b not in _PRIORITY_ORDER or a not in _PRIORITY_ORDER:
        return a
    return max(a, b, key=_PRIORITY_ORDER.index)


def remember(state: ConversationState, role: str, text: str, size: int) -> None:
    """Append one text to the bounded conversation history kept in the state."""
    if text:
        state.history.append({"role": role, "content": text})
        del state.history[:-size]


class TurnEngine(Protocol):
    """A conversation engine: one customer turn in, replies and durable side effects out.

    An engine reads and mutates the conversation's :class:`TurnContext`, records side effects
    through :class:`~pipeline.ports.TurnWork` (written when the turn commits; a turn may be run
    again after a conflict, so business actions must be idempotent) and
    returns the reply texts; it never sends anything itself.
    """

    @property
    def intents(self) -> Mapping[str, Intent]:
        """The configured intents by name (enabled or not)."""
        ...

    def set_intents(self, intents: Sequence[Intent]) -> None:
        """Replace the configured intents (after an admin edit)."""
        ...

    async def greet_call(self, ctx: TurnContext, work: TurnWork) -> list[str]:
        """The first words of a phone call."""
        ...

    async def handle(self, ctx: TurnContext, text: str, work: TurnWork) -> TurnResult:
        """Run one customer turn."""
        ...

    async def aclose(self) -> None:
        """Release what the engine holds (HTTP connections of model providers)."""
        ...
