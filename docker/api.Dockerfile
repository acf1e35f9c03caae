# The HTTP API (also usable as a CPU worker: `omnet worker --device cpu`).
#
#   docker build -f docker/api.Dockerfile -t omnet-api .
#   docker run -p 8000:8000 -e OMNET_BROKER_URL=redis://... -e OMNET_API_KEYS=... \
#       -v omnet-data:/data omnet-api
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# The CPU build of torch first, so that the project's torch range is already satisfied
# and `pip install .` does not pull the CUDA build from PyPI.
RUN pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu

WORKDIR /src
COPY pyproject.toml README.md ./
COPY model ./model
COPY service ./service
COPY worker ./worker
RUN pip install ".[postgres]" && rm -rf /src/build

# Same uid as in worker.Dockerfile, so both can write the shared /data volume.
RUN useradd --uid 10001 --user-group --create-home --shell /usr/sbin/nologin omnet \
    && mkdir -p /data && chown omnet:omnet /data
USER omnet
WORKDIR /home/omnet
ENV OMNET_STORAGE_DIR=/data

EXPOSE 8000
HEALTHCHECK --interval=30s --timeout=5s --start-period=20s --retries=3 \
    CMD ["python", "-c", "import sys, urllib.request; sys.exit(urllib.request.urlopen('http://127.0.0.1:8000/healthz', timeout=4).status != 200)"]
CMD ["omnet", "serve", "--no-worker", "--host", "0.0.0.0", "--port", "8000"]
