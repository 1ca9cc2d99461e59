"""``closeloop call``: the command line of the simulated Twilio caller.

The call itself is :func:`telephony.simulated_call.run_call` (see that module for the rules the
simulator follows); the pieces it is made of are re-exported here, where tests and benchmarks
import them from.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path
from typing import Any

from telephony.call_report import CallReport, TurnReport
from telephony.call_script import Utterance, load_script
from telephony.caller_audio import load_wav, render_tts, trim_silence
from telephony.playout_buffer import PlayoutBuffer
from telephony.simulated_call import (
    DEFAULT_ACCOUNT_SID,
    DEFAULT_CALLED,
    DEFAULT_CALLER,
    DEFAULT_URL,
    CallSetupError,
    ServerUnreachable,
    run_call,
)
from telephony.stream_target import StreamTarget, TwimlError, media_socket_url, parse_stream_twiml

__all__ = [
    "CallReport",
    "CallSetupError",
    "PlayoutBuffer",
    "ServerUnreachable",
    "StreamTarget",
    "TurnReport",
    "TwimlError",
    "Utterance",
    "add_arguments",
    "load_script",
    "load_wav",
    "media_socket_url",
    "parse_stream_twiml",
    "render_tts",
    "run_call",
    "run_from_args",
    "script_from_args",
    "trim_silence",
]

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_UNREACHABLE = 2


class _StepAction(argparse.Action):
    """Appends ``(kind, value)`` to one ordered list, so --say/--wav/--dtmf/--script keep their order."""

    def __call__(
        self,
        parser: argparse.ArgumentParser,
        namespace: argparse.Namespace,
        values: Any,
        option_string: str | None = None,
    ) -> None:
        steps = list(getattr(namespace, self.dest, None) or [])
        steps.append((self.const, values))
        setattr(namespace, self.dest, steps)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the ``closeloop call`` arguments to ``parser`` (see :func:`run_from_args`)."""
    parser.add_argument("--url", default=DEFAULT_URL, help="closeloop server base URL (default: %(default)s)")
    parser.add_argument(
        "--caller", default=DEFAULT_CALLER, help="the caller's number, From (default: %(default)s)"
    )
    parser.add_argument(
        "--called", default=DEFAULT_CALLED, help="the number called, To (default: %(default)s)"
    )
    steps = (
        ("--say", "say", "TEXT", "say TEXT (repeatable; all steps run in the order given)"),
        ("--wav", "wav", "FILE", "play a WAV file (repeatable)"),
        ("--dtmf", "dtmf", "DIGITS", "press keys, e.g. 1234# (repeatable)"),
        (
            "--script",
            "script",
            "FILE",
            "YAML list of steps: '- say: TEXT' | '- wav: FILE' | '- dtmf: DIGITS', "
            "each with optional barge_in_after_ms and pause_ms",
        ),
    )
    for flag, kind, metavar, text in steps:
        parser.add_argument(
            flag, dest="steps", action=_StepAction, const=kind, default=None, metavar=metavar, help=text
        )
    parser.add_argument(
        "--record",
        type=Path,
        default=None,
        metavar="OUT.wav",
        help="write the call as a stereo WAV (caller left, bot right)",
    )
    parser.add_argument(
        "--auth-token",
        default=None,
        help="sign the webhook and the stream upgrade with this Twilio auth token",
    )
    parser.add_argument(
        "--account-sid", default=DEFAULT_ACCOUNT_SID, help="AccountSid to send (default: %(default)s)"
    )
    parser.add_argument(
        "--max-seconds", type=float, default=120, help="hang up after this long (default: %(default)s)"
    )


def script_from_args(ns: argparse.Namespace) -> list[Utterance]:
    """The script given by --say/--wav/--dtmf/--script, in command-line order."""
    script: list[Utterance] = []
    for kind, value in getattr(ns, "steps", None) or []:
        if kind == "script":
            script += load_script(Path(value))
        elif kind == "wav":
            script.append(Utterance(wav=Path(value)))
        elif kind == "dtmf":
            script.append(Utterance(dtmf=value))
        else:
            script.append(Utterance(text=value))
    return script


def run_from_args(ns: argparse.Namespace) -> int:
    """Run ``closeloop call`` with arguments from :func:`add_arguments`; print the report.

    Returns:
        0 when the call went fine, 1 when it did not (violations, missing replies, setup
        errors), 2 when the server could not be reached.
    """
    try:
        script = script_from_args(ns)
    except (OSError, ValueError) as e:
        print(f"closeloop call: {e}", file=sys.stderr)
        return EXIT_FAILED
    try:
        report = asyncio.run(
            run_call(
                ns.url,
                script,
                caller=ns.caller,
                called=getattr(ns, "called", DEFAULT_CALLED),
                auth_token=ns.auth_token,
                account_sid=getattr(ns, "account_sid", DEFAULT_ACCOUNT_SID),
                record_path=ns.record,
                max_call_seconds=getattr(ns, "max_seconds", 120),
            )
        )
    except ServerUnreachable:
        print(f"cannot reach closeloop at {ns.url}; is `make run` running?", file=sys.stderr)
        return EXIT_UNREACHABLE
    except (CallSetupError, OSError, ValueError) as e:
        print(f"closeloop call: {e}", file=sys.stderr)
        return EXIT_FAILED
    print(report.format())
    return EXIT_OK if report.ok else EXIT_FAILED
