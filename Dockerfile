# syntax=docker/dockerfile:1
# Two images from one file:
#   gateway: the Flask gateway under gunicorn (talks gRPC to TF Serving; no TensorFlow installed)
#   trainer: the training jobs on TensorFlow's GPU image, writing versions into /models
# One TensorFlow version everywhere: this ARG, pyproject.toml/constraints.txt and the
# tensorflow/serving image in docker-compose.yml, so every export loads in the server that serves it.
ARG TF_VERSION=2.19.0
ARG PYTHON_IMAGE=python:3.11.11-slim-bookworm
ARG TRAINER_IMAGE=tensorflow/tensorflow:${TF_VERSION}-gpu

FROM ${PYTHON_IMAGE} AS gateway
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /app
COPY pyproject.toml constraints.txt README.md ./
COPY training ./training
COPY serving ./serving
COPY client ./client
# The gateway's own dependencies only: no TensorFlow (it calls TF Serving over gRPC).
RUN pip install -c constraints.txt . \
    && useradd --uid 10001 --no-create-home --shell /usr/sbin/nologin scribe
USER 10001
ENV SCRIBE_HOST=0.0.0.0 PORT=8080 SCRIBE_MODEL_SERVER=tfserving:8500 \
    SCRIBE_MODEL_CONFIG=/app/serving/models.config SCRIBE_WORKERS=2 SCRIBE_THREADS=16
EXPOSE 8080
HEALTHCHECK --interval=10s --timeout=3s --start-period=30s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8080/healthz', timeout=2)"]
CMD ["python", "-m", "serving"]

FROM ${TRAINER_IMAGE} AS trainer
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 \
    SCRIBE_MODEL_DIR=/models SCRIBE_CACHE_DIR=/runs/.cache
WORKDIR /app
COPY pyproject.toml constraints.txt README.md ./
COPY training ./training
COPY serving ./serving
COPY client ./client
# /models and /runs are owned by the training user, so fresh named volumes mounted there are too.
RUN pip install -c constraints.txt ".[tensorflow]" \
    && useradd --uid 10001 --no-create-home --shell /usr/sbin/nologin scribe \
    && mkdir -p /models /runs && chown 10001 /models /runs
USER 10001
ENTRYPOINT ["python", "-m", "training"]
CMD ["missing", "--profile", "gpu", "--model-base", "/models", "--runs-dir", "/runs"]
