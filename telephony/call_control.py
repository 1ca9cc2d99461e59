"""Call control over Twilio's REST API (through the official SDK): hang up, redirect and place calls."""

from __future__ import annotations

import logging
from collections.abc import Sequence

from telephony.sender import DeliveryError, TwilioApiHttpClient, build_client

log = logging.getLogger(__name__)


def _translated(what: str, e: Exception) -> DeliveryError:
    status = getattr(e, "status", None)
    retryable = status is None or int(status) >= 500 or int(status) == 429
    code = getattr(e, "code", None)
    return DeliveryError(
        f"could not {what}: {e}",
        retryable=retryable,
        status=int(status) if status else None,
        code=int(code) if isinstance(code, int) else None,
    )


class TwilioCallControl:
    def __init__(
        self, account_sid: str, auth_token: str, *, api_base_url: str | None = None, timeout: float = 10.0
    ) -> None:
        self._http = TwilioApiHttpClient(api_base_url=api_base_url, timeout=timeout)
        self._client = build_client(account_sid, auth_token, self._http)

    async def hangup(self, call_sid: str) -> None:
        """End a live call (``status=completed``). Errors are translated to DeliveryError."""
        try:
            await self._client.calls(call_sid).update_async(status="completed")
        except Exception as e:
            raise _translated("hang up call", e) from e

    async def redirect(self, call_sid: str, twiml: str) -> None:
        """Give a live call new TwiML (a streaming call's media stream ends at that moment)."""
        try:
            await self._client.calls(call_sid).update_async(twiml=twiml)
        except Exception as e:
            raise _translated("update call", e) from e

    async def dial(
        self, *, to: str, from_: str, twiml: str, status_callback: str, events: Sequence[str], timeout_s: int
    ) -> str:
        """Place an outbound call running ``twiml``; returns its CallSid."""
        try:
            call = await self._client.calls.create_async(
                to=to,
                from_=from_,
                twiml=twiml,
                status_callback=status_callback,
                status_callback_method="POST",
                status_callback_event=list(events),
                timeout=timeout_s,
            )
        except Exception as e:
            raise _translated("place call", e) from e
        if not call.sid:
            raise DeliveryError("Twilio answered without a CallSid", retryable=False)
        return str(call.sid)

    async def cancel(self, call_sid: str) -> None:
        """Stop a call we placed: ``canceled`` while it rings, ``completed`` once answered."""
        try:
            await self._client.calls(call_sid).update_async(status="canceled")
            return
        except Exception:
            log.info("cancel refused; hanging up instead", extra={"call_sid": call_sid})
        await self.hangup(call_sid)

    async def aclose(self) -> None:
        await self._http.close()
