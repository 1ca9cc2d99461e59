"""``POST /twilio/messaging``: Twilio SMS and WhatsApp into the conversation core.

The request is checked by the :class:`~telephony.twilio_guard.TwilioGuard` before anything is
parsed or stored (403, nothing stored, when it fails); the turn is committed before the TwiML
reply is returned; a retried or duplicated webhook (same ``MessageSid``) stores nothing new and
gets an empty ``<Response/>``, so the customer never receives a reply twice.
"""

from __future__ import annotations

import logging

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from pipeline.service import ConversationService
from telephony.messaging import InvalidInbound, parse_inbound
from telephony.twilio_guard import TwilioGuard
from telephony.twiml import empty_response, messaging_reply

log = logging.getLogger(__name__)

XML = "application/xml"


def messaging_router(service: ConversationService, *, guard: TwilioGuard) -> APIRouter:
    router = APIRouter()

    @router.post("/twilio/messaging", tags=["twilio"])
    async def twilio_messaging(request: Request) -> Response:
        params, refused = await guard.signed_form(request)
        if refused is not None:
            return refused
        try:
            inbound = parse_inbound(params)
        except InvalidInbound as e:
            guard.on_rejected("invalid_inbound")
            return JSONResponse({"error": {"code": "invalid_inbound", "message": str(e)}}, status_code=400)
        body = inbound.body.strip()
        if not body:
            body = "[media message]" if inbound.num_media else "[empty message]"
        reply = await service.handle_text(
            inbound.channel,
            inbound.from_address,
            body,
            external_id=f"twilio:{inbound.message_sid}",
            # a verified signature proves the From address; an unsigned dev request proves nothing
            channel_signed=not guard.accepts_unsigned,
        )
        if reply.duplicate:
            return Response(empty_response(), media_type=XML)
        return Response(messaging_reply(reply.texts), media_type=XML)

    return router
