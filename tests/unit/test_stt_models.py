"""CLOSELOOP_STT_MODEL chooses the bundled Whisper model; a model split over packages is joined once.

The models themselves on speech: tests/integration/test_bundled_whisper_models.py.
"""

from __future__ import annotations

import typing
from pathlib import Path

import numpy as np
import pytest
from pydantic import ValidationError

from app.settings import Settings
from app.voice import build_speech
from voice.speech_stack import SpeechStack, TranscriberAdapter
from voice.stt import (
    BUNDLED_MODELS,
    DEFAULT_PROMPT,
    STTUnavailable,
    Transcript,
    WhisperSTT,
    _looks_like_a_loop,
    bundled_model_path,
    joined_model_folder,
    shared_whisper,
)


def test_the_setting_names_a_bundled_model_and_defaults_to_tiny_en(monkeypatch: pytest.MonkeyPatch) -> None:
    assert typing.get_args(Settings.model_fields["stt_model"].annotation) == tuple(BUNDLED_MODELS)
    monkeypatch.delenv("CLOSELOOP_STT_MODEL", raising=False)
    assert Settings(_env_file=None).stt_model == "tiny.en"
    monkeypatch.setenv("CLOSELOOP_STT_MODEL", "base")
    settings = Settings(_env_file=None)
    assert settings.stt_model == "base"
    assert build_speech(settings)._whisper_model == "base"


class PromptedWhisper:
    """Stands in for WhisperSTT: records the prompt of each transcription."""

    def __init__(self) -> None:
        self.prompts: list[str | None] = []

    async def transcribe(self, pcm16_16k: object, *, prompt: str | None = None) -> Transcript:
        self.prompts.append(prompt)
        return Transcript(text="where is my order", seconds=1.0)


@pytest.mark.parametrize(
    ("value", "prompt"),
    [(None, DEFAULT_PROMPT), ("Acme blender, Zephyr lamp", "Acme blender, Zephyr lamp"), ("", None)],
)
async def test_calls_prime_whisper_with_the_vocabulary_prompt_setting(
    monkeypatch: pytest.MonkeyPatch, value: str | None, prompt: str | None
) -> None:
    if value is None:
        monkeypatch.delenv("CLOSELOOP_STT_PROMPT", raising=False)
    else:
        monkeypatch.setenv("CLOSELOOP_STT_PROMPT", value)
    stack = build_speech(Settings(_env_file=None))
    whisper = PromptedWhisper()
    adapter = TranscriberAdapter(whisper, stack.stt_prompt)  # type: ignore[arg-type]
    assert await adapter.transcribe(np.zeros(16000, dtype=np.int16)) == "where is my order"
    assert whisper.prompts == [prompt]


def test_an_unknown_model_is_refused_with_the_names_there_are(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CLOSELOOP_STT_MODEL", "large-v9")
    with pytest.raises(ValidationError) as settings_error:
        Settings(_env_file=None)
    assert "CLOSELOOP_STT_MODEL" in str(settings_error.value) or "stt_model" in str(settings_error.value)
    assert "'tiny.en'" in str(settings_error.value) and "'base'" in str(settings_error.value)
    for build in (
        lambda: WhisperSTT(model="large-v9"),
        lambda: shared_whisper(model="large-v9"),
        lambda: SpeechStack(whisper_model="large-v9"),
        lambda: bundled_model_path("large-v9"),
    ):
        with pytest.raises(
            ValueError, match=r"unknown Whisper model 'large-v9': choose one of tiny.en, base"
        ):
            build()


def test_a_model_folder_wins_over_the_model_name(tmp_path: Path) -> None:
    stt = WhisperSTT(tmp_path, model="anything")
    assert stt.model_path == tmp_path
    stt.close()


def test_parts_are_joined_in_order_beside_the_other_files_and_only_once(tmp_path: Path) -> None:
    folder, other = tmp_path / "part1", tmp_path / "part2"
    folder.mkdir()
    other.mkdir()
    (folder / "config.json").write_text("{}")
    (folder / "tokenizer.json").write_text('{"t": 1}')
    (folder / "model.bin.part1").write_bytes(b"A" * 3000)
    (other / "model.bin.part2").write_bytes(b"B" * 5)
    parts = [folder / "model.bin.part1", other / "model.bin.part2"]

    joined = joined_model_folder("test", folder, parts, tmp_path / "cache")

    assert (joined / "model.bin").read_bytes() == b"A" * 3000 + b"B" * 5
    assert (joined / "config.json").read_text() == "{}"
    assert (joined / "tokenizer.json").read_text() == '{"t": 1}'
    assert sorted(p.name for p in joined.iterdir()) == ["config.json", "model.bin", "tokenizer.json"]
    (joined / "model.bin").write_bytes(b"kept")
    assert joined_model_folder("test", folder, parts, tmp_path / "cache") == joined
    assert (joined / "model.bin").read_bytes() == b"kept"  # made once, not rewritten


def test_a_missing_part_is_an_error_that_retrying_cannot_fix(tmp_path: Path) -> None:
    (tmp_path / "model.bin.part1").write_bytes(b"A")
    with pytest.raises(STTUnavailable) as error:
        joined_model_folder(
            "test", tmp_path, [tmp_path / "model.bin.part1", tmp_path / "gone"], tmp_path / "c"
        )
    assert error.value.retryable is False
    assert "test" in str(error.value)


def test_a_loop_on_letters_without_spaces_counts_as_a_loop() -> None:
    # Whisper base heard "Sorry, could you repeat that" (2.7 s of espeak-ng on a phone line) so.
    assert _looks_like_a_loop("R.E.C.M.U.R.E.C.U.R.E.C.U.R.E.C.U.R.E.C.U.R.E.C.U.R.E.C.U.R.E.C.U.R.E.C.", 2.7)
    assert not _looks_like_a_loop("My number is 5 5 5 5 5 5 0 1 9 2", 4.0)
    assert not _looks_like_a_loop("no no no no", 1.5)
