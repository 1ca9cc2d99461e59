"""The ``closeloop`` command line: ``serve``, ``chat``, ``call``, ``demo``, ``intents``, ``user``,
``agent``, ``token`` and ``outbox``.

Commands other than ``serve`` work on the database directly (a small pool, migrated first), so
they run with or without a server.
"""

from __future__ import annotations

import argparse
import asyncio
import getpass
import logging
import sys
from pathlib import Path

import asyncpg

from app.database import with_pool
from app.settings import Settings
from crm_bridge import db
from crm_bridge.demo import seed_demo
from crm_bridge.intents_store import IntentStore, dump_yaml, load_yaml
from crm_bridge.users import (
    MIN_PASSWORD_LENGTH,
    ROLES,
    ApiTokenStore,
    User,
    UserStore,
    check_password_strength,
)
from crm_bridge.verification import local_outbox
from pipeline.clock import SystemClock


class _OneLineConnectionErrors(logging.Filter):
    """asyncpg's pool logs a full traceback each time it cannot reconnect while the database is away
    (restarting, an outage, "the database system is starting up"); one line says as much."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and isinstance(record.exc_info[1], db.UNREACHABLE):
            record.msg = f"{record.getMessage()} ({type(record.exc_info[1]).__name__})"
            record.args = ()
            record.exc_info = None
            record.exc_text = None
        return True


def _configure_logging(level: str) -> None:
    logging.basicConfig(level=level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("asyncpg.pool").addFilter(_OneLineConnectionErrors())
    # pipecat logs through loguru, at DEBUG for every frame by default: same level as ours.
    import sys  # noqa: PLC0415

    from loguru import logger  # noqa: PLC0415

    logger.remove()
    logger.add(sys.stderr, level=level.upper())


def _cmd_serve(args: argparse.Namespace, settings: Settings) -> int:
    from app.serve import serve  # noqa: PLC0415 - uvicorn and the app load only to serve

    if args.host:
        settings.host = args.host
    if args.port:
        settings.port = args.port
    _configure_logging(settings.log_level)
    print(
        f"closeloop: serving on http://{settings.host}:{settings.port}  (web chat: /chat, API docs: /docs)",
        file=sys.stderr,
    )
    serve(settings)
    return 0


def _cmd_chat(args: argparse.Namespace, settings: Settings) -> int:
    from web.chat_client import run_from_args  # noqa: PLC0415

    if args.url is None:
        args.url = settings.base_url
    return run_from_args(args)


def _cmd_call(args: argparse.Namespace, settings: Settings) -> int:
    from telephony.simulator import run_from_args  # noqa: PLC0415

    if args.url is None:
        args.url = settings.base_url
    if args.auth_token is None:
        args.auth_token = settings.twilio_auth_token
    return run_from_args(args)


def _cmd_demo(args: argparse.Namespace, settings: Settings) -> int:
    async def work(pool: asyncpg.Pool) -> int:
        return await seed_demo(pool, SystemClock().now())

    count = asyncio.run(with_pool(settings, work))
    print(
        f"demo company loaded: 3 customers, {count} orders (try: closeloop chat, then 'my phone is +15550100001')"
    )
    return 0


def _cmd_intents(args: argparse.Namespace, settings: Settings) -> int:
    async def work(pool: asyncpg.Pool) -> int:
        store = IntentStore(pool)
        await store.seed_if_empty(load_yaml(settings.intents_file))
        if args.intents_cmd == "import":
            intents = load_yaml(Path(args.file))
            await store.replace_all(intents)
            print(f"imported {len(intents)} intents from {args.file}")
        else:
            text = dump_yaml(await store.list())
            if args.file and args.file != "-":
                Path(args.file).write_text(text, encoding="utf-8")
                print(f"exported intents to {args.file}", file=sys.stderr)
            else:
                sys.stdout.write(text)
        return 0

    return int(asyncio.run(with_pool(settings, work)))


def _read_password(args: argparse.Namespace) -> str:
    """The new password: the first line of stdin with ``--password-stdin``, else asked twice."""
    if args.password_stdin:
        password = sys.stdin.readline().rstrip("\r\n")
    else:
        if not sys.stdin.isatty():
            raise ValueError("no terminal to ask for the password: pipe it in with --password-stdin")
        password = getpass.getpass(f"Password for {args.email} ({MIN_PASSWORD_LENGTH}+ characters): ")
        check_password_strength(password)
        if getpass.getpass("Repeat the password: ") != password:
            raise ValueError("the two passwords differ; nothing was changed")
    check_password_strength(password)
    return password


def _cmd_user(args: argparse.Namespace, settings: Settings) -> int:
    # Ask for the password before starting a database: a typo should not cost a server start.
    password = _read_password(args) if args.user_cmd in ("add", "password") else ""

    async def work(pool: asyncpg.Pool) -> int:
        users = UserStore(pool)
        if args.user_cmd == "add":
            user = await users.create_user(args.email, args.name, args.role, password, phone=args.phone)
            print(f"created {user.role} {user.name} <{user.email}> (user {user.id})")
        elif args.user_cmd == "password":
            user = await _user_by_email(users, args.email)
            await users.set_password(user.id, password)
            print(f"new password set for {user.email}; their browser sessions were ended")
        else:
            for u in await users.list():
                flags = " (disabled)" if u.disabled else ""
                print(f"{u.id:>5}  {u.role:<10}  {u.email:<32}  {u.name}{flags}")
        return 0

    return int(asyncio.run(with_pool(settings, work)))


async def _user_by_email(users: UserStore, email: str) -> User:
    user = await users.get_by_email(email)
    if user is None:
        raise ValueError(f"no user with the email {email} (see: closeloop user list)")
    return user


def _cmd_agent(args: argparse.Namespace, settings: Settings) -> int:
    from crm_bridge.routing import Routing  # noqa: PLC0415

    async def work(pool: asyncpg.Pool) -> int:
        user = await _user_by_email(UserStore(pool), args.email)
        routing = Routing(pool, SystemClock())
        agent = None
        if args.queues is not None:
            agent = await routing.set_queues(
                user.id, [q.strip() for q in args.queues.split(",") if q.strip()]
            )
        if args.skills is not None:
            agent = await routing.set_skills(
                user.id, [k.strip() for k in args.skills.split(",") if k.strip()]
            )
        if args.capacity is not None:
            agent = await routing.set_capacity(user.id, args.capacity)
        if args.presence is not None:
            agent = await routing.set_presence(user.id, args.presence)
        agent = agent or await routing.agent(user.id)
        if agent is None:
            print(f"{user.email} has no agent settings yet (give --queues)")
            return 0
        print(
            f"{user.email}: queues {', '.join(agent.queues) or '-'}; skills {', '.join(agent.skills) or '-'}; "
            f"capacity {agent.capacity}; {agent.presence}"
        )
        return 0

    return int(asyncio.run(with_pool(settings, work)))


def _cmd_token(args: argparse.Namespace, settings: Settings) -> int:
    async def work(pool: asyncpg.Pool) -> int:
        tokens = ApiTokenStore(pool)
        if args.token_cmd == "create":
            user = await _user_by_email(UserStore(pool), args.email)
            token = await tokens.create(user, args.name)
            print(
                f"API token {args.name!r} acts as {user.email} ({user.role}). It is shown only this once; "
                "send it as 'Authorization: Bearer <token>':",
                file=sys.stderr,
            )
            print(token)
        elif args.token_cmd == "revoke":
            if not await tokens.revoke_id(args.id):
                raise ValueError(f"no live API token {args.id} (see: closeloop token list)")
            print(f"revoked API token {args.id}")
        else:
            users = {u.id: u.email for u in await UserStore(pool).list()}
            for t in await tokens.list():
                used = t.last_used_at.strftime("%Y-%m-%d %H:%M") if t.last_used_at else "never"
                state = "revoked" if t.revoked_at else "live"
                print(
                    f"{t.id:>5}  {state:<7}  {users.get(t.user_id, '?'):<32}  {t.name:<24}  last used: {used}"
                )
        return 0

    return int(asyncio.run(with_pool(settings, work)))


def _cmd_outbox(args: argparse.Namespace, settings: Settings) -> int:
    async def work(pool: asyncpg.Pool) -> int:
        rows = await local_outbox(pool, limit=args.limit)
        if not rows:
            print("the local outbox is empty (no verification codes waiting)", file=sys.stderr)
        for r in reversed(rows):
            print(
                f"{r['created_at']:%Y-%m-%d %H:%M:%S}  {r['channel']:<8}  to {r['address']:<18}  {r['body']}"
            )
        return 0

    return int(asyncio.run(with_pool(settings, work)))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="closeloop", description="closeloop: an AI contact center that completes work."
    )
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="run the server (embedded PostgreSQL when DATABASE_URL is unset)")
    serve.add_argument("--host")
    serve.add_argument("--port", type=int)
    chat = sub.add_parser("chat", help="talk to a running server from the terminal")
    from web.chat_client import main_args  # noqa: PLC0415

    main_args(chat)
    chat.set_defaults(url=None)
    call = sub.add_parser("call", help="place a simulated Twilio phone call to a running server")
    from telephony.simulator import add_arguments  # noqa: PLC0415

    add_arguments(call)
    call.set_defaults(url=None, auth_token=None)
    demo = sub.add_parser("demo", help="demo data")
    demo_sub = demo.add_subparsers(dest="demo_cmd", required=True)
    demo_sub.add_parser("seed", help="load the demo company into the database")
    intents = sub.add_parser("intents", help="import or export intents as YAML")
    intents_sub = intents.add_subparsers(dest="intents_cmd", required=True)
    imp = intents_sub.add_parser("import", help="replace the stored intents with a YAML file")
    imp.add_argument("file")
    exp = intents_sub.add_parser("export", help="write the stored intents as YAML")
    exp.add_argument("file", nargs="?", default="-")
    user = sub.add_parser("user", help="people who sign in: agents, supervisors, admins")
    user_sub = user.add_subparsers(dest="user_cmd", required=True)
    add = user_sub.add_parser("add", help="create a user (asks for the password twice)")
    add.add_argument("email")
    add.add_argument("--name", required=True)
    add.add_argument("--role", required=True, choices=ROLES)
    add.add_argument("--phone", help="where the agent takes warm transfers, e.g. +15550100001")
    add.add_argument(
        "--password-stdin", action="store_true", help="read the password from the first line of stdin"
    )
    password = user_sub.add_parser("password", help="set a new password (ends the user's browser sessions)")
    password.add_argument("email")
    password.add_argument(
        "--password-stdin", action="store_true", help="read the password from the first line of stdin"
    )
    user_sub.add_parser("list", help="list users")
    agent = sub.add_parser("agent", help="an agent's queues, skills, capacity and presence")
    agent_sub = agent.add_subparsers(dest="agent_cmd", required=True)
    agent_set = agent_sub.add_parser(
        "set", help="e.g. closeloop agent set maya@example.com --queues support,billing"
    )
    agent_set.add_argument("email")
    agent_set.add_argument("--queues", help="comma-separated queue names")
    agent_set.add_argument("--skills", help="comma-separated skills")
    agent_set.add_argument("--capacity", type=int, help="conversations at once")
    agent_set.add_argument("--presence", choices=("available", "busy", "away"))
    token = sub.add_parser("token", help="API tokens for integrations (Authorization: Bearer ...)")
    token_sub = token.add_subparsers(dest="token_cmd", required=True)
    create = token_sub.add_parser("create", help="create a token acting as a user; printed once")
    create.add_argument("email")
    create.add_argument("--name", required=True, help="what uses the token, e.g. 'prometheus' or 'crm sync'")
    revoke = token_sub.add_parser("revoke", help="revoke a token by id")
    revoke.add_argument("id", type=int)
    token_sub.add_parser("list", help="list tokens (never their values)")
    outbox = sub.add_parser(
        "outbox", help="verification codes waiting in the local outbox (embedded demo: no SMS provider)"
    )
    outbox.add_argument("--limit", type=int, default=20, help="how many of the latest to show")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    settings = Settings()
    handler = {
        "serve": _cmd_serve,
        "chat": _cmd_chat,
        "call": _cmd_call,
        "demo": _cmd_demo,
        "intents": _cmd_intents,
        "user": _cmd_user,
        "token": _cmd_token,
        "outbox": _cmd_outbox,
        "agent": _cmd_agent,
    }[args.command]
    try:
        return handler(args, settings)
    except KeyboardInterrupt:
        return 130
    except (RuntimeError, ValueError, OSError) as e:
        print(f"closeloop: {e}", file=sys.stderr)
        return 1
