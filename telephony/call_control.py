"""Call control over Twilio's REST API (through the official SDK): hang up a live call."""

from __future__ import annotations

import logging

from telephony.sender import DeliveryError, TwilioApiHttpClient, build_client

log = logging.getLogger(__name__)


class TwilioCallControl:
    def __init__(self, account_sid: str, auth_token: str, *, api_base_url: str | None = None, timeout: float = 10.0) -> None:
        self._http = TwilioApiHttpClient(api_base_url=api_base_url, timeout=timeout)
        self._client = build_client(account_sid, auth_token, self._http)

    async def hangup(self, call_sid: str) -> None:
        """End a live call (``status=completed``). Errors are translated to DeliveryError."""
        try:
            await self._client.calls(call_sid).update_async(status="completed")
        except Exception as e:
            retryable = getattr(e, "status", 500) >= 500
            raise DeliveryError(f"could not hang up call: {e}", retryable=retryable) from e

    async def aclose(self) -> None:
        await self._http.close()
