"""Who may play a call recording, and that no recording row can make the server read (or delete) a
file outside the recordings folder."""

from __future__ import annotations

import secrets
from collections.abc import AsyncIterator
from datetime import timedelta
from pathlib import Path

import pytest

from tests.support import LiveServer, live_server, token_client

WAV = b"RIFF" + secrets.token_bytes(64)
SECRET = b"not a recording: " + secrets.token_bytes(16)


@pytest.fixture(scope="module")
async def server(database_url: str, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[LiveServer]:
    data_dir = tmp_path_factory.mktemp("recording-access")
    async with live_server(database_url, data_dir=data_dir) as live:
        yield live


def folder(server: LiveServer) -> Path:
    recordings = server.services.recordings
    assert recordings is not None
    recordings.folder.mkdir(parents=True, exist_ok=True)
    return recordings.folder


async def recorded_conversation(server: LiveServer, path: str, *, expired: bool = False) -> int:
    s = server.services
    now = s.clock.now()
    conv_id = int(
        await s.pool.fetchval(
            """INSERT INTO conversations (channel, address, created_at, updated_at)
               VALUES ('voice', $1, $2, $2) RETURNING id""",
            "CA" + secrets.token_hex(16),
            now,
        )
    )
    await s.pool.execute(
        """INSERT INTO recordings (conversation_id, call_sid, path, duration_s, sample_rate, notice,
                                   created_at, expires_at)
           VALUES ($1, $2, $3, 1.0, 8000, 'This call is recorded.', $4, $5)""",
        conv_id,
        "CA" + secrets.token_hex(16),
        path,
        now,
        now + (timedelta(seconds=-1) if expired else timedelta(days=30)),
    )
    return conv_id


def url(conv_id: int | str) -> str:
    return f"/api/supervisor/conversations/{conv_id}/recording"


async def test_supervisors_and_admins_play_a_recording_agents_and_strangers_do_not(
    server: LiveServer,
) -> None:
    name = secrets.token_hex(8) + ".wav"
    (folder(server) / name).write_bytes(WAV)
    conv_id = await recorded_conversation(server, name)

    for role in ("supervisor", "admin"):
        response = await (await token_client(server, role)).get(url(conv_id))
        assert response.status_code == 200, role
        assert response.headers["content-type"] == "audio/wav" and response.content == WAV
        assert "no-store" in response.headers["cache-control"]

    agent = await (await token_client(server, "agent")).get(url(conv_id))
    assert agent.status_code == 403 and agent.content != WAV
    anonymous = await server.anonymous().get(url(conv_id))
    assert anonymous.status_code == 401 and anonymous.json()["error"]["code"] == "not_authenticated"
    page = await server.anonymous().get(f"/supervisor/conversations/{conv_id}", follow_redirects=False)
    assert page.status_code in (302, 303, 307) and "/login" in page.headers["location"]


async def test_a_row_pointing_outside_the_recordings_folder_is_refused(
    server: LiveServer, tmp_path: Path
) -> None:
    supervisor = await token_client(server, "supervisor")
    recordings = folder(server)
    inside_data_dir = recordings.parent / "secret.wav"  # the data dir, not its recordings folder
    inside_data_dir.write_bytes(SECRET)
    elsewhere = tmp_path / "secret.wav"
    elsewhere.write_bytes(SECRET)
    link = recordings / (secrets.token_hex(8) + ".wav")
    link.symlink_to(elsewhere)
    for path in (
        "../secret.wav",
        str(elsewhere),
        f"../../{tmp_path.name}/secret.wav",
        link.name,
        "/etc/passwd",
        "",
    ):
        conv_id = await recorded_conversation(server, path)
        response = await supervisor.get(url(conv_id))
        assert response.status_code == 404, path
        assert response.json()["error"]["code"] == "recording_unavailable", path
        assert SECRET not in response.content and b"root:" not in response.content


async def test_the_path_in_the_url_is_a_conversation_id_and_nothing_else(server: LiveServer) -> None:
    supervisor = await token_client(server, "supervisor")
    for conv_id in ("..%2F..%2Fetc%2Fpasswd", "1%2F..%2F..%2Fsecret.wav", "-1", "0"):
        response = await supervisor.get(url(conv_id))
        assert response.status_code in (404, 422), conv_id
        assert b"root:" not in response.content


async def test_another_conversations_recording_is_not_reachable_through_an_id_without_one(
    server: LiveServer,
) -> None:
    name = secrets.token_hex(8) + ".wav"
    (folder(server) / name).write_bytes(WAV)
    await recorded_conversation(server, name)
    s = server.services
    bare = await s.pool.fetchval(
        """INSERT INTO conversations (channel, address, created_at, updated_at)
           VALUES ('voice', $1, $2, $2) RETURNING id""",
        "CA" + secrets.token_hex(16),
        s.clock.now(),
    )
    response = await (await token_client(server, "supervisor")).get(url(bare))
    assert response.status_code == 404 and response.json()["error"]["code"] == "recording_not_found"


async def test_retention_never_deletes_a_file_outside_the_recordings_folder(server: LiveServer) -> None:
    recordings = server.services.recordings
    assert recordings is not None
    outside = folder(server).parent / "keep-me.wav"
    outside.write_bytes(SECRET)
    await recorded_conversation(server, "../keep-me.wav", expired=True)
    assert await recordings.cleanup() >= 1
    assert outside.read_bytes() == SECRET
