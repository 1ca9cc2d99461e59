"""The LLM providers against fake OpenAI and Anthropic servers on 127.0.0.1, through the real SDKs.

Most tests run once per wire format with the same scripted responder, as the turn manager will.
"""

from __future__ import annotations

import json
import socket
import time
from collections.abc import AsyncIterator, Sequence
from contextlib import aclosing, asynccontextmanager
from typing import Any

import openai
import pytest

from adapters.anthropic_llm import CALL_STARTED, AnthropicProvider, anthropic_messages
from adapters.llm_providers import build_provider
from adapters.openai_llm import openai_messages
from pipeline.llm_providers import (
    Finished,
    LLMEvent,
    LLMProvider,
    ProviderRejected,
    ProviderTimeout,
    ProviderUnavailable,
    TextDelta,
    ToolCall,
    ToolSpec,
)
from tests.fakes.llm_server import (
    Call,
    End,
    Fail,
    FakeAnthropic,
    FakeOpenAI,
    Hang,
    LLMRequest,
    Responder,
    Say,
    Script,
    Slow,
    in_order,
)

VENDORS = ["openai", "anthropic"]
SYSTEM = "You are the support agent of Acme. Be brief."
LOOKUP = ToolSpec(
    "lookup_order",
    "Find an order by its id.",
    {"type": "object", "properties": {"order_id": {"type": "string"}}, "required": ["order_id"]},
)
REFUND = ToolSpec(
    "issue_refund",
    "Refund an order.",
    {"type": "object", "properties": {"order_id": {"type": "string"}, "amount": {"type": "number"}}},
)
TOOLS = [LOOKUP, REFUND]


@asynccontextmanager
async def serving(
    vendor: str,
    responder: Responder,
    *,
    timeout_s: float = 5.0,
    api_key: str | None = None,
    style: str = "openai",
) -> AsyncIterator[tuple[FakeOpenAI | FakeAnthropic, LLMProvider]]:
    fake = FakeOpenAI(responder, style=style) if vendor == "openai" else FakeAnthropic(responder)
    async with fake:
        provider = build_provider(
            vendor,
            base_url=fake.base_url,
            api_key=api_key or fake.api_key,
            model="test-model",
            timeout_s=timeout_s,
        )
        try:
            yield fake, provider
        finally:
            await provider.aclose()


async def collect(
    provider: LLMProvider, messages: Sequence[dict[str, Any]], *, tools: Sequence[ToolSpec] = TOOLS
) -> list[LLMEvent]:
    return [event async for event in provider.stream(system=SYSTEM, messages=messages, tools=tools)]


def text_of(events: list[LLMEvent]) -> str:
    return "".join(e.text for e in events if isinstance(e, TextDelta))


def calls_of(events: list[LLMEvent]) -> list[ToolCall]:
    return [e for e in events if isinstance(e, ToolCall)]


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


# --- streaming ---------------------------------------------------------------------------------


@pytest.mark.parametrize("vendor", VENDORS)
async def test_text_streams_as_several_deltas_then_finished_end(vendor: str) -> None:
    async with serving(vendor, lambda _: [Say("Your refund is on its way, anything else?")]) as (_, provider):
        events = await collect(provider, [{"role": "user", "content": "Where is my refund?"}])

    deltas = [e for e in events if isinstance(e, TextDelta)]
    assert len(deltas) >= 5
    assert text_of(events) == "Your refund is on its way, anything else?"
    assert events[:-1] == deltas
    finished = events[-1]
    assert isinstance(finished, Finished)
    assert finished.stop_reason == "end"
    assert finished.input_tokens and finished.output_tokens


@pytest.mark.parametrize("vendor", VENDORS)
async def test_a_tool_call_split_across_many_deltas_is_reassembled(vendor: str) -> None:
    arguments = {"order_id": "A-1042", "amount": 19.99, "reason": "arrived broken, customer wants money back"}
    script: Script = [Say("One moment."), Call("issue_refund", arguments, id="call_refund_1")]
    async with serving(vendor, lambda _: script) as (fake, provider):
        events = await collect(provider, [{"role": "user", "content": "Refund A-1042 please"}])

    pieces = [e for e in fake.requests[0].sent if b"input_json_delta" in e or b'"arguments": "' in e]
    assert len(pieces) >= 8  # the arguments really arrived in pieces
    assert text_of(events) == "One moment."
    assert calls_of(events) == [ToolCall("call_refund_1", "issue_refund", arguments, json.dumps(arguments))]
    assert isinstance(events[-1], Finished) and events[-1].stop_reason == "tool_calls"
    assert isinstance(events[-2], ToolCall)  # complete calls come before Finished


@pytest.mark.parametrize("vendor", VENDORS)
async def test_two_parallel_tool_calls_in_one_response(vendor: str) -> None:
    script: Script = [Call("lookup_order", {"order_id": "A-1"}), Call("lookup_order", {"order_id": "B-2"})]
    async with serving(vendor, lambda _: script) as (_, provider):
        events = await collect(provider, [{"role": "user", "content": "Check A-1 and B-2"}])

    calls = calls_of(events)
    assert [(c.name, c.arguments) for c in calls] == [
        ("lookup_order", {"order_id": "A-1"}),
        ("lookup_order", {"order_id": "B-2"}),
    ]
    assert calls[0].id and calls[1].id and calls[0].id != calls[1].id
    assert isinstance(events[-1], Finished) and events[-1].stop_reason == "tool_calls"


@pytest.mark.parametrize("vendor", VENDORS)
async def test_invalid_json_arguments_give_empty_arguments_and_keep_the_raw_text(vendor: str) -> None:
    async with serving(vendor, lambda _: [Call("lookup_order", raw='{"order_id": "A-1"')]) as (_, provider):
        events = await collect(provider, [{"role": "user", "content": "A-1"}])

    (call,) = calls_of(events)
    assert call.name == "lookup_order"
    assert call.arguments == {}
    assert call.raw_arguments == '{"order_id": "A-1"'


@pytest.mark.parametrize("vendor", VENDORS)
async def test_a_reply_cut_by_the_token_limit_finishes_with_length(vendor: str) -> None:
    async with serving(vendor, lambda _: [Say("Well, the thing about"), End("length")]) as (_, provider):
        events = await collect(provider, [{"role": "user", "content": "Tell me everything"}])

    assert isinstance(events[-1], Finished) and events[-1].stop_reason == "length"


async def test_ollama_style_tool_calls_with_finish_reason_stop_are_reported_as_tool_calls() -> None:
    script = [
        Call("lookup_order", {"order_id": "A-1"}),
        Call("issue_refund", {"order_id": "A-1", "amount": 5}),
    ]
    async with serving("openai", lambda _: script, style="ollama") as (fake, provider):
        events = await collect(provider, [{"role": "user", "content": "Refund A-1"}])

    assert [(c.name, c.arguments) for c in calls_of(events)] == [
        ("lookup_order", {"order_id": "A-1"}),
        ("issue_refund", {"order_id": "A-1", "amount": 5}),
    ]
    assert isinstance(events[-1], Finished) and events[-1].stop_reason == "tool_calls"
    sent = fake.requests[0].sent
    assert any(
        b'"finish_reason": "stop"' in event for event in sent
    )  # what Ollama says, although it made tool calls
    assert sum(b'"tool_calls"' in event for event in sent) == 2  # each call whole, in one delta


# --- a full round trip -------------------------------------------------------------------------


def refund_story(request: LLMRequest) -> Script:
    """Looks the order up, then answers from the tool result; the same for both wire formats."""
    order = request.tool_result("lookup_order")
    if order is None:
        return [Say("Let me look that up."), Call("lookup_order", {"order_id": "A-1042"})]
    return [Say(f"Order {order['id']} is {order['status']}. Shall I refund it?")]


@pytest.mark.parametrize("vendor", VENDORS)
async def test_round_trip_user_tool_call_tool_result_final_text(vendor: str) -> None:
    history: list[dict[str, Any]] = [
        {"role": "assistant", "content": "Hello, this is Acme support."},
        {"role": "user", "content": "Where is order A-1042?"},
    ]
    async with serving(vendor, refund_story) as (fake, provider):
        first = await collect(provider, history)
        (call,) = calls_of(first)
        history.append({"role": "assistant", "content": text_of(first), "tool_calls": [call]})
        history.append(
            {
                "role": "tool",
                "tool_call_id": call.id,
                "name": call.name,
                "content": json.dumps({"id": "A-1042", "status": "delivered"}),
            }
        )
        second = await collect(provider, history)

    assert text_of(second) == "Order A-1042 is delivered. Shall I refund it?"
    assert isinstance(second[-1], Finished) and second[-1].stop_reason == "end"

    neutral = fake.requests[1].neutral
    assert neutral is not None
    assert neutral.system == SYSTEM
    assert neutral.tools == ["lookup_order", "issue_refund"]
    assert neutral.last_user_text == "Where is order A-1042?"
    assistant = neutral.messages[-2]
    assert assistant["role"] == "assistant" and assistant["content"] == "Let me look that up."
    assert [(c.id, c.name, c.arguments) for c in assistant["tool_calls"]] == [
        (call.id, "lookup_order", {"order_id": "A-1042"})
    ]
    assert neutral.messages[-1] == {
        "role": "tool",
        "tool_call_id": call.id,
        "name": "lookup_order",
        "content": '{"id": "A-1042", "status": "delivered"}',
    }

    wire = fake.requests[1].json
    if vendor == "anthropic":
        roles = [m["role"] for m in wire["messages"]]
        assert roles == ["user", "assistant", "user", "assistant", "user"]
        assert wire["messages"][0]["content"] == [{"type": "text", "text": CALL_STARTED}]
        assert wire["messages"][3]["content"] == [
            {"type": "text", "text": "Let me look that up."},
            {"type": "tool_use", "id": call.id, "name": "lookup_order", "input": {"order_id": "A-1042"}},
        ]
        assert wire["messages"][4]["content"] == [
            {
                "type": "tool_result",
                "tool_use_id": call.id,
                "content": '{"id": "A-1042", "status": "delivered"}',
            }
        ]
    else:
        assert wire["messages"][-2]["tool_calls"] == [
            {
                "id": call.id,
                "type": "function",
                "function": {"name": "lookup_order", "arguments": '{"order_id": "A-1042"}'},
            }
        ]
        assert wire["messages"][-1] == {
            "role": "tool",
            "tool_call_id": call.id,
            "content": '{"id": "A-1042", "status": "delivered"}',
        }


@pytest.mark.parametrize("vendor", VENDORS)
async def test_request_body_carries_the_system_prompt_and_tools_in_the_vendor_format(vendor: str) -> None:
    async with serving(vendor, in_order([Say("Hi.")])) as (fake, provider):
        await collect(provider, [{"role": "user", "content": "hi"}])

    body = fake.requests[0].json
    assert json.loads(fake.requests[0].body) == body
    assert body["model"] == "test-model" and body["stream"] is True and body["max_tokens"] == 400
    if vendor == "anthropic":
        assert body["system"] == SYSTEM
        assert body["tools"] == [
            {"name": "lookup_order", "description": LOOKUP.description, "input_schema": LOOKUP.parameters},
            {"name": "issue_refund", "description": REFUND.description, "input_schema": REFUND.parameters},
        ]
        assert "temperature" not in body  # API version 2026-10-21 refuses sampling parameters
        assert fake.requests[0].headers["Authorization"] == f"Bearer {fake.api_key}"
        assert fake.requests[0].headers["anthropic-version"] >= "2026-10-21"
    else:
        assert body["messages"][0] == {"role": "system", "content": SYSTEM}
        assert body["tools"][0] == {
            "type": "function",
            "function": {
                "name": "lookup_order",
                "description": LOOKUP.description,
                "parameters": LOOKUP.parameters,
            },
        }
        assert body["stream_options"] == {"include_usage": True}
        assert body["temperature"] == 0.2
        assert fake.requests[0].headers["Authorization"] == f"Bearer {fake.api_key}"


@pytest.mark.parametrize("vendor", VENDORS)
async def test_no_tools_means_no_tools_parameter(vendor: str) -> None:
    async with serving(vendor, lambda _: "Hi.") as (fake, provider):
        events = await collect(provider, [{"role": "user", "content": "hi"}], tools=[])

    assert text_of(events) == "Hi."
    assert "tools" not in fake.requests[0].json


# --- errors ------------------------------------------------------------------------------------


@pytest.mark.parametrize("vendor", VENDORS)
async def test_server_error_is_provider_unavailable(vendor: str) -> None:
    async with serving(vendor, lambda _: Fail(status=500)) as (fake, provider):
        with pytest.raises(ProviderUnavailable) as caught:
            await collect(provider, [{"role": "user", "content": "hi"}])

    assert caught.value.retryable and caught.value.provider == provider.name
    assert caught.value.__cause__ is not None
    assert fake.requests[0].status == 500


@pytest.mark.parametrize("vendor", VENDORS)
async def test_rate_limit_is_provider_unavailable(vendor: str) -> None:
    async with serving(vendor, lambda _: Fail(status=429)) as (_, provider):
        with pytest.raises(ProviderUnavailable):
            await collect(provider, [{"role": "user", "content": "hi"}])


@pytest.mark.parametrize("vendor", VENDORS)
async def test_an_error_in_the_middle_of_the_stream_is_provider_unavailable(vendor: str) -> None:
    status = 529 if vendor == "anthropic" else 500
    async with serving(vendor, lambda _: [Say("Let me"), Fail(status=status)]) as (_, provider):
        received: list[LLMEvent] = []
        with pytest.raises(ProviderUnavailable):
            async for event in provider.stream(
                system=SYSTEM, messages=[{"role": "user", "content": "hi"}], tools=TOOLS
            ):
                received.append(event)

    assert text_of(received) == "Let me"


@pytest.mark.parametrize("vendor", VENDORS)
async def test_wrong_api_key_is_provider_rejected(vendor: str) -> None:
    async with serving(vendor, lambda _: "Hi.", api_key="not-the-key") as (fake, provider):
        with pytest.raises(ProviderRejected) as caught:
            await collect(provider, [{"role": "user", "content": "hi"}])

    assert not caught.value.retryable
    assert fake.requests[0].status == 401


@pytest.mark.parametrize("vendor", VENDORS)
async def test_a_request_the_vendor_refuses_is_provider_rejected(vendor: str) -> None:
    # A tool result that answers no tool call: both APIs refuse it with 400.
    history = [
        {"role": "user", "content": "hi"},
        {"role": "tool", "tool_call_id": "call_nowhere", "name": "lookup_order", "content": "{}"},
    ]
    async with serving(vendor, lambda _: "Hi.") as (fake, provider):
        with pytest.raises(ProviderRejected):
            await collect(provider, history)

    assert fake.requests[0].status == 400


@pytest.mark.parametrize("vendor", VENDORS)
@pytest.mark.parametrize("hang", [Hang(), Hang(headers=False)], ids=["after-headers", "before-headers"])
async def test_a_hanging_server_is_provider_timeout_within_the_timeout(vendor: str, hang: Hang) -> None:
    async with serving(vendor, lambda _: hang, timeout_s=0.5) as (_, provider):
        started = time.monotonic()
        with pytest.raises(ProviderTimeout) as caught:
            await collect(provider, [{"role": "user", "content": "hi"}])
        waited = time.monotonic() - started

    assert caught.value.retryable
    assert waited < 3.0  # bounded by timeout_s (0.5 s), not by the server


@pytest.mark.parametrize("vendor", VENDORS)
async def test_a_stream_that_stalls_midway_is_provider_timeout(vendor: str) -> None:
    async with serving(vendor, lambda _: [Say("Let me"), Slow(3.0), Say("check.")], timeout_s=0.5) as (
        _,
        provider,
    ):
        with pytest.raises(ProviderTimeout):
            await collect(provider, [{"role": "user", "content": "hi"}])


@pytest.mark.parametrize("vendor", VENDORS)
async def test_a_slow_first_chunk_within_the_timeout_is_fine(vendor: str) -> None:
    async with serving(vendor, lambda _: [Slow(0.2), Say("Here.")], timeout_s=2.0) as (fake, provider):
        fake.latency_s = 0.1
        events = await collect(provider, [{"role": "user", "content": "hi"}])

    assert text_of(events) == "Here."


@pytest.mark.parametrize("vendor", VENDORS)
async def test_connection_refused_is_provider_unavailable(vendor: str) -> None:
    base_url = f"http://127.0.0.1:{closed_port()}" + ("/v1" if vendor == "openai" else "")
    provider = build_provider(vendor, base_url=base_url, api_key="k", model="m", timeout_s=2.0)
    try:
        with pytest.raises(ProviderUnavailable) as caught:
            await collect(provider, [{"role": "user", "content": "hi"}])
    finally:
        await provider.aclose()

    assert caught.value.retryable


async def test_anthropic_temperature_is_refused_by_api_version_2026_10_21() -> None:
    async with FakeAnthropic(lambda _: "Hi.") as fake:
        provider = AnthropicProvider(fake.base_url, fake.api_key, "test-model", temperature=0.2)
        try:
            with pytest.raises(ProviderRejected, match="temperature"):
                await collect(provider, [{"role": "user", "content": "hi"}])
        finally:
            await provider.aclose()

    assert fake.requests[0].json["temperature"] == 0.2


@pytest.mark.parametrize("vendor", VENDORS)
async def test_closing_a_stream_early_leaves_the_provider_ready_for_the_next_turn(vendor: str) -> None:
    # What a barge-in does: the engine stops reading after the first words.
    script = in_order([Say("one two three four five six"), Call("lookup_order", {"order_id": "A"})], "Sure.")
    async with serving(vendor, script) as (_, provider):
        stream = provider.stream(system=SYSTEM, messages=[{"role": "user", "content": "hi"}], tools=TOOLS)
        async with aclosing(stream):  # type: ignore[type-var]
            first = await anext(stream)
        events = await collect(provider, [{"role": "user", "content": "again"}])

    assert first == TextDelta("one ")
    assert text_of(events) == "Sure."


async def test_fake_openai_answers_a_non_streaming_request_with_a_whole_completion() -> None:
    async with FakeOpenAI(
        lambda _: [Say("Checking."), Call("lookup_order", {"order_id": "A-1"}, id="call_1")]
    ) as fake:
        client = openai.AsyncOpenAI(base_url=fake.base_url, api_key=fake.api_key, max_retries=0)
        try:
            completion = await client.chat.completions.create(
                model="test-model",
                messages=[{"role": "user", "content": "hi"}],
                tools=[
                    {
                        "type": "function",
                        "function": {"name": "lookup_order", "parameters": LOOKUP.parameters},
                    }
                ],
            )
        finally:
            await client.close()

    choice = completion.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content == "Checking."
    assert choice.message.tool_calls is not None
    (call,) = choice.message.tool_calls
    assert call.id == "call_1" and call.function.name == "lookup_order"  # type: ignore[union-attr]
    assert json.loads(call.function.arguments) == {"order_id": "A-1"}  # type: ignore[union-attr]
    assert fake.requests[0].neutral is not None and fake.requests[0].neutral.stream is False


def test_build_provider_refuses_an_unknown_kind() -> None:
    with pytest.raises(ValueError, match="unknown LLM provider kind 'gemini'"):
        build_provider("gemini", base_url="http://127.0.0.1:1", api_key="k", model="m", timeout_s=1.0)


# --- pure conversions --------------------------------------------------------------------------


def test_anthropic_messages_merge_same_roles_and_put_tool_results_first() -> None:
    call_a = ToolCall("toolu_a", "lookup_order", {"order_id": "A"})
    call_b = ToolCall("toolu_b", "lookup_order", {"order_id": "B"})
    converted = anthropic_messages(
        [
            {"role": "user", "content": "Check A"},
            {"role": "user", "content": "and B"},
            {"role": "assistant", "content": "", "tool_calls": [call_a, call_b]},
            {"role": "tool", "tool_call_id": "toolu_a", "name": "lookup_order", "content": '{"ok": true}'},
            {
                "role": "tool",
                "tool_call_id": "toolu_b",
                "name": "lookup_order",
                "content": '{"ok": false}',
                "is_error": True,
            },
            {"role": "user", "content": "Well?"},
        ]
    )

    assert converted == [
        {"role": "user", "content": [{"type": "text", "text": "Check A"}, {"type": "text", "text": "and B"}]},
        {
            "role": "assistant",
            "content": [
                {"type": "tool_use", "id": "toolu_a", "name": "lookup_order", "input": {"order_id": "A"}},
                {"type": "tool_use", "id": "toolu_b", "name": "lookup_order", "input": {"order_id": "B"}},
            ],
        },
        {
            "role": "user",
            "content": [
                {"type": "tool_result", "tool_use_id": "toolu_a", "content": '{"ok": true}'},
                {
                    "type": "tool_result",
                    "tool_use_id": "toolu_b",
                    "content": '{"ok": false}',
                    "is_error": True,
                },
                {"type": "text", "text": "Well?"},
            ],
        },
    ]


def test_openai_messages_send_valid_json_arguments_even_for_a_garbled_call() -> None:
    garbled = ToolCall("call_1", "lookup_order", {}, '{"order_id": ')
    converted = openai_messages("sys", [{"role": "assistant", "content": "", "tool_calls": [garbled]}])

    assert converted == [
        {"role": "system", "content": "sys"},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {"id": "call_1", "type": "function", "function": {"name": "lookup_order", "arguments": "{}"}}
            ],
        },
    ]


def test_an_unknown_role_is_refused_with_a_clear_error() -> None:
    with pytest.raises(ValueError, match="unsupported message role 'system'"):
        openai_messages("", [{"role": "system", "content": "x"}])
