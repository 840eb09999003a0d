# syntax=docker/dockerfile:1
#
# Faultline container image.
#
#   docker build -t faultline:0.1.0 .
#   docker run --rm -p 8080:8080 -p 9901:9901 faultline:0.1.0 \
#       serve --upstream http://host.docker.internal:3000
#
# Two stages: the first builds the faultline wheel, with its per-exchange
# modules compiled by mypyc (FAULTLINE_COMPILE=1, see setup.py), and installs
# it (with its runtime dependencies, all of which ship binary wheels) into a
# virtual environment at /opt/faultline; the second copies only that
# environment onto a clean slim base. No compiler, no source tree, no wheel
# cache in the result.
#
# The runtime writes nothing to its file system, so the image runs with a
# read-only root file system (Kubernetes: readOnlyRootFilesystem: true) as the
# numeric non-root user 10001.
#
# tests/test_deploy.py replays the build-stage RUN commands below (wheel,
# venv, install) outside Docker and checks that they still match this file:
# change both together.

ARG PYTHON_IMAGE=python:3.12-slim-bookworm

# --------------------------------------------------------------------------
FROM ${PYTHON_IMAGE} AS build

ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_INPUT=1

# A C compiler for mypyc (setup.py compiles the per-exchange modules); this stage only.
# Unpinned: Debian's security updates replace these versions within a release.
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends gcc libc6-dev \
 && rm -rf /var/lib/apt/lists/*

WORKDIR /src
COPY pyproject.toml build_backend.py setup.py README.md ./
COPY proxy ./proxy

# pip and setuptools leave the venv once it is installed: nothing at run time needs them
# (16 MB, and findings for image scanners).
RUN FAULTLINE_COMPILE=1 pip wheel --no-cache-dir --no-deps --wheel-dir /dist . \
 && python -m venv /opt/faultline \
 && /opt/faultline/bin/pip install --no-cache-dir /dist/faultline-*.whl \
 && /opt/faultline/bin/python -m pip uninstall -y -q pip setuptools \
 && /opt/faultline/bin/faultline --help > /dev/null

# The image's default configuration file. Everything not set here keeps its
# built-in default; mount your own file over /etc/faultline (Kubernetes: a
# ConfigMap) or set FAULTLINE_* variables. The admin server listens on all
# interfaces inside a container, otherwise probes and Prometheus cannot reach it.
RUN mkdir -p /out/etc/faultline \
 && printf '%s\n' \
      '# Faultline image defaults: see config/faultline.yaml for every key.' \
      'admin:' \
      '  listen: 0.0.0.0:9901' \
      > /out/etc/faultline/faultline.yaml

# --------------------------------------------------------------------------
FROM ${PYTHON_IMAGE}

LABEL org.opencontainers.image.title="faultline" \
      org.opencontainers.image.description="A reverse proxy that tells you who produced every error and where the fault lies" \
      org.opencontainers.image.licenses="Apache-2.0"

# A fixed numeric identity, so that runAsNonRoot can verify it without /etc/passwd.
RUN groupadd --system --gid 10001 faultline \
 && useradd --system --uid 10001 --gid 10001 --no-create-home \
      --home-dir /nonexistent --shell /usr/sbin/nologin faultline

COPY --from=build /opt/faultline /opt/faultline
COPY --from=build /out/etc/faultline /etc/faultline

# PYTHONDONTWRITEBYTECODE: the .pyc files were compiled at install time and
# the root file system is read-only at run time. PYTHONUNBUFFERED: one access
# log line per exchange reaches the container log at once.
ENV PATH=/opt/faultline/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PYTHONFAULTHANDLER=1 \
    FAULTLINE_CONFIG=/etc/faultline/faultline.yaml

USER 10001:10001

# 8080: the proxy. 9901: admin (/healthz, /readyz, /metrics, /stats, /dashboard).
EXPOSE 8080 9901

# Docker's own health check (Kubernetes ignores it and uses the pod's probes).
HEALTHCHECK --interval=10s --timeout=3s --start-period=5s --retries=3 \
  CMD ["python", "-c", "import sys, urllib.request; sys.exit(urllib.request.urlopen('http://127.0.0.1:9901/healthz', timeout=2).status != 200)"]

# SIGTERM (Docker's and Kubernetes' default) starts the graceful drain.
STOPSIGNAL SIGTERM
ENTRYPOINT ["faultline"]
CMD ["serve"]
