"""``GET /api/supervisor/conversations/{id}/recording``: a recorded call's stereo WAV (caller left,
bot right), for supervisors and admins, who play it from the conversation timeline.

The file is found through the conversation's ``recordings`` row only: nothing of the request
names a path. A row whose path leads outside the recordings folder is refused like a missing file.
"""

from __future__ import annotations

from fastapi import APIRouter, Depends
from fastapi.responses import FileResponse

from crm_bridge.access import AccessPolicy, Viewer
from crm_bridge.recordings import Recordings
from crm_bridge.users import MANAGERS
from web.api import ApiError, reader
from web.auth import Authenticator


def recordings_router(auth: Authenticator, access: AccessPolicy, recordings: Recordings) -> APIRouter:
    router = APIRouter()
    read_as = reader(auth.require, access, *MANAGERS)

    @router.get(
        "/api/supervisor/conversations/{conversation_id}/recording",
        tags=["supervisor"],
        response_class=FileResponse,
        responses={200: {"content": {"audio/wav": {}}, "description": "stereo WAV: caller left, bot right"}},
    )
    async def recording(conversation_id: int, viewer: Viewer = Depends(read_as)) -> FileResponse:
        """The conversation's call recording (404 when there is none, it expired, or it is unreadable)."""
        found = (
            await recordings.latest(conversation_id)
            if await access.may_read_conversation(viewer, conversation_id)
            else None
        )
        if found is None:
            raise ApiError(404, "recording_not_found", f"no recording of conversation {conversation_id}")
        path = recordings.file_of(found)
        if path is None:
            raise ApiError(
                404, "recording_unavailable", f"the recording of conversation {conversation_id} is gone"
            )
        return FileResponse(
            path,
            media_type="audio/wav",
            filename=f"conversation-{conversation_id}.wav",
            content_disposition_type="inline",
            headers={"Cache-Control": "private, no-store"},
        )

    return router


__all__ = ["recordings_router"]
