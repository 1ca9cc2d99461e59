"""What `make run` does on a fresh machine: `closeloop serve` with embedded PostgreSQL and demo data,
the first admin and an API token made with `closeloop user add` / `token create` while it runs,
then the refund story played with `closeloop chat`; plus `closeloop intents import|export` and `demo seed`."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from tests.support import free_port, process_env

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


@dataclass
class EmbeddedServer:
    base: str
    api: httpx.Client  # sends an admin's API token
    data_dir: Path


def _admin_token(data_dir: Path) -> str:
    """The first admin and a token, made by the CLI against the running server's embedded database."""
    env = process_env(CLOSELOOP_DATA_DIR=str(data_dir))
    added = subprocess.run(
        [
            str(BIN / "closeloop"),
            "user",
            "add",
            "admin@example.com",
            "--name",
            "Ada Admin",
            "--role",
            "admin",
            "--password-stdin",
        ],
        input="correct horse battery\n",
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    assert added.returncode == 0, added.stderr
    token = subprocess.run(
        [str(BIN / "closeloop"), "token", "create", "admin@example.com", "--name", "tests"],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    assert token.returncode == 0, token.stderr
    return token.stdout.strip()


@pytest.fixture(scope="module")
def embedded_server() -> Iterator[EmbeddedServer]:
    data_dir = Path(tempfile.mkdtemp(prefix="closeloop-run-"))
    data_dir.chmod(0o755)
    port = free_port()
    log = open(data_dir / "server.log", "w+")  # noqa: SIM115 - closed below
    proc = subprocess.Popen(
        [str(BIN / "closeloop"), "serve", "--port", str(port)],
        cwd=ROOT,
        env=process_env(CLOSELOOP_DATA_DIR=str(data_dir)),
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                log.seek(0)
                raise AssertionError(f"closeloop serve exited early:\n{log.read()}")
            try:
                if httpx.get(base + "/healthz", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.3)
        else:
            raise AssertionError("closeloop serve did not become healthy in 120 s")
        assert httpx.get(base + "/api/customers/1").status_code == 401
        with httpx.Client(
            base_url=base, headers={"Authorization": f"Bearer {_admin_token(data_dir)}"}
        ) as api:
            yield EmbeddedServer(base, api, data_dir)
        assert proc.poll() is None, "the CLI stopped the server's embedded PostgreSQL"
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.seek(0)
        output = log.read()
        log.close()
        shutil.rmtree(data_dir, ignore_errors=True)
        assert "Traceback" not in output, output


def test_serve_starts_embedded_postgres_with_demo_data_and_chat_plays_the_refund_story(
    embedded_server: EmbeddedServer,
) -> None:
    customer = embedded_server.api.get("/api/customers/1").json()
    assert customer["customer"]["name"] == "Dana Reyes"
    assert {o["status"] for o in customer["orders"]} == {"placed", "shipped", "delivered"}

    session_file = embedded_server.data_dir / "chat-session"

    def chat(*messages: str) -> str:
        args = [
            str(BIN / "closeloop"),
            "chat",
            "--url",
            embedded_server.base,
            "--session-file",
            str(session_file),
        ]
        for m in messages:
            args += ["-m", m]
        result = subprocess.run(args, capture_output=True, text=True, timeout=120, env=process_env())
        assert result.returncode == 0, result.stderr
        return result.stdout

    out = chat("hi", "my phone number is +1 555 010 0001")
    assert "I've sent it a 6-digit code" in out and "Dana" not in out
    # The demo has no SMS provider: the code waits in the local outbox, which an admin reads.
    outbox = subprocess.run(
        [str(BIN / "closeloop"), "outbox", "--limit", "1"],
        capture_output=True,
        text=True,
        timeout=120,
        env=process_env(CLOSELOOP_DATA_DIR=str(embedded_server.data_dir)),
    )
    assert outbox.returncode == 0, outbox.stderr
    assert "+15550100001" in outbox.stdout
    code = re.search(r"code is (\d{6})", outbox.stdout)
    assert code is not None, outbox.stdout
    out = chat(
        code.group(1),
        "I want a refund for my order",
        "4517",
        "yes please",
        "what's the status of order 4520?",
    )
    assert "Thanks Dana, you're verified." in out
    assert "Which order is it" in out and "4522" in out
    assert "Shall I go ahead?" in out
    assert "$89.00 is refunded for order 4517" in out
    assert "return label" in out
    assert "Order 4520 (Running shoes) shipped" in out
    order = embedded_server.api.get("/api/orders/4517").json()
    assert order["refunded_cents"] == 8900


def test_the_embedded_postgres_is_restarted_after_kill_9_with_its_data(
    embedded_server: EmbeddedServer,
) -> None:
    intent = {
        "name": "gift_wrap",
        "description": "Whether an order can be gift wrapped.",
        "action": "faq",
        "answer": "Yes, any order can be gift wrapped for $4.",
        "examples": ["can you gift wrap my order", "do you do gift wrapping"],
    }
    created = embedded_server.api.post("/api/intents", json=intent)
    assert created.status_code == 201, created.text
    pid_file = embedded_server.data_dir / "pgdata" / "postmaster.pid"
    pid = int(pid_file.read_text().split()[0])

    os.kill(pid, signal.SIGKILL)  # the database process dies (a crash, the OOM killer)
    killed_at = time.monotonic()
    during = embedded_server.api.get("/api/intents")  # the database away, or already back
    assert during.status_code in (200, 503), during.text  # never a 500
    if during.status_code == 503:
        assert during.headers["Retry-After"] and during.json()["error"]["code"] == "database_unavailable"
    while True:  # until a new server process answers, within 15 s
        try:
            health = httpx.get(embedded_server.base + "/healthz", timeout=2)
        except httpx.HTTPError:
            health = None
        restarted = pid_file.is_file() and pid_file.read_text().split()[:1] not in ([], [str(pid)])
        if restarted and health is not None and health.status_code == 200:
            break
        assert time.monotonic() - killed_at < 15, f"/healthz {health and health.text} 15 s after kill -9"
        time.sleep(0.2)

    again = embedded_server.api.get("/api/intents/gift_wrap")  # what was committed is still there
    assert again.status_code == 200 and again.json()["answer"] == intent["answer"]
    assert embedded_server.api.get("/api/customers/1").json()["customer"]["name"] == "Dana Reyes"


def test_call_simulator_places_a_phone_call_against_the_running_server(
    embedded_server: EmbeddedServer, tmp_path: Path
) -> None:
    record = tmp_path / "call.wav"
    result = subprocess.run(
        [
            str(BIN / "closeloop"),
            "call",
            "--url",
            embedded_server.base,
            "--caller",
            "+15550100002",
            "--say",
            "what are your opening hours",
            "--say",
            "thanks, goodbye",
            "--record",
            str(record),
        ],
        capture_output=True,
        text=True,
        timeout=180,
        env=process_env(),
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "(greeting)" in result.stdout and "latency:" in result.stdout
    assert "protocol violations: 0" in result.stdout
    assert record.stat().st_size > 8000
    convs = embedded_server.api.get("/api/conversations", params={"channel": "voice"}).json()["conversations"]
    conv = embedded_server.api.get(f"/api/conversations/{convs[0]['id']}").json()
    # a caller ID only claims the account: the greeting names nobody
    assert conv["messages"][0]["body"] == "Thanks for calling. How can I help you today?"
    assert any(m["sender"] == "customer" for m in conv["messages"])


def test_chat_against_a_server_that_is_not_running_says_what_to_do() -> None:
    result = subprocess.run(
        [str(BIN / "closeloop"), "chat", "--url", f"http://127.0.0.1:{free_port()}", "-m", "hi"],
        capture_output=True,
        text=True,
        timeout=60,
        env=process_env(),
    )
    assert result.returncode == 2
    assert "make run" in (result.stdout + result.stderr)


def test_intents_export_import_round_trip_and_demo_seed(database_url: str, tmp_path: Path) -> None:
    env = process_env(DATABASE_URL=database_url)
    exported = subprocess.run(
        [str(BIN / "closeloop"), "intents", "export"], capture_output=True, text=True, timeout=60, env=env
    )
    assert exported.returncode == 0, exported.stderr
    assert "name: refund" in exported.stdout
    edited = (
        exported.stdout.replace("Mon-Fri", "Mon-Sun") if "Mon-Fri" in exported.stdout else exported.stdout
    )
    path = tmp_path / "intents.yaml"
    path.write_text(
        edited
        + "- name: loyalty\n  action: faq\n  answer: Points never expire.\n  examples: [do my points expire]\n"
    )
    imported = subprocess.run(
        [str(BIN / "closeloop"), "intents", "import", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
    )
    assert imported.returncode == 0, imported.stderr
    again = subprocess.run(
        [str(BIN / "closeloop"), "intents", "export"], capture_output=True, text=True, timeout=60, env=env
    )
    assert "name: loyalty" in again.stdout and "Points never expire." in again.stdout

    broken = tmp_path / "broken.yaml"
    broken.write_text("- name: bad\n  policy: sometimes\n")
    failed = subprocess.run(
        [str(BIN / "closeloop"), "intents", "import", str(broken)],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
    )
    assert failed.returncode == 1 and "bad" in failed.stderr

    # restore the seed intents for the other tests of this run
    restored = subprocess.run(
        [str(BIN / "closeloop"), "intents", "import", str(ROOT / "intents.yaml")],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
    )
    assert restored.returncode == 0, restored.stderr

    seeded = subprocess.run(
        [str(BIN / "closeloop"), "demo", "seed"], capture_output=True, text=True, timeout=60, env=env
    )
    assert seeded.returncode == 0, seeded.stderr
    assert "11 orders" in seeded.stdout


def test_agent_set_gives_a_user_queues_capacity_and_presence(database_url: str) -> None:
    env = process_env(DATABASE_URL=database_url)
    email = f"maya-{os.getpid()}@example.com"
    added = subprocess.run(
        [
            str(BIN / "closeloop"),
            "user",
            "add",
            email,
            "--name",
            "Maya",
            "--role",
            "agent",
            "--password-stdin",
        ],
        input="correct horse battery\n",
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
    )
    assert added.returncode == 0, added.stderr
    result = subprocess.run(
        [
            str(BIN / "closeloop"),
            "agent",
            "set",
            email,
            "--queues",
            "support,billing",
            "--capacity",
            "4",
            "--presence",
            "available",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
    )
    assert result.returncode == 0, result.stderr
    assert f"{email}: queues billing, support; skills -; capacity 4; available" in result.stdout  # sorted
    unknown = subprocess.run(
        [str(BIN / "closeloop"), "agent", "set", "nobody@example.com", "--queues", "support"],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
    )
    assert unknown.returncode == 1 and "no user with the email" in unknown.stderr
