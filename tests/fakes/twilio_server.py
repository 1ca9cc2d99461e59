"""A fake of Twilio's REST API on 127.0.0.1, speaking the wire format the SDK expects.

Covers what closeloop uses: creating messages, creating calls and updating live calls.
Every request is recorded; requests Twilio would accept are also listed per resource.

Like Twilio, it sends signed status callbacks back: for a call created with a
``StatusCallback``, ``initiated`` and ``ringing``, then what ``agent_behaviour[To]`` scripts
(``"answer"``: ``in-progress`` (answered), and the participant joins the conference its TwiML
dials; ``"no-answer"``/``"busy"``/``"failed"``: that final status; ``"silent"``: nothing more).
A call updated with ``<Dial><Conference statusCallback=...>NAME`` joins conference NAME, which
reports ``participant-join`` (and ``conference-start`` once a participant with
``startConferenceOnEnter`` enters) to that statusCallback.

Usage::

    async with FakeTwilio("AC" + "0" * 32, "token") as fake:
        sender = TwilioTextSender(..., api_base_url=fake.base_url)
        ...
        assert fake.messages[0].form["To"] == "+15551234567"
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import secrets
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from datetime import UTC, datetime
from email.utils import format_datetime
from types import TracebackType
from typing import Any

import aiohttp
from aiohttp import web
from twilio.request_validator import RequestValidator

API_VERSION = "2010-04-01"

_DEFAULT_ERRORS: dict[int, tuple[int, str]] = {
    400: (21211, "The 'To' number is not a valid phone number."),
    401: (20003, "Authenticate"),
    404: (20404, "The requested resource was not found"),
    429: (20429, "Too Many Requests"),
    500: (20500, "Internal Server Error"),
    503: (20503, "Service Unavailable"),
}


@dataclass
class RecordedRequest:
    """One request the fake received.

    Attributes:
        method: HTTP method.
        path: URL path, e.g. ``/2010-04-01/Accounts/AC.../Messages.json``.
        form: form fields; for a repeated field, its last value.
        form_lists: every form field with all its values (``StatusCallbackEvent`` repeats).
        headers: request headers.
        status: the status the fake answered.
        response: the JSON the fake answered.
    """

    method: str
    path: str
    form: dict[str, str]
    form_lists: dict[str, list[str]]
    headers: dict[str, str]
    status: int = 0
    response: dict[str, Any] = field(default_factory=dict)


@dataclass
class SentCallback:
    """One status callback the fake sent: where, what, and the HTTP status the app answered."""

    url: str
    params: dict[str, str]
    status: int


@dataclass
class Conference:
    name: str
    sid: str
    status_callback: str | None
    participants: list[str] = field(default_factory=list)
    started: bool = False
    sequence: int = 0


@dataclass
class _Failure:
    status: int
    code: int
    message: str


class FakeTwilio:
    """A real HTTP server on a random loopback port imitating ``api.twilio.com``.

    Endpoints (all under ``/2010-04-01/Accounts/{AccountSid}``):
        ``POST /Messages.json``: create a message (``To``, ``From`` or
        ``MessagingServiceSid``, ``Body`` or ``ContentSid`` or ``MediaUrl``); 201 + message JSON.
        ``POST /Calls.json``: create a call (``To``, ``From``, ``Url`` or ``Twiml``); 201 + call JSON.
        ``POST /Calls/{CallSid}.json``: update a call (``Twiml``, ``Url``, ``Status``); 200.

    Attributes:
        requests: every request, in order, including refused ones.
        messages: message creations the fake accepted.
        calls: call creations the fake accepted.
        call_updates: call updates the fake accepted.
    """

    def __init__(self, account_sid: str, auth_token: str) -> None:
        self.account_sid = account_sid
        self.auth_token = auth_token
        self.requests: list[RecordedRequest] = []
        self.messages: list[RecordedRequest] = []
        self.calls: list[RecordedRequest] = []
        self.call_updates: list[RecordedRequest] = []
        self._failures: list[_Failure] = []
        self._call_state: dict[str, dict[str, Any]] = {}
        self._runner: web.AppRunner | None = None
        self._base_url: str | None = None
        self.agent_behaviour: dict[
            str, str
        ] = {}  # To number -> "answer" | "no-answer" | "busy" | "failed" | "silent"
        self.callback_delay_s = 0.05  # between two callbacks of one call
        self.callbacks: list[SentCallback] = []  # every status callback sent, in order
        self.conferences: dict[str, Conference] = {}  # by FriendlyName
        self._tasks: set[asyncio.Task[None]] = set()
        self._session: aiohttp.ClientSession | None = None
        self._outbound_callback: dict[str, str] = {}  # CallSid -> StatusCallback, while the call is live

    @property
    def base_url(self) -> str:
        """``http://127.0.0.1:PORT``, to pass as the sender's ``api_base_url``."""
        if self._base_url is None:
            raise RuntimeError("FakeTwilio is not running; use 'async with FakeTwilio(...)'")
        return self._base_url

    def fail_next(
        self, count: int = 1, *, status: int = 500, code: int | None = None, message: str = ""
    ) -> None:
        """Answer the next ``count`` requests with a Twilio error JSON instead of handling them.

        Args:
            count: how many requests fail.
            status: HTTP status, e.g. 500, 503, 429 or 400.
            code: Twilio error code; a typical one for the status when omitted (400 -> 21211).
            message: error message; a typical one when omitted.
        """
        default_code, default_message = _DEFAULT_ERRORS.get(status, (status * 100, "Error"))
        failure = _Failure(status, code or default_code, message or default_message)
        self._failures.extend([failure] * count)

    async def start(self) -> None:
        app = web.Application()
        prefix = f"/{API_VERSION}/Accounts/{{account_sid}}"
        app.router.add_post(f"{prefix}/Messages.json", self._create_message)
        app.router.add_post(f"{prefix}/Calls.json", self._create_call)
        app.router.add_post(f"{prefix}/Calls/{{call_sid}}.json", self._update_call)
        self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=1.0)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        host, port = self._runner.addresses[0][:2]
        self._base_url = f"http://{host}:{port}"
        self._session = aiohttp.ClientSession()

    async def stop(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        session, self._session = self._session, None
        if session is not None:
            await session.close()
        runner, self._runner = self._runner, None
        if runner is not None:
            await runner.cleanup()

    async def __aenter__(self) -> FakeTwilio:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()

    # --- handlers -------------------------------------------------------------------------

    async def _create_message(self, request: web.Request) -> web.Response:
        recorded, refusal = await self._admit(request)
        if refusal is not None:
            return refusal
        form = recorded.form
        if not form.get("To"):
            return self._error(recorded, 400, 21604, "A 'To' phone number is required.")
        if not (form.get("From") or form.get("MessagingServiceSid")):
            return self._error(recorded, 400, 21603, "A 'From' phone number is required.")
        if not (form.get("Body") or form.get("ContentSid") or form.get("MediaUrl")):
            return self._error(recorded, 400, 21602, "Message body is required.")
        if len(form.get("Body", "")) > 1600:
            return self._error(
                recorded, 400, 21617, "The concatenated message body exceeds the 1600 character limit."
            )
        sid = "SM" + secrets.token_hex(16)
        now = _rfc2822_now()
        body = form.get("Body", "")
        payload: dict[str, Any] = {
            "account_sid": self.account_sid,
            "api_version": API_VERSION,
            "body": body,
            "date_created": now,
            "date_sent": None,
            "date_updated": now,
            "direction": "outbound-api",
            "error_code": None,
            "error_message": None,
            "from": form.get("From"),
            "messaging_service_sid": form.get("MessagingServiceSid"),
            "num_media": str(len(recorded.form_lists.get("MediaUrl", []))),
            "num_segments": str(max(1, -(-len(body) // 153))),
            "price": None,
            "price_unit": "USD",
            "sid": sid,
            "status": "queued",
            "subresource_uris": {"media": f"{self._account_path()}/Messages/{sid}/Media.json"},
            "to": form["To"],
            "uri": f"{self._account_path()}/Messages/{sid}.json",
        }
        return self._accept(recorded, self.messages, 201, payload)

    async def _create_call(self, request: web.Request) -> web.Response:
        recorded, refusal = await self._admit(request)
        if refusal is not None:
            return refusal
        form = recorded.form
        if not form.get("To"):
            return self._error(recorded, 400, 21201, "No 'To' number is specified")
        if not form.get("From"):
            return self._error(recorded, 400, 21213, "No 'From' number is specified")
        if not (form.get("Url") or form.get("Twiml") or form.get("ApplicationSid")):
            return self._error(recorded, 400, 21205, "Url parameter is required.")
        sid = "CA" + secrets.token_hex(16)
        payload = self._call_json(sid, to=form["To"], from_=form["From"], status="queued")
        self._call_state[sid] = payload
        response = self._accept(recorded, self.calls, 201, payload)
        if form.get("StatusCallback"):
            self._spawn(self._play_outbound(sid, recorded), f"fake-twilio-call-{sid}")
        return response

    async def _update_call(self, request: web.Request) -> web.Response:
        recorded, refusal = await self._admit(request)
        if refusal is not None:
            return refusal
        call_sid = request.match_info["call_sid"]
        if not call_sid.startswith("CA"):
            return self._error(recorded, 404, 20404, f"The requested resource {request.path} was not found")
        status = recorded.form.get("Status")
        if status is not None and status not in ("completed", "canceled"):
            return self._error(recorded, 400, 21218, f"Invalid call status {status!r}")
        twiml = recorded.form.get("Twiml")
        if twiml is not None and len(twiml) > 4000:
            return self._error(recorded, 400, 13100, "Twiml exceeds 4000 characters")
        # Calls not created through this fake (inbound calls) are accepted as in progress.
        payload = self._call_state.get(call_sid) or self._call_json(
            call_sid, to="", from_="", status="in-progress"
        )
        payload = {**payload, "status": status or payload["status"], "date_updated": _rfc2822_now()}
        self._call_state[call_sid] = payload
        response = self._accept(recorded, self.call_updates, 200, payload)
        if twiml is not None:
            self._spawn(
                self._join_conference(call_sid, twiml, delay=self.callback_delay_s),
                f"fake-twilio-update-{call_sid}",
            )
        if status in ("completed", "canceled") and call_sid in self._outbound_callback:
            url = self._outbound_callback.pop(call_sid)
            self._spawn(self._send(url, self._call_params(call_sid, status)), f"fake-twilio-end-{call_sid}")
        return response

    # --- scripted behaviour: status callbacks -----------------------------------------------

    def _spawn(self, coro: Any, name: str) -> None:
        task = asyncio.create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _call_params(self, call_sid: str, status: str) -> dict[str, str]:
        call = self._call_state.get(call_sid, {})
        return {
            "AccountSid": self.account_sid,
            "ApiVersion": API_VERSION,
            "CallSid": call_sid,
            "CallStatus": status,
            "Direction": "outbound-api",
            "From": call.get("from") or "",
            "To": call.get("to") or "",
            "CallbackSource": "call-progress-events",
        }

    async def _play_outbound(self, sid: str, recorded: RecordedRequest) -> None:
        url = recorded.form["StatusCallback"]
        self._outbound_callback[sid] = url
        behaviour = self.agent_behaviour.get(recorded.form["To"], "answer")
        for status in ("initiated", "ringing"):
            await asyncio.sleep(self.callback_delay_s)
            await self._send(url, self._call_params(sid, status))
        await asyncio.sleep(self.callback_delay_s)
        if behaviour == "silent" or sid not in self._outbound_callback:
            return
        if behaviour == "answer":
            self._call_state[sid] = {**self._call_state[sid], "status": "in-progress"}
            await self._send(url, self._call_params(sid, "in-progress"))
            await self._join_conference(sid, recorded.form.get("Twiml", ""), delay=self.callback_delay_s)
        else:
            self._outbound_callback.pop(sid, None)
            self._call_state[sid] = {**self._call_state[sid], "status": behaviour}
            await self._send(url, self._call_params(sid, behaviour))

    async def _join_conference(self, call_sid: str, twiml: str, *, delay: float) -> None:
        try:
            root = ET.fromstring(twiml)
        except ET.ParseError:
            return
        element = root.find("./Dial/Conference")
        if element is None or not (element.text or "").strip():
            return
        name = (element.text or "").strip()
        conference = self.conferences.get(name)
        if conference is None:
            conference = self.conferences[name] = Conference(
                name, "CF" + secrets.token_hex(16), element.get("statusCallback")
            )
        elif conference.status_callback is None:
            conference.status_callback = element.get("statusCallback")
        await asyncio.sleep(delay)
        conference.participants.append(call_sid)
        starts = element.get("startConferenceOnEnter", "true") == "true"
        events = ["participant-join"] + (["conference-start"] if starts and not conference.started else [])
        conference.started = conference.started or starts
        for event in events:
            await self._conference_callback(
                conference, event, call_sid if event.startswith("participant") else None
            )

    async def _conference_callback(self, conference: Conference, event: str, call_sid: str | None) -> None:
        if not conference.status_callback:
            return
        conference.sequence += 1
        params = {
            "AccountSid": self.account_sid,
            "ConferenceSid": conference.sid,
            "FriendlyName": conference.name,
            "StatusCallbackEvent": event,
            "SequenceNumber": str(conference.sequence),
        }
        if call_sid is not None:
            params["CallSid"] = call_sid
        await self._send(conference.status_callback, params)

    async def leave_conference(self, name: str, call_sid: str) -> None:
        """Script a participant hanging up: ``participant-leave`` to the conference's statusCallback."""
        conference = self.conferences[name]
        if call_sid in conference.participants:
            conference.participants.remove(call_sid)
        await self._conference_callback(conference, "participant-leave", call_sid)

    async def _send(self, url: str, params: dict[str, str]) -> None:
        signature = RequestValidator(self.auth_token).compute_signature(url, params)
        status = 0
        try:
            assert self._session is not None
            async with self._session.post(
                url, data=params, headers={"X-Twilio-Signature": signature}
            ) as response:
                status = response.status
        except aiohttp.ClientError:
            status = -1
        self.callbacks.append(SentCallback(url, params, status))

    # --- helpers --------------------------------------------------------------------------

    async def _admit(self, request: web.Request) -> tuple[RecordedRequest, web.Response | None]:
        posted = await request.post()
        form_lists: dict[str, list[str]] = {}
        for key, value in posted.items():
            form_lists.setdefault(key, []).append(str(value))
        recorded = RecordedRequest(
            method=request.method,
            path=request.path,
            form={key: values[-1] for key, values in form_lists.items()},
            form_lists=form_lists,
            headers=dict(request.headers),
        )
        self.requests.append(recorded)
        if not self._authorized(request.headers.get("Authorization", "")):
            return recorded, self._error(recorded, 401, 20003, "Authenticate")
        if request.match_info["account_sid"] != self.account_sid:
            return recorded, self._error(
                recorded, 404, 20404, f"The requested resource {request.path} was not found"
            )
        if self._failures:
            failure = self._failures.pop(0)
            return recorded, self._error(recorded, failure.status, failure.code, failure.message)
        return recorded, None

    def _authorized(self, header: str) -> bool:
        scheme, _, encoded = header.partition(" ")
        if scheme.lower() != "basic":
            return False
        try:
            decoded = base64.b64decode(encoded, validate=True).decode("utf-8")
        except (binascii.Error, UnicodeDecodeError):
            return False
        user, _, password = decoded.partition(":")
        return secrets.compare_digest(user, self.account_sid) and secrets.compare_digest(
            password, self.auth_token
        )

    def _error(self, recorded: RecordedRequest, status: int, code: int, message: str) -> web.Response:
        payload = {
            "code": code,
            "message": message,
            "more_info": f"https://www.twilio.com/docs/errors/{code}",
            "status": status,
        }
        recorded.status, recorded.response = status, payload
        return web.json_response(payload, status=status)

    def _accept(
        self,
        recorded: RecordedRequest,
        accepted: list[RecordedRequest],
        status: int,
        payload: dict[str, Any],
    ) -> web.Response:
        recorded.status, recorded.response = status, payload
        accepted.append(recorded)
        return web.json_response(payload, status=status)

    def _account_path(self) -> str:
        return f"/{API_VERSION}/Accounts/{self.account_sid}"

    def _call_json(self, sid: str, *, to: str, from_: str, status: str) -> dict[str, Any]:
        now = _rfc2822_now()
        return {
            "account_sid": self.account_sid,
            "answered_by": None,
            "api_version": API_VERSION,
            "caller_name": None,
            "date_created": now,
            "date_updated": now,
            "direction": "outbound-api",
            "duration": None,
            "end_time": None,
            "forwarded_from": None,
            "from": from_,
            "from_formatted": from_,
            "group_sid": None,
            "parent_call_sid": None,
            "phone_number_sid": None,
            "price": None,
            "price_unit": "USD",
            "queue_time": "0",
            "sid": sid,
            "start_time": None,
            "status": status,
            "subresource_uris": {
                "recordings": f"{self._account_path()}/Calls/{sid}/Recordings.json",
            },
            "to": to,
            "to_formatted": to,
            "trunk_sid": None,
            "uri": f"{self._account_path()}/Calls/{sid}.json",
        }


def _rfc2822_now() -> str:
    # Twilio's REST API writes dates in RFC 2822 form: "Thu, 24 Aug 2023 05:01:45 +0000".
    return format_datetime(datetime.now(UTC).replace(microsecond=0))
