# A GPU worker: the official PyTorch CUDA runtime image brings CUDA, cuDNN and a CUDA
# build of torch; the project is installed on top without replacing that torch.
#
#   docker build -f docker/worker.Dockerfile -t omnet-worker .
#   docker run --gpus 1 -e OMNET_BROKER_URL=redis://... -v omnet-data:/data omnet-worker
ARG BASE_IMAGE=pytorch/pytorch:2.6.0-cuda12.4-cudnn9-runtime
FROM ${BASE_IMAGE}

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /src
COPY pyproject.toml README.md ./
COPY model ./model
COPY service ./service
COPY worker ./worker
# Pin the image's torch as a constraint: pip keeps it (it satisfies torch>=2.1,<3), and
# fails instead of downloading another torch if it ever would not.
RUN python -c "import importlib.metadata as m; print('torch==' + m.version('torch'))" \
        > /tmp/torch-constraint.txt \
    && pip install --constraint /tmp/torch-constraint.txt ".[postgres]" \
    && rm -rf /src/build /tmp/torch-constraint.txt

# Same uid as in api.Dockerfile, so both can write the shared /data volume.
RUN useradd --uid 10001 --user-group --create-home --shell /usr/sbin/nologin omnet \
    && mkdir -p /data && chown omnet:omnet /data
USER omnet
WORKDIR /home/omnet
ENV OMNET_STORAGE_DIR=/data

# The prefork pool keeps the main process free to answer pings while a job runs.
HEALTHCHECK --interval=60s --timeout=20s --start-period=120s --retries=3 \
    CMD python -m worker.healthcheck || exit 1
CMD ["omnet", "worker", "--device", "cuda", "--pool", "prefork", "--concurrency", "1"]
