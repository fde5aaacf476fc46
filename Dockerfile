# syntax=docker/dockerfile:1
# The gateway as a container: `docker build -t tiktok-events-gateway .`
# Runs `tiktok-gateway serve` on 0.0.0.0:8080 as an unprivileged user. Point
# GATEWAY_REDIS_URL at your Redis; without it the gateway starts its own
# embedded Redis in /data (fine for a trial, not for more than one replica).
# docs/deploying.md is the guide; tests/test_deploy.py checks this file.

ARG PYTHON_IMAGE=python:3.11-slim-bookworm

# -- build: install the package and its runtime dependencies into a venv --------
FROM ${PYTHON_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore
RUN python -m venv /opt/venv
WORKDIR /src
# Only what the wheel is built from (README.md is its long description); see .dockerignore.
COPY pyproject.toml README.md ./
COPY gateway ./gateway
# `.` without extras: the runtime dependencies only, never the dev tools.
# Their versions are the ranges in pyproject.toml (there is no lock file).
# pip compiles the bytecode here: the read-only runtime image never writes any.
RUN /opt/venv/bin/pip install --no-cache-dir . \
 && /opt/venv/bin/pip uninstall --yes pip setuptools

# -- runtime: the venv on the same slim Python, no compilers, no pip ------------
FROM ${PYTHON_IMAGE} AS runtime
RUN groupadd --system --gid 10001 gateway \
 && useradd --system --uid 10001 --gid gateway --home-dir /data --no-create-home \
        --shell /usr/sbin/nologin gateway \
 && install --directory --owner gateway --group gateway --mode 0700 /data
COPY --from=build /opt/venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    GATEWAY_LISTEN=0.0.0.0:8080 \
    GATEWAY_DATA_DIR=/data \
    GATEWAY_LOG_FORMAT=json
WORKDIR /data
USER 10001:10001
EXPOSE 8080
# SIGTERM starts the gateway's graceful drain (finish requests and in-flight
# batches, hand back the rest); give it GATEWAY_SHUTDOWN_TIMEOUT (30 s) plus a
# margin before the kill: `docker run --stop-timeout 45`, compose's
# stop_grace_period, Kubernetes' terminationGracePeriodSeconds.
STOPSIGNAL SIGTERM
# GET /readyz on GATEWAY_LISTEN with the gateway's own command: no curl in the image.
# Each check starts Python (~0.7 s of CPU), hence 30 s between checks.
HEALTHCHECK --interval=30s --timeout=5s --start-period=20s --retries=3 \
    CMD ["tiktok-gateway", "healthcheck"]
ENTRYPOINT ["tiktok-gateway"]
CMD ["serve"]
