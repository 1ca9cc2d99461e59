"""``POST /twilio/messaging``: Twilio SMS and WhatsApp into the conversation core.

The signature is checked before anything is parsed or stored (403, nothing stored, when it
fails); the turn is committed before the TwiML reply is returned; a retried or duplicated
webhook (same ``MessageSid``) stores nothing new and gets an empty ``<Response/>``, so the
customer never receives a reply twice.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from pipeline.service import ConversationService
from telephony.messaging import InvalidInbound, parse_inbound
from telephony.signatures import is_valid_signature, public_url
from telephony.twiml import empty_response, messaging_reply

log = logging.getLogger(__name__)

XML = "application/xml"


def signed_url(request: Request, public_base_url: str | None) -> str:
    """The URL Twilio signed: rebuilt from PUBLIC_BASE_URL, never from forwarded headers."""
    if public_base_url:
        return public_url(public_base_url, request.url.path, request.url.query)
    return str(request.url)


def messaging_router(
    service: ConversationService,
    *,
    auth_token: str | None,
    public_base_url: str | None,
    on_rejected: Callable[[str], None] = lambda reason: None,
) -> APIRouter:
    router = APIRouter()

    @router.post("/twilio/messaging", tags=["twilio"])
    async def twilio_messaging(request: Request) -> Response:
        form = await request.form()
        params = {k: str(v) for k, v in form.multi_items()}
        if auth_token:
            signature = request.headers.get("X-Twilio-Signature")
            if not is_valid_signature(auth_token, signed_url(request, public_base_url), params, signature):
                on_rejected("bad_signature")
                log.warning(
                    "rejected unsigned or mis-signed messaging webhook",
                    extra={"has_signature": bool(signature)},
                )
                return JSONResponse(
                    {
                        "error": {
                            "code": "bad_signature",
                            "message": "X-Twilio-Signature is missing or does not match PUBLIC_BASE_URL and TWILIO_AUTH_TOKEN",
                        }
                    },
                    status_code=403,
                )
        try:
            inbound = parse_inbound(params)
        except InvalidInbound as e:
            on_rejected("invalid_inbound")
            return JSONResponse({"error": {"code": "invalid_inbound", "message": str(e)}}, status_code=400)
        body = inbound.body.strip()
        if not body:
            body = "[media message]" if inbound.num_media else "[empty message]"
        reply = await service.handle_text(
            inbound.channel, inbound.from_address, body, external_id=f"twilio:{inbound.message_sid}"
        )
        if reply.duplicate:
            return Response(empty_response(), media_type=XML)
        return Response(messaging_reply(reply.texts), media_type=XML)

    return router
