"""Keypad digits (DTMF) of one call, collected into turns."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

#: What a lone ``0`` becomes: the caller asks for a person.
ZERO_TURN = "0 (keypad: talk to a person)"


class Keypad:
    """Collects digits until ``#`` or a pause of ``timeout_s``, then hands them over as one turn.

    A ``0`` pressed first is a turn on its own (talk to a person). Digits past ``max_digits``
    are dropped and reported, so a flood of DTMF frames cannot grow memory.

    Args:
        max_digits: most digits collected towards one turn.
        timeout_s: pause after the last digit that submits the digits.
        on_turn: called with the text of each finished keypad turn.
        on_dropped: called with ``"dtmf_digits"`` for each digit over ``max_digits``.
    """

    def __init__(
        self,
        *,
        max_digits: int,
        timeout_s: float,
        on_turn: Callable[[str], None],
        on_dropped: Callable[[str], None],
    ) -> None:
        self._max = max_digits
        self._timeout = timeout_s
        self._on_turn = on_turn
        self._on_dropped = on_dropped
        self._digits: list[str] = []
        self._timer: asyncio.TimerHandle | None = None

    @property
    def pending(self) -> int:
        """Digits collected towards the next turn."""
        return len(self._digits)

    def press(self, digit: str) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if digit == "#":
            self._submit()
            return
        if digit == "0" and not self._digits:
            self._on_turn(ZERO_TURN)
            return
        if len(self._digits) >= self._max:
            self._on_dropped("dtmf_digits")
        else:
            self._digits.append(digit)
        self._timer = asyncio.get_running_loop().call_later(self._timeout, self._submit)

    def close(self) -> None:
        """Forget the pending timer (the call ended)."""
        if self._timer is not None:
            self._timer.cancel()

    def _submit(self) -> None:
        self._timer = None
        digits, self._digits = "".join(self._digits), []
        if digits:
            self._on_turn(digits)
