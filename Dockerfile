# relay: a local SMTP relay for applications.
#
#   docker build -t relay .
#   docker run -d --name relay -p 127.0.0.1:2525:2525 -p 127.0.0.1:9025:9025 \
#       -v relay-data:/var/lib/relay relay
#
# The config baked in is config/relay.docker.yaml (Maildir delivery into the volume);
# mount your own over /etc/relay/relay.yaml to add upstream accounts.

# Kubernetes: deploy/kubernetes/ and docs/kubernetes.md. The image runs with a read-only
# root file system (docker run --read-only; readOnlyRootFilesystem: true): it writes only
# to /var/lib/relay, SQLite's temporary files included (SQLITE_TMPDIR below).
#
# The base image is pinned to a Python minor version and a Debian release, so a rebuild
# never changes either; pin its digest too for reproducible builds:
#   docker build --build-arg BASE=python:3.11-slim-bookworm@sha256:... -t relay .
ARG BASE=python:3.11-slim-bookworm

# -- build: install relay and its dependencies into a virtualenv -----------------------
FROM ${BASE} AS build

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

RUN python -m venv /opt/relay
WORKDIR /src
# Only what `pip install .` needs (.dockerignore keeps the context to these as well).
COPY pyproject.toml README.md ./
COPY relay ./relay
RUN /opt/relay/bin/pip install .

# -- runtime: the virtualenv, the config, an unprivileged user --------------------------
# The same base image as the build stage: the virtualenv's python links to its interpreter.
FROM ${BASE}

# SQLITE_TMPDIR: SQLite's temporary files on the volume, not in a read-only /tmp.
ENV PATH=/opt/relay/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    RELAY_CONFIG=/etc/relay/relay.yaml \
    SQLITE_TMPDIR=/var/lib/relay

# uid/gid 10001: outside the range of system accounts and of typical host users, so files
# in a bind-mounted /var/lib/relay do not end up owned by someone on the host.
RUN groupadd --system --gid 10001 relay \
 && useradd --system --uid 10001 --gid relay --home-dir /var/lib/relay --no-create-home \
        --shell /usr/sbin/nologin relay \
 && mkdir -p /var/lib/relay /etc/relay \
 && chown relay:relay /var/lib/relay \
 && chmod 0750 /var/lib/relay

COPY --from=build /opt/relay /opt/relay
COPY config/relay.docker.yaml /etc/relay/relay.yaml

# Queue file (queue.sqlite3 and its -wal, -shm and .lock files) and the Maildir outbox.
# Created and chowned above, before VOLUME, so a new named volume starts owned by relay.
VOLUME /var/lib/relay
WORKDIR /var/lib/relay
# Numeric, so Kubernetes' runAsNonRoot can verify it without reading /etc/passwd.
USER 10001:10001

# SMTP for applications; HTTP for /metrics, /healthz and /readyz.
EXPOSE 2525 9025

# /healthz answers while the process is up (metrics.enabled must stay true).
HEALTHCHECK --interval=30s --timeout=5s --start-period=10s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:9025/healthz', timeout=3)"]

# On SIGTERM relay fails /readyz, keeps accepting for shutdown.drain_delay (0s by default),
# stops accepting, gives in-flight deliveries shutdown.grace (5s) to finish and returns the
# rest to the queue; Docker's default 10-second stop timeout covers the defaults.
STOPSIGNAL SIGTERM
CMD ["relay", "serve", "--config", "/etc/relay/relay.yaml"]
