"""ConversationService turns over the in-memory store: re-run on a lost version check, what a
caller heard is not said twice, and separate budgets for voice and text turns."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from typing import Any

import pytest

from pipeline.clock import FakeClock
from pipeline.model import Channel, Intent, IntentMatch
from pipeline.ports import TurnWork
from pipeline.service import MAX_ATTEMPTS, ConversationService, Reply, TurnConflict
from pipeline.turn_manager import TurnContext, TurnResult
from tests.unit.fakes import FakeBusiness, FakeConversationStore

NOW = datetime(2026, 3, 2, 15, 0, tzinfo=UTC)


class ScriptedEngine:
    """Streams ``sentences`` (calls), replies with them, counts its runs; ``gate`` holds a turn
    of ``held_address`` until set."""

    def __init__(self, sentences: Sequence[str] = ("One.", "Two.")) -> None:
        self.sentences = list(sentences)
        self.runs = 0
        self.started = asyncio.Event()
        self.gate: asyncio.Event | None = None
        self.held_address: str | None = None

    @property
    def intents(self) -> Mapping[str, Intent]:
        return {}

    def set_intents(self, intents: Sequence[Intent]) -> None:
        pass

    async def greet_call(self, ctx: TurnContext, work: TurnWork) -> list[str]:
        return ["Hello."]

    async def handle(self, ctx: TurnContext, text: str, work: TurnWork) -> TurnResult:
        self.runs += 1
        if self.gate is not None and ctx.address == self.held_address:
            self.started.set()
            await self.gate.wait()
        await work.record_event("engine_ran", {"run": self.runs})
        if ctx.stream is not None:
            for sentence in self.sentences:
                await ctx.stream(sentence)
        ctx.state.slots["runs"] = ctx.state.slots.get("runs", 0) + 1
        return TurnResult(replies=list(self.sentences))

    async def aclose(self) -> None:
        pass


def service_with(engine: ScriptedEngine, **kwargs: Any) -> tuple[ConversationService, FakeConversationStore]:
    store = FakeConversationStore()
    business = FakeBusiness(customers=[], orders=[])
    return ConversationService(store, engine, business, FakeClock(NOW), **kwargs), store


async def test_a_turn_that_loses_its_version_check_runs_again_and_commits_once() -> None:
    engine = ScriptedEngine()
    committed: list[Reply] = []

    async def after_commit(reply: Reply) -> None:
        committed.append(reply)

    service, store = service_with(engine, after_commit=after_commit)
    store.conflicts = 2

    reply = await service.handle_text(Channel.WEBCHAT, "s1", "hi", external_id="m1")

    assert engine.runs == 3 and store.conflicts_raised == 2
    assert reply.texts == ["One.", "Two."] and not reply.duplicate
    conv = store.conversations[(Channel.WEBCHAT, "s1")]
    assert [m.body for m in conv.messages] == ["hi", "One.", "Two."]
    assert conv.state["slots"]["runs"] == 1  # only the committed attempt's state is kept
    assert [w.event_kinds() for w in store.works] == [["engine_ran"]]
    assert committed == []  # no outbox texts: the hook is for those


async def test_a_turn_gives_up_after_the_attempts_are_used_and_stores_nothing() -> None:
    engine = ScriptedEngine()
    service, store = service_with(engine)
    store.conflicts = MAX_ATTEMPTS

    with pytest.raises(TurnConflict):
        await service.handle_text(Channel.SMS, "+15550001111", "hi")

    assert engine.runs == MAX_ATTEMPTS and store.conversations == {} and store.works == []


async def test_sentences_a_caller_already_heard_are_not_streamed_again_by_a_rerun() -> None:
    engine = ScriptedEngine(["First sentence.", "Second sentence."])
    service, store = service_with(engine)
    store.conflicts = 1
    heard: list[str] = []

    async def stream(sentence: str) -> None:
        heard.append(sentence)
        if len(heard) == 2:  # the re-run writes something new after what was heard
            engine.sentences = ["First sentence.", "Second sentence.", "Third sentence."]

    reply = await service.handle_text(Channel.VOICE, "CA1", "hello", stream=stream)

    assert engine.runs == 2
    assert heard == ["First sentence.", "Second sentence.", "Third sentence."]
    assert reply.texts == ["First sentence.", "Second sentence.", "Third sentence."]


async def test_two_turns_of_one_conversation_at_once_both_commit_in_turn() -> None:
    engine = ScriptedEngine(["Ok."])
    engine.gate = asyncio.Event()
    service, store = service_with(engine)
    await service.handle_text(Channel.WEBCHAT, "s1", "first")  # the conversation exists
    engine.held_address = "s1"

    slow = asyncio.create_task(service.handle_text(Channel.WEBCHAT, "s1", "second"), name="slow-turn")
    await engine.started.wait()
    engine.held_address = None  # the next turn runs through while the first one thinks
    await service.handle_text(Channel.WEBCHAT, "s1", "third")
    engine.gate.set()
    await slow

    assert store.conflicts_raised == 1  # "second" lost to "third" and ran again on its state
    conv = store.conversations[(Channel.WEBCHAT, "s1")]
    assert [m.body for m in conv.messages] == ["first", "Ok.", "third", "Ok.", "second", "Ok."]
    assert conv.state["slots"]["runs"] == 3


async def test_text_turns_over_their_budget_wait_while_voice_turns_go_through() -> None:
    engine = ScriptedEngine(["Ok."])
    engine.gate, engine.held_address = asyncio.Event(), "chat-1"
    service, store = service_with(engine, text_turns=1, voice_turns=1)

    held = asyncio.create_task(service.handle_text(Channel.WEBCHAT, "chat-1", "hi"), name="held-chat")
    await engine.started.wait()
    waiting = asyncio.create_task(service.handle_text(Channel.WEBCHAT, "chat-2", "hi"), name="waiting-chat")
    call = await service.handle_text(Channel.VOICE, "CA1", "hello")

    assert call.texts == ["Ok."]
    assert engine.runs == 2 and not waiting.done()  # chat-2 has not started: no text slot
    engine.gate.set()
    await asyncio.gather(held, waiting)
    assert engine.runs == 3


class ClassifyingEngine(ScriptedEngine):
    """Replies as if it classified the text: ``match`` and ``action`` as given."""

    def __init__(self, match: Any, action: str | None) -> None:
        super().__init__(("Sorry, I didn't quite get that.",))
        self.match, self.action = match, action

    async def handle(self, ctx: TurnContext, text: str, work: TurnWork) -> TurnResult:
        return TurnResult(replies=list(self.sentences), match=self.match, action=self.action)


@pytest.mark.parametrize(
    ("match", "action", "understood"),
    [
        (IntentMatch(None, 0.2), None, False),  # nothing matched: the reply asks again
        (IntentMatch("order_status", 0.8), "order_status", True),
        (IntentMatch(None, 0.2), "confirm", True),  # a yes/no answer ran the action
        (None, None, None),  # not classified (a slot answer, the LLM engine)
    ],
)
async def test_the_reply_says_whether_the_core_understood_the_message(
    match: Any, action: str | None, understood: bool | None
) -> None:
    service, _ = service_with(ClassifyingEngine(match, action))
    reply = await service.handle_text(Channel.VOICE, "CA9", "can you hear it come this")
    assert reply.understood is understood
