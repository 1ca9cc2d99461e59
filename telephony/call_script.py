"""The caller's script of a simulated call: what to say, play or press, and in which order."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from telephony.twilio_protocol import (
    DTMF_DIGITS,
)


@dataclass(frozen=True)
class Utterance:
    """One step of the caller's script: speak ``text``, play ``wav``, or press ``dtmf`` keys.

    Attributes:
        text: words to speak (rendered with espeak-ng).
        wav: a WAV file to play (any rate, mono or stereo, integer PCM).
        dtmf: keys to press instead of speaking, e.g. ``"1234#"``.
        dtmf_from: keys to press, asked for when this step comes (a one-time code the caller
            reads on their phone once the bot has texted it).
        barge_in_after_ms: speak while the bot is still talking, this many ms after the bot's
            audio (the reply to the previous step, or the greeting) started playing.
        pause_ms: otherwise, wait this long after the bot's audio finished before speaking.
    """

    text: str | None = None
    wav: Path | None = None
    dtmf: str | None = None
    barge_in_after_ms: int | None = None
    pause_ms: int = 600
    dtmf_from: Callable[[], Awaitable[str]] | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        given = [name for name in ("text", "wav", "dtmf", "dtmf_from") if getattr(self, name) is not None]
        if len(given) != 1:
            raise ValueError(
                f"an utterance needs exactly one of text, wav, dtmf, dtmf_from; got {given or 'none'}"
            )
        if self.text is not None and not self.text.strip():
            raise ValueError("utterance text is blank")
        if self.dtmf is not None and (not self.dtmf or set(self.dtmf) - DTMF_DIGITS):
            raise ValueError(f"dtmf must be keys from 0-9 * #, got {self.dtmf!r}")
        if self.barge_in_after_ms is not None and self.barge_in_after_ms < 0:
            raise ValueError("barge_in_after_ms must be >= 0")
        if self.pause_ms < 0:
            raise ValueError("pause_ms must be >= 0")

    @property
    def label(self) -> str:
        """What the caller did, for reports: the text, ``[dtmf 12#]`` or ``[wav name.wav]``."""
        if self.text is not None:
            return self.text
        if self.dtmf is not None:
            return f"[dtmf {self.dtmf}]"
        if self.dtmf_from is not None:
            return "[dtmf from the phone]"
        return f"[wav {Path(self.wav or '').name}]"


def load_script(path: Path) -> list[Utterance]:
    """Read a YAML script: a list of ``{say|wav|dtmf: ..., barge_in_after_ms?, pause_ms?}``.

    A bare string is a ``say``. WAV paths are relative to the script's folder.

    Raises:
        ValueError: the file is not such a list. OSError: it cannot be read.
    """
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        raise ValueError(f"{path} is not valid YAML: {e}") from None
    if not isinstance(data, list):
        raise ValueError(f"{path}: expected a YAML list of steps like '- say: hello'")
    script = []
    for number, item in enumerate(data, start=1):
        step = {"say": item} if isinstance(item, str) else item
        if not isinstance(step, dict):
            raise ValueError(f"{path} step {number}: expected a mapping like 'say: hello'")
        unknown = set(step) - {"say", "wav", "dtmf", "barge_in_after_ms", "pause_ms"}
        if unknown:
            raise ValueError(f"{path} step {number}: unknown keys {sorted(unknown)}")
        try:
            script.append(
                Utterance(
                    text=None if step.get("say") is None else str(step["say"]),
                    wav=None if step.get("wav") is None else path.parent / str(step["wav"]),
                    dtmf=None if step.get("dtmf") is None else str(step["dtmf"]),
                    barge_in_after_ms=step.get("barge_in_after_ms"),
                    pause_ms=step.get("pause_ms", 600),
                )
            )
        except (TypeError, ValueError) as e:
            raise ValueError(f"{path} step {number}: {e}") from None
    return script
