"""Outbound SMS and WhatsApp through Twilio's Messages API (the ``TextSender`` port).

WhatsApp allows free-form text only within 24 hours of the customer's last message. Later
texts go out as an approved template (Content API ``content_sid``) or, failing that, as an
SMS; :class:`SendResult` records which one was used (``detail``).

Twilio and network errors are translated here into :class:`DeliveryError`, whose
``retryable`` flag says whether sending again can help.
"""

from __future__ import annotations

import base64
import json
import logging
from contextlib import AbstractAsyncContextManager
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import aiohttp
from twilio.base.exceptions import TwilioException, TwilioRestException, TwilioServiceException
from twilio.http import AsyncHttpClient
from twilio.http.response import Response
from twilio.rest import Client

from pipeline.model import Channel, OutboundText, SendResult

logger = logging.getLogger(__name__)
_sdk_logger = logging.getLogger("twilio.http_client")

_WHATSAPP_PREFIX = "whatsapp:"


class DeliveryError(Exception):
    """A text could not be handed to Twilio.

    Attributes:
        retryable: True for 5xx, 429, timeouts and connection failures (sending again later
            may work); False for 4xx and configuration problems (it will fail again).
        status: the HTTP status Twilio answered, if it answered.
        code: Twilio's error code (e.g. 21211 invalid ``To``), if it sent one.
    """

    def __init__(
        self,
        message: str,
        *,
        retryable: bool,
        status: int | None = None,
        code: int | None = None,
    ) -> None:
        super().__init__(message)
        self.retryable = retryable
        self.status = status
        self.code = code


class TwilioApiHttpClient(AsyncHttpClient):
    """The SDK's async HTTP client interface on one lazily opened aiohttp session.

    Written here rather than using ``AsyncTwilioHttpClient`` because that class (twilio 9.13)
    opens its ``ClientSession`` in ``__init__`` (which needs a running loop), sends no
    timeout unless each call passes one (aiohttp then waits forever), and authenticates
    with ``aiohttp.BasicAuth``, deprecated since aiohttp 3.14 (a DeprecationWarning on every
    request).

    When ``api_base_url`` is set, the absolute ``https://*.twilio.com`` URLs the SDK builds
    are sent to that base instead (path and query kept): that is how tests reach a fake.

    Args:
        api_base_url: e.g. ``http://127.0.0.1:8081``; None for the real Twilio.
        timeout: seconds per request, applied when the SDK call passes none.
    """

    def __init__(self, *, api_base_url: str | None = None, timeout: float = 10.0) -> None:
        super().__init__(_sdk_logger, True, timeout)
        self._api_base_url = api_base_url or None
        self._session: aiohttp.ClientSession | None = None

    async def request(
        self,
        method: str,
        url: str,
        params: dict[str, object] | None = None,
        data: dict[str, object] | None = None,
        headers: dict[str, str] | None = None,
        auth: tuple[str, str] | None = None,
        timeout: float | None = None,  # noqa: ASYNC109 - the SDK's signature
        allow_redirects: bool = False,
    ) -> Response:
        if self._session is None:
            self._session = aiohttp.ClientSession()
        request_headers = dict(headers or {})
        if auth is not None:
            credentials = f"{auth[0]}:{auth[1]}".encode()
            request_headers["Authorization"] = "Basic " + base64.b64encode(credentials).decode("ascii")
        total = timeout if timeout is not None else self.timeout
        async with self._session.request(
            method.upper(),
            redirect_url(url, self._api_base_url),
            params=_form(params),
            data=_form(data),
            headers=request_headers,
            timeout=aiohttp.ClientTimeout(total=total),
            allow_redirects=allow_redirects,
        ) as response:
            text = await response.text()
            return Response(response.status, text, dict(response.headers))

    async def close(self) -> None:
        session, self._session = self._session, None
        if session is not None:
            await session.close()


def redirect_url(url: str, api_base_url: str | None) -> str:
    """Point a Twilio API URL at ``api_base_url`` (path prefix kept); other hosts are left alone.

    ``redirect_url("https://api.twilio.com/2010-04-01/X.json", "http://127.0.0.1:8081")``
    gives ``http://127.0.0.1:8081/2010-04-01/X.json``. Media URLs on other hosts, and every
    URL when ``api_base_url`` is None, come back unchanged.
    """
    if not api_base_url:
        return url
    parts = urlsplit(url)
    host = (parts.hostname or "").lower()
    if host != "twilio.com" and not host.endswith(".twilio.com"):
        return url
    base = urlsplit(api_base_url.rstrip("/"))
    return urlunsplit((base.scheme, base.netloc, base.path + parts.path, parts.query, ""))


def _form(values: dict[str, object] | None) -> list[tuple[str, str]] | None:
    """Flatten the SDK's ``{name: value | [values]}`` into pairs (list values repeat the name)."""
    if not values:
        return None
    pairs: list[tuple[str, str]] = []
    for name, value in values.items():
        for item in value if isinstance(value, list | tuple) else [value]:
            pairs.append((name, str(item)))
    return pairs


class TwilioTextSender(AbstractAsyncContextManager["TwilioTextSender", None]):
    """Sends SMS and WhatsApp texts with the twilio SDK (async).

    Implements the ``TextSender`` port. The HTTP session is opened on first use (aiohttp
    needs a running event loop) and closed by :meth:`aclose` or ``async with``.

    Args:
        account_sid: Twilio Account SID (``AC...``).
        auth_token: Twilio Auth Token.
        sms_from: our SMS number in E.164, or None when SMS is not used.
        whatsapp_from: our WhatsApp sender in E.164 (without ``whatsapp:``), or None.
        api_base_url: send every API request here instead of ``https://api.twilio.com``
            (e.g. ``http://127.0.0.1:8081`` for a fake); None for the real Twilio.
        whatsapp_template_sid: Content SID (``HX...``) of an approved template with one
            variable ``{{1}}`` that carries the text, used outside the 24-hour window.
        timeout: seconds to wait for Twilio per request.
    """

    def __init__(
        self,
        account_sid: str,
        auth_token: str,
        sms_from: str | None,
        whatsapp_from: str | None,
        api_base_url: str | None = None,
        whatsapp_template_sid: str | None = None,
        *,
        timeout: float = 10.0,
    ) -> None:
        if not account_sid or not auth_token:
            raise ValueError("TwilioTextSender needs account_sid and auth_token")
        self._account_sid = account_sid
        self._auth_token = auth_token
        self._sms_from = sms_from or None
        self._whatsapp_from = _strip_whatsapp(whatsapp_from) if whatsapp_from else None
        self._api_base_url = api_base_url or None
        self._template_sid = whatsapp_template_sid or None
        self._timeout = timeout
        self._http: TwilioApiHttpClient | None = None
        self._client: Client | None = None
        self._closed = False

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Close the HTTP session. Safe to call more than once."""
        self._closed = True
        http, self._http, self._client = self._http, None, None
        if http is not None:
            await http.close()

    async def send(self, message: OutboundText) -> SendResult:
        """Send a text as a reply within an open conversation (WhatsApp session open).

        Raises:
            DeliveryError: Twilio refused the message or could not be reached.
        """
        return await self.send_followup(message, whatsapp_session_open=True, sms_fallback_to=None)

    async def send_followup(
        self,
        message: OutboundText,
        *,
        whatsapp_session_open: bool,
        sms_fallback_to: str | None,
    ) -> SendResult:
        """Send a text that may fall outside WhatsApp's 24-hour window.

        SMS messages go out as is. A WhatsApp message goes out free-form while the session is
        open; when it is closed it goes out as the approved template if one is configured,
        else as an SMS to ``sms_fallback_to``.

        Args:
            message: what to send; ``message.to`` is E.164 (a ``whatsapp:`` prefix is allowed).
            whatsapp_session_open: whether the customer wrote to us in the last 24 hours.
            sms_fallback_to: E.164 number for the SMS fallback, or None.

        Returns:
            ``SendResult`` with the message SID, the channel actually used and ``detail``:
            ``"session"`` (free-form text, including plain SMS), ``"template"`` or
            ``"sms_fallback"``.

        Raises:
            DeliveryError: no way to deliver (permanent), or Twilio refused / was unreachable.
        """
        if message.channel is Channel.SMS:
            return await self._send_sms(message.to, message.body, detail="session")
        if message.channel is not Channel.WHATSAPP:
            raise DeliveryError(
                f"TwilioTextSender cannot send {message.channel.value} messages;"
                " use the sender for that channel",
                retryable=False,
            )
        if whatsapp_session_open:
            sid = await self._create(
                to=_whatsapp(message.to),
                from_=_whatsapp(self._require_whatsapp_from()),
                body=message.body,
            )
            return self._result(sid, Channel.WHATSAPP, "session", message.kind)
        if self._template_sid and self._whatsapp_from:
            sid = await self._create(
                to=_whatsapp(message.to),
                from_=_whatsapp(self._whatsapp_from),
                content_sid=self._template_sid,
                content_variables=json.dumps({"1": message.body}),
            )
            return self._result(sid, Channel.WHATSAPP, "template", message.kind)
        if sms_fallback_to and self._sms_from:
            return await self._send_sms(sms_fallback_to, message.body, detail="sms_fallback")
        raise DeliveryError(
            "WhatsApp 24-hour window is closed and there is no way to reach the customer:"
            " configure a WhatsApp template (whatsapp_template_sid) or an SMS sender"
            " (sms_from) and pass sms_fallback_to",
            retryable=False,
        )

    async def _send_sms(self, to: str, body: str, *, detail: str) -> SendResult:
        if not self._sms_from:
            raise DeliveryError("no SMS sender configured: set sms_from to send SMS", retryable=False)
        sid = await self._create(to=to, from_=self._sms_from, body=body)
        return self._result(sid, Channel.SMS, detail, None)

    def _require_whatsapp_from(self) -> str:
        if not self._whatsapp_from:
            raise DeliveryError(
                "no WhatsApp sender configured: set whatsapp_from to send WhatsApp messages",
                retryable=False,
            )
        return self._whatsapp_from

    def _result(self, sid: str, channel: Channel, detail: str, kind: str | None) -> SendResult:
        logger.info(
            "text handed to twilio",
            extra={"message_sid": sid, "channel": channel.value, "detail": detail, "kind": kind},
        )
        return SendResult(provider_ref=sid, channel_used=channel, detail=detail)

    async def _create(self, **kwargs: Any) -> str:
        client = self._get_client()
        try:
            instance = await client.messages.create_async(**kwargs)
        except (TwilioRestException, TwilioServiceException) as e:
            status = int(e.status)
            retryable = status >= 500 or status == 429
            raise DeliveryError(
                f"Twilio refused the message: HTTP {status}, code {e.code}: {_reason(e)}",
                retryable=retryable,
                status=status,
                code=_int_or_none(e.code),
            ) from e
        except TwilioException as e:
            raise DeliveryError(f"Twilio SDK error: {e}", retryable=False) from e
        except (aiohttp.ClientError, TimeoutError) as e:
            raise DeliveryError(f"could not reach Twilio: {type(e).__name__}: {e}", retryable=True) from e
        except ValueError as e:
            # A 2xx whose body is not JSON: the message may exist, so sending again could duplicate it.
            raise DeliveryError(f"Twilio answered with an unreadable body: {e}", retryable=False) from e
        if not instance.sid:
            raise DeliveryError("Twilio answered without a message SID", retryable=False)
        return str(instance.sid)

    def _get_client(self) -> Client:
        if self._closed:
            raise DeliveryError("TwilioTextSender is closed", retryable=False)
        if self._client is None:
            self._http = TwilioApiHttpClient(api_base_url=self._api_base_url, timeout=self._timeout)
            self._client = build_client(self._account_sid, self._auth_token, self._http)
        return self._client


def build_client(account_sid: str, auth_token: str, http_client: TwilioApiHttpClient) -> Client:
    """A ``twilio.rest.Client`` for async calls (``*_async``) that reads nothing from the environment.

    Use it for call control too (``client.calls(sid).update_async(...)``); close the
    ``http_client`` when done.
    """
    return Client(
        account_sid,
        auth_token,
        http_client=http_client,
        # The SDK falls back to the process environment for edge/region when these are unset; settings come
        # from server.py only, so pin them to "none".
        environment={"TWILIO_EDGE": "", "TWILIO_REGION": ""},
    )


def _strip_whatsapp(address: str) -> str:
    address = address.strip()
    if address.lower().startswith(_WHATSAPP_PREFIX):
        return address[len(_WHATSAPP_PREFIX) :]
    return address


def _whatsapp(address: str) -> str:
    return _WHATSAPP_PREFIX + _strip_whatsapp(address)


def _reason(e: TwilioRestException | TwilioServiceException) -> str:
    if isinstance(e, TwilioServiceException):
        return e.detail or e.title
    return e.msg


def _int_or_none(value: object) -> int | None:
    try:
        return int(value)  # type: ignore[call-overload]
    except (TypeError, ValueError):
        return None
