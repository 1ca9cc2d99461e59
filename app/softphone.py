"""The agent softphone: voice handoffs rung in the console and bridged in the browser.

:func:`build_browser_transfers` wires :class:`telephony.browser_transfer.BrowserTransfers` into a
process; :func:`softphone_routes` is its HTTP side, for staff only (session cookie + CSRF, or an
API token), each request checked against the call's agent:

* ``GET/POST /api/softphone`` — whether the signed-in agent takes calls in the browser;
* ``POST /webrtc/agent/offer`` — ``{"assignment_id", "type": "offer", "sdp"}``: open the agent's
  leg of an offered voice call (accepting it when the desk API has not yet);
* ``POST /webrtc/agent/{assignment_id}/{mute|hold|hangup|hand-back}`` — the call's agent only.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from fastapi import APIRouter, Body, Depends
from fastapi.responses import JSONResponse
from pydantic import BaseModel

from crm_bridge.transfers import BrowserTransferStore
from crm_bridge.users import STAFF, User
from telephony.browser_transfer import BrowserTransferConfig, BrowserTransfers, ControlRefused, Speech
from telephony.webrtc import OfferRefused
from web.auth import Authenticator

if TYPE_CHECKING:
    from app.container import Services


def build_browser_transfers(s: Services, ice_servers: list[dict[str, Any]]) -> BrowserTransfers:
    """Browser transfers of this process (closed with the app). Voice handoffs of calls in
    progress are routed by their call from now on, not by the desk's general routing pass."""

    def find_session(call_sid: str) -> Any:
        return next((x for x in list(s.active_calls) if x.call_sid == call_sid), None)

    transfers = BrowserTransfers(
        BrowserTransferStore(s.pool),
        s.desk.routing,
        s.desk,
        Speech(s.speech.detector, s.speech.transcriber, s.speech.synthesizer),
        s.clock,
        find_session=find_session,
        phone_transfer=s.transfer.on_handoff if s.transfer is not None else None,
        redact=s.redactor.redact,
        config=BrowserTransferConfig(
            ring_seconds=float(s.settings.transfer_ring_seconds),
            callback_minutes=s.settings.transfer_callback_minutes,
            ice_servers=ice_servers,
        ),
    )
    s.closers.append(transfers.aclose)
    return transfers


class SoftphoneIn(BaseModel):
    on: bool


class SwitchIn(BaseModel):
    on: bool = True


def _refused(status: int, code: str, message: str) -> JSONResponse:
    return JSONResponse({"error": {"code": code, "message": message}}, status_code=status)


def softphone_routes(s: Services, transfers: BrowserTransfers) -> APIRouter:
    """The softphone's routes (see the module docstring)."""
    auth = Authenticator(s.sessions, s.api_tokens, cookie_secure=s.settings.cookie_secure)
    staff = auth.require(*STAFF)
    routing = s.desk.routing
    router = APIRouter()

    @router.get("/api/softphone", tags=["desk"])
    async def softphone(user: User = Depends(staff)) -> dict[str, Any]:
        """Whether voice handoffs ring the signed-in agent's console (else their phone)."""
        return {"softphone": await routing.softphone(user.id)}

    @router.post("/api/softphone", tags=["desk"])
    async def set_softphone(body: SoftphoneIn, user: User = Depends(staff)) -> dict[str, Any]:
        return {"softphone": await routing.set_softphone(user.id, body.on)}

    @router.post("/webrtc/agent/offer", tags=["voice"])
    async def agent_offer(body: dict[str, Any] = Body(...), user: User = Depends(staff)) -> JSONResponse:
        """Open the agent's audio leg of the voice call offered to them (SDP offer, ICE gathered)."""
        try:
            assignment_id = int(body.get("assignment_id"))  # type: ignore[arg-type]
        except (TypeError, ValueError):
            return _refused(400, "bad_request", "assignment_id is required")
        try:
            answer = await transfers.open_leg(assignment_id, user.id, body)
        except (ControlRefused, OfferRefused) as e:
            return _refused(e.status, e.code, e.message)
        return JSONResponse(answer)

    async def control(assignment_id: int, user: User, action: str, on: bool = True) -> JSONResponse:
        try:
            state = transfers.control(assignment_id, user.id, action, on)
        except ControlRefused as e:
            return _refused(e.status, e.code, e.message)
        if action in ("hangup", "hand_back"):
            call = await transfers.finished(assignment_id)
            state = {**state, "stage": "ended", "outcome": call.outcome if call else action}
        return JSONResponse(state)

    @router.post("/webrtc/agent/{assignment_id}/mute", tags=["voice"])
    async def mute(
        assignment_id: int, body: SwitchIn | None = None, user: User = Depends(staff)
    ) -> JSONResponse:
        """Mute (``{"on": true}``) or unmute the agent: the caller stops hearing them."""
        return await control(assignment_id, user, "mute", body.on if body else True)

    @router.post("/webrtc/agent/{assignment_id}/hold", tags=["voice"])
    async def hold(
        assignment_id: int, body: SwitchIn | None = None, user: User = Depends(staff)
    ) -> JSONResponse:
        """Hold (``{"on": true}``) or resume: neither side hears the other."""
        return await control(assignment_id, user, "hold", body.on if body else True)

    @router.post("/webrtc/agent/{assignment_id}/hangup", tags=["voice"])
    async def hangup(assignment_id: int, user: User = Depends(staff)) -> JSONResponse:
        """End the call for the caller (the ticket stays the agent's for wrap-up)."""
        return await control(assignment_id, user, "hangup")

    @router.post("/webrtc/agent/{assignment_id}/hand-back", tags=["voice"])
    async def hand_back(assignment_id: int, user: User = Depends(staff)) -> JSONResponse:
        """Give the call back to the assistant, which takes the caller's turns again."""
        return await control(assignment_id, user, "hand_back")

    return router
