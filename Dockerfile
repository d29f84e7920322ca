# One image for every role; its entrypoint is the `trainer` command line:
#   serve (the default), worker, migrate, health, and every client command.
#
#   docker build -t trainer:cpu .                              # TensorFlow for the CPU
#   docker build -t trainer:gpu --build-arg VARIANT=gpu .      # TensorFlow with CUDA wheels
#   docker build --build-arg FASHION_MNIST=0 .                 # without Debian's Fashion-MNIST
#
# The GPU variant needs the NVIDIA Container Toolkit on the host (`docker run --gpus all`);
# its CUDA libraries come from pip wheels, so both variants share one small base.
# deploy/compose.yaml runs the whole scale-out stack from this image; scripts/test-image
# builds and runs it (on a base made locally, where no registry can be reached).
#
# No `# syntax=` line: the builder's own Dockerfile frontend is enough, and it needs no pull.

# The base, pinned by digest so that a rebuild gets the same bytes. To move it to a newer
# release: docker buildx imagetools inspect python:3.11-slim-bookworm, and take its digest.
# Any Debian bookworm image whose `python` is Python 3.11 with venv works (--build-arg BASE=).
ARG BASE=python:3.11-slim-bookworm@sha256:a36c24f9cbdf4fd0f52d67f0823eeac19c2028c637cecc392d97f980d4fec56b

# ---------------------------------------------------------------------------------------------
# builder: a virtual environment in /opt/venv with the project installed (not editable).
# Every dependency ships wheels, so no compiler or -dev package is needed here.
FROM ${BASE} AS builder

# cpu: the `service` and `s3` extras. gpu: the same plus `gpu` (TensorFlow with CUDA wheels).
ARG VARIANT=cpu

ENV PYTHONDONTWRITEBYTECODE=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PATH=/opt/venv/bin:$PATH

SHELL ["/bin/bash", "-o", "pipefail", "-c"]

RUN python -m venv /opt/venv

WORKDIR /src

# Dependencies first, read from pyproject.toml alone, so a change to the code does not
# download TensorFlow again. An extra that pyproject.toml lacks fails the build here.
COPY pyproject.toml README.md ./
RUN case "$VARIANT" in \
      cpu) extras="service,s3" ;; \
      gpu) extras="service,s3,gpu" ;; \
      *) echo "VARIANT must be cpu or gpu, not '$VARIANT'" >&2; exit 1 ;; \
    esac \
 && python -c 'import sys, tomllib; \
p = tomllib.load(open("pyproject.toml", "rb"))["project"]; \
extras = p.get("optional-dependencies", {}); \
missing = [e for e in sys.argv[1].split(",") if e not in extras]; \
sys.exit(f"pyproject.toml has no extra {missing}") if missing else None; \
print("\n".join(p["dependencies"] + [d for e in sys.argv[1].split(",") for d in extras[e]]))' \
      "$extras" > /tmp/requirements.txt \
 && pip install --no-cache-dir -r /tmp/requirements.txt

# Then the project itself, as a regular (non-editable) install, checked on this same base:
# consistent requirements, the console script, TensorFlow's shared libraries loading.
# TensorFlow's C++ headers (430 MB, only for compiling custom ops) stay behind.
COPY client ./client
COPY service ./service
RUN pip install --no-cache-dir --no-deps . \
 && pip check \
 && trainer --help > /dev/null \
 && python -c "import tensorflow, stepstream_service.runtime.server" \
 && rm -rf /opt/venv/lib/python3.11/site-packages/tensorflow/include

# ---------------------------------------------------------------------------------------------
# datasets: Debian's Fashion-MNIST (30 MB in /usr/share/datasets/fashion-mnist), where the
# service looks before any download. FASHION_MNIST=0 leaves it out.
FROM ${BASE} AS datasets

ARG FASHION_MNIST=1

RUN mkdir -p /usr/share/datasets \
 && if [ "$FASHION_MNIST" = 1 ]; then \
      apt-get update \
      && apt-get install -y --no-install-recommends \
           dataset-fashion-mnist=0.0~git20200523.55506a9-1 \
      && rm -rf /var/lib/apt/lists/*; \
    fi

# ---------------------------------------------------------------------------------------------
# The image: the base, the virtual environment, the datasets. No apt here.
FROM ${BASE}

ARG BASE
ARG VARIANT=cpu
# Given by whoever builds (scripts/test-image passes the checkout's): what code this is.
ARG VERSION=unknown
ARG REVISION=unknown
ARG SOURCE=unknown
ARG CREATED=unknown

LABEL org.opencontainers.image.title="trainer" \
      org.opencontainers.image.description="gRPC model-training service (TensorFlow/Keras)" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}" \
      org.opencontainers.image.source="${SOURCE}" \
      org.opencontainers.image.created="${CREATED}" \
      org.opencontainers.image.base.name="${BASE}" \
      io.trainer.variant="${VARIANT}"

# The server and the workers listen on every interface of the container (gRPC, metrics);
# jobs, the SQLite store (when no TRAINER_STORE is given) and artifacts live under /data.
# Listening beyond loopback needs authentication (TRAINER_TOKENS_FILE or TRAINER_TLS_CLIENT_CA)
# or TRAINER_INSECURE=1 said out loud: without either the server refuses to start.
# TRAINER_SERVE_FILE is where the server writes the address it listens on, for the health check.
ENV PATH=/opt/venv/bin:$PATH \
    VIRTUAL_ENV=/opt/venv \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    TF_CPP_MIN_LOG_LEVEL=2 \
    TRAINER_VARIANT=${VARIANT} \
    TRAINER_HOST=0.0.0.0 \
    TRAINER_DATA_DIR=/data \
    TRAINER_SERVE_FILE=/tmp/trainer-serve.json

# A fixed non-root user. /data/artifacts exists in the image, owned by that user, so a fresh
# named volume mounted there (compose's shared artifacts) starts with the same owner.
RUN groupadd --system --gid 10001 trainer \
 && useradd --system --uid 10001 --gid trainer --create-home --home-dir /home/trainer \
      --shell /usr/sbin/nologin trainer \
 && mkdir -p /data/artifacts \
 && chown -R trainer:trainer /data

COPY --from=datasets /usr/share/datasets /usr/share/datasets
COPY --from=builder /opt/venv /opt/venv

USER 10001:10001
WORKDIR /data
VOLUME ["/data"]

# gRPC API, Prometheus metrics of the server (a worker's, when asked for, on 9465).
EXPOSE 50051 9464

# For the server (the default command); compose overrides it for workers and migrations.
# It asks the server at the port it was given, from the container's own address: a server
# that only loopback reaches is not healthy, since nothing outside the container reaches it.
HEALTHCHECK --interval=30s --timeout=10s --start-period=60s --retries=3 \
    CMD ["trainer", "health", "--serve-file", "/tmp/trainer-serve.json"]

ENTRYPOINT ["trainer"]
CMD ["serve", "--host", "0.0.0.0"]
