"""closeloop's composition root, one job per module.

- :mod:`app.settings`: every setting, read once from the environment.
- :mod:`app.metrics`: the Prometheus metrics of one process.
- :mod:`app.engines`, :mod:`app.texting`, :mod:`app.voice`: per-feature builders (settings and
  dependencies in, a service out).
- :mod:`app.container`: the typed :class:`~app.container.Services` and ``build_services``.
- :mod:`app.factory` and :mod:`app.routes`: the FastAPI app and the routers it mounts.
- :mod:`app.cli`: the ``closeloop`` command line.

Only this package (and ``server.py``, which re-exports it) reads the environment and picks
concrete adapters; everything below it gets what it needs through constructors.
"""

from __future__ import annotations

import os

# Before numpy loads anywhere in the process: halves the CPU of the speech and intent models here.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")
