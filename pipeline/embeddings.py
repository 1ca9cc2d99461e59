"""Sentence embeddings as the core needs them: the :class:`SentenceEncoder` interface.

The production encoder, all-MiniLM-L6-v2 run by onnxruntime, is a vendor adapter:
:class:`adapters.minilm_encoder.MiniLMEncoder`. The intent engine
(:mod:`pipeline.intent_engine`) needs only ``encode``; the batching and cache methods make it
faster when an encoder has them.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import numpy as np


class EncoderUnavailable(RuntimeError):
    """The model or tokenizer files are not installed; the message says what to install."""


class SentenceEncoder(Protocol):
    """Sentence embeddings: unit-length float32 rows, one per text.

    Implementations are safe to share between threads.
    """

    @property
    def dimensions(self) -> int:
        """The length of every vector."""
        ...

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        """``[len(texts), dimensions]`` float32, each row L2-normalised."""
        ...

    def encode_batch(self, texts: Sequence[str]) -> np.ndarray:
        """Like :meth:`encode` in one model run, remembering each text in the cache."""
        ...

    def encode_one(self, text: str) -> np.ndarray:
        """One text through the cache: a read-only ``[dimensions]`` vector."""
        ...

    def is_cached(self, text: str) -> bool:
        """Whether :meth:`encode_one` would answer ``text`` without running the model."""
        ...
