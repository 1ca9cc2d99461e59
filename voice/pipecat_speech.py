"""Any pipecat speech service behind closeloop's speech interfaces: choosing it from settings and
running it in a pipeline of its own.

A :class:`ServiceSpec` is what the settings name: a class under ``pipecat.services.`` and its
keyword arguments as JSON, where a string ``"$NAME"`` stands for the environment variable
``NAME`` (API keys stay out of the settings text). It is checked once, at start-up, and builds a
fresh service instance for every pipeline.

A :class:`ServicePipeline` runs one service in ``Pipeline([service, collector])`` under pipecat's
own :class:`~pipecat.pipeline.worker.PipelineWorker` and
:class:`~pipecat.workers.runner.WorkerRunner`, using only pipecat's public API: frames go in with
``queue_frame``, what the service pushes downstream reaches a collector processor owned here, and
its errors arrive through the worker's ``on_pipeline_error`` event. The adapters on top are
:class:`voice.pipecat_tts.PipecatSynthesizer` and :class:`voice.pipecat_stt.PipecatTranscriber`.
"""

from __future__ import annotations

import asyncio
import importlib
import json
import logging
import re
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from pipecat.frames.frames import ErrorFrame, Frame, StartFrame
from pipecat.pipeline.pipeline import Pipeline
from pipecat.pipeline.worker import PipelineParams, PipelineWorker
from pipecat.processors.frame_processor import FrameDirection, FrameProcessor
from pipecat.workers.runner import WorkerRunner

with warnings.catch_warnings():
    # pipecat 1.14's tts_service defines its own deprecated AudioContextWordTTSService at import
    # time, which warns; that is pipecat's business, not a use of a deprecated API by closeloop.
    warnings.filterwarnings("ignore", category=DeprecationWarning, module="typing_extensions")
    warnings.filterwarnings(
        "ignore", message=".*AudioContextTTSService.* is deprecated", category=DeprecationWarning
    )
    from pipecat.services.stt_service import STTService
    from pipecat.services.tts_service import TTSService

log = logging.getLogger(__name__)

#: Only classes under this package may be named in settings.
ALLOWED_PREFIX = "pipecat.services."
_IDENTIFIER = re.compile(r"[A-Za-z][A-Za-z0-9_]*")
_ENV_REFERENCE = re.compile(r"\$([A-Za-z_][A-Za-z0-9_]*)")


__all__ = [
    "ALLOWED_PREFIX",
    "PipecatServiceError",
    "STTService",
    "ServicePipeline",
    "ServiceSettingsError",
    "ServiceSpec",
    "TTSService",
    "service_from_settings",
]


class ServiceSettingsError(ValueError):
    """The settings name a service that cannot be used; the message says what to fix."""


class PipecatServiceError(RuntimeError):
    """A pipecat service failed (could not start, reported an error, or did not answer in time).

    Attributes:
        reason: A short code for logs and metrics (``start_failed``, ``error``, ``timeout``...).
    """

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True)
class ServiceSpec:
    """A pipecat service class and its keyword arguments, with secrets kept out of sight.

    Build it with :meth:`from_settings`; :meth:`build` makes a new service instance each time.
    """

    service_class: type[FrameProcessor]
    params: Mapping[str, Any] = field(repr=False)
    secrets: tuple[str, ...] = field(default=(), repr=False)

    @property
    def name(self) -> str:
        return self.service_class.__name__

    @classmethod
    def from_settings(
        cls,
        class_path: str,
        params_json: str = "",
        *,
        base: type[FrameProcessor] = FrameProcessor,
        environ: Mapping[str, str] | None = None,
    ) -> ServiceSpec:
        """Check ``class_path`` and ``params_json`` and resolve ``"$NAME"`` strings from ``environ``.

        Args:
            class_path: ``pipecat.services.<module>.<Class>``, e.g.
                ``pipecat.services.cartesia.tts.CartesiaTTSService``.
            params_json: A JSON object of keyword arguments (empty: none). A ``"settings"`` object
                becomes ``<Class>.Settings(**object)``, pipecat's way of passing model and voice.
            base: The class the service must be (``STTService`` or ``TTSService``).
            environ: Where ``"$NAME"`` values come from (the app passes the process environment;
                none: no ``"$NAME"`` resolves).

        Raises:
            ServiceSettingsError: the path is outside ``pipecat.services.``, cannot be imported,
                is not a ``base``; the JSON is not an object; a referenced variable is unset.
        """
        service_class = _import_service_class(class_path, base)
        try:
            raw = json.loads(params_json) if params_json.strip() else {}
        except ValueError as e:
            raise ServiceSettingsError(f"the parameters of {class_path} are not valid JSON: {e}") from None
        if not isinstance(raw, dict):
            raise ServiceSettingsError(f"the parameters of {class_path} must be a JSON object")
        secrets: list[str] = []
        params = _resolve_environment(raw, {} if environ is None else environ, secrets)
        return cls(service_class, params, tuple(s for s in secrets if s))

    def build(self) -> FrameProcessor:
        """A new instance of the service.

        Raises:
            ServiceSettingsError: the class refused the parameters (message without secrets).
        """
        kwargs = dict(self.params)
        settings = kwargs.get("settings")
        settings_class = getattr(self.service_class, "Settings", None)
        try:
            if isinstance(settings, dict) and settings_class is not None:
                kwargs["settings"] = settings_class(**settings)
            return self.service_class(**kwargs)
        except Exception as e:
            raise ServiceSettingsError(
                f"{self.name} refused its parameters: {self.mask(f'{type(e).__name__}: {e}')}"
            ) from None

    def checked(self) -> ServiceSpec:
        """This spec, once the class accepted its parameters (build one instance and drop it), so
        a bad parameter stops the start-up instead of the first call.

        Raises:
            ServiceSettingsError: the class refused the parameters.
        """
        self.build()
        return self

    def mask(self, text: str) -> str:
        """``text`` with every secret value taken from the environment replaced by ``***``."""
        for secret in self.secrets:
            text = text.replace(secret, "***")
        return text


def service_from_settings(
    class_path: str,
    params_json: str = "",
    *,
    base: type[FrameProcessor] = FrameProcessor,
    environ: Mapping[str, str] | None = None,
) -> FrameProcessor:
    """A pipecat service named by settings (see :meth:`ServiceSpec.from_settings`)."""
    return ServiceSpec.from_settings(class_path, params_json, base=base, environ=environ).build()


def _import_service_class(class_path: str, base: type[FrameProcessor]) -> type[FrameProcessor]:
    path = class_path.strip()
    if not path.startswith(ALLOWED_PREFIX):
        raise ServiceSettingsError(
            f"{path!r} is not a pipecat service: the class path must start with {ALLOWED_PREFIX!r}, "
            "e.g. 'pipecat.services.deepgram.stt.DeepgramSTTService'"
        )
    module_name, _, class_name = path.rpartition(".")
    parts = path.split(".")
    if len(parts) < 4 or not all(_IDENTIFIER.fullmatch(p) for p in parts):
        raise ServiceSettingsError(
            f"{path!r} is not a class path: write pipecat.services.<module>.<Class> "
            "(dotted names, none starting with an underscore)"
        )
    try:
        with warnings.catch_warnings():
            # A vendor module's import-time deprecation notices are pipecat's, not the caller's.
            warnings.simplefilter("ignore", DeprecationWarning)
            module = importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        hint = (
            f"; install its extra, e.g. pip install 'pipecat-ai[{parts[2]}]'" if e.name != module_name else ""
        )
        raise ServiceSettingsError(f"cannot import {module_name} ({e.name} is missing){hint}") from None
    except ImportError as e:
        raise ServiceSettingsError(
            f"cannot import {module_name}: {e}; install its extra, e.g. pip install 'pipecat-ai[{parts[2]}]'"
        ) from None
    service_class = getattr(module, class_name, None)
    if service_class is None:
        raise ServiceSettingsError(f"{module_name} has no {class_name}")
    if not isinstance(service_class, type) or not issubclass(service_class, base):
        raise ServiceSettingsError(f"{path} is not a subclass of {base.__name__}")
    return service_class


def _resolve_environment(value: Any, environ: Mapping[str, str], secrets: list[str]) -> Any:
    """``value`` with every ``"$NAME"`` string replaced by ``environ[NAME]`` (noted in ``secrets``)."""
    if isinstance(value, dict):
        return {k: _resolve_environment(v, environ, secrets) for k, v in value.items()}
    if isinstance(value, list):
        return [_resolve_environment(v, environ, secrets) for v in value]
    if isinstance(value, str) and (match := _ENV_REFERENCE.fullmatch(value)):
        name = match.group(1)
        if name not in environ:
            raise ServiceSettingsError(
                f"the environment variable {name} (named in the parameters) is not set"
            )
        secrets.append(environ[name])
        return environ[name]
    return value


class _Collector(FrameProcessor):
    """The last processor of a :class:`ServicePipeline`: hands every downstream frame to ``on_frame``."""

    def __init__(self, on_frame: Callable[[Frame], None], name: str) -> None:
        super().__init__(name=name)
        self._on_frame = on_frame

    async def process_frame(self, frame: Frame, direction: FrameDirection) -> None:
        await super().process_frame(frame, direction)
        if direction == FrameDirection.DOWNSTREAM and not isinstance(frame, StartFrame):
            self._on_frame(frame)
        await self.push_frame(frame, direction)


class ServicePipeline:
    """One pipecat service running in a pipeline of its own.

    Args:
        service: The service (a fresh instance: a processor belongs to one pipeline).
        on_frame: Called with every frame the service pushes downstream, and with every
            :class:`~pipecat.frames.frames.ErrorFrame` it reports.
        name: For logs and task names.
        audio_in_rate: The pipeline's input sample rate (services default to it).
        audio_out_rate: The pipeline's output sample rate (TTS services default to it).
        start_timeout_s: Longest wait for the service to connect and start.
    """

    def __init__(
        self,
        service: FrameProcessor,
        on_frame: Callable[[Frame], None],
        *,
        name: str,
        audio_in_rate: int = 16000,
        audio_out_rate: int = 24000,
        start_timeout_s: float = 10.0,
    ) -> None:
        self.service = service
        self.name = name
        self._on_frame = on_frame
        self._params = PipelineParams(
            audio_in_sample_rate=audio_in_rate, audio_out_sample_rate=audio_out_rate
        )
        self._start_timeout_s = start_timeout_s
        self._worker: PipelineWorker | None = None
        self._task: asyncio.Task[None] | None = None
        self._started = asyncio.Event()

    @property
    def running(self) -> bool:
        return self._started.is_set() and self._task is not None and not self._task.done()

    async def start(self) -> None:
        """Start the pipeline and wait until the service started.

        Raises:
            PipecatServiceError: it did not start within ``start_timeout_s`` or ended at once.
        """
        if self._task is not None:
            return
        worker = PipelineWorker(
            Pipeline([self.service, _Collector(self._on_frame, name=f"{self.name}-collector")]),
            params=self._params,
            enable_rtvi=False,
            enable_turn_tracking=False,
            idle_timeout_secs=None,
            setup_timeout_secs=self._start_timeout_s,
            start_timeout_secs=self._start_timeout_s,
            cancel_timeout_secs=2.0,
            name=self.name,
        )
        worker.add_event_handler("on_pipeline_started", self._on_started)
        worker.add_event_handler("on_pipeline_error", self._on_error)
        runner = WorkerRunner(name=f"{self.name}-runner", handle_sigint=False, handle_sigterm=False)
        await runner.add_workers(worker)
        self._worker = worker
        self._task = asyncio.create_task(runner.run(), name=f"{self.name}-pipeline")
        started = asyncio.create_task(self._started.wait(), name=f"{self.name}-started")
        try:
            await asyncio.wait(
                {started, self._task}, timeout=self._start_timeout_s + 1.0, return_when="FIRST_COMPLETED"
            )
        finally:
            started.cancel()
        if not self._started.is_set():
            await self.aclose()
            raise PipecatServiceError("start_failed", f"{type(self.service).__name__} did not start")

    async def _on_started(self, worker: PipelineWorker, frame: Frame) -> None:
        self._started.set()

    async def _on_error(self, worker: PipelineWorker, frame: ErrorFrame) -> None:
        self._on_frame(frame)

    async def send(self, frame: Frame) -> None:
        """Queue ``frame`` at the start of the pipeline (in order with earlier frames)."""
        if self._worker is None or not self.running:
            raise PipecatServiceError("closed", f"the {type(self.service).__name__} pipeline is not running")
        await self._worker.queue_frame(frame)

    async def aclose(self) -> None:
        """Cancel the pipeline (the service disconnects) and wait, bounded, for it to finish."""
        worker, task = self._worker, self._task
        if worker is None or task is None:
            return
        if not task.done():
            try:
                await worker.cancel(reason="closed")
            except Exception:
                log.debug(
                    "cancelling a pipecat pipeline failed", extra={"pipeline": self.name}, exc_info=True
                )
            done, _ = await asyncio.wait({task}, timeout=3.0)
            if not done:
                task.cancel()
        try:
            await task
        except (asyncio.CancelledError, Exception):
            pass
