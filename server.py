"""closeloop's entry point: the ``closeloop`` command (``main``) and the names other code imports.

The composition root lives in the :mod:`app` package, one job per module: settings
(:mod:`app.settings`), metrics (:mod:`app.metrics`), the turn engines (:mod:`app.engines`), the
typed service container (:mod:`app.container`), the FastAPI app and its routes
(:mod:`app.factory`, :mod:`app.routes`, :mod:`app.voice`) and the CLI (:mod:`app.cli`).
"""

from __future__ import annotations

import sys

from app.cli import build_parser, main
from app.container import Services, build_redactor, build_services
from app.database import open_database
from app.engines import build_classifier, build_llm_engine, build_mood, shared_encoder
from app.factory import create_app
from app.metrics import Metrics
from app.settings import ROOT, Settings

__all__ = [
    "ROOT",
    "Metrics",
    "Services",
    "Settings",
    "build_classifier",
    "build_llm_engine",
    "build_mood",
    "build_parser",
    "build_redactor",
    "build_services",
    "create_app",
    "main",
    "open_database",
    "shared_encoder",
]

if __name__ == "__main__":
    sys.exit(main())
