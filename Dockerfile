# syntax=docker/dockerfile:1
# Build stage: a wheel-installed virtualenv, no compilers in the final image.
FROM python:3.11-slim AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
COPY pyproject.toml README.md ./
COPY trioproxy ./trioproxy
RUN python -m venv /opt/venv \
    && /opt/venv/bin/pip install --no-cache-dir .

# Runtime stage: the virtualenv, a non-root user and the /data volume.
FROM python:3.11-slim
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    TRIOPROXY_DATA_DIR=/data \
    TRIOPROXY_LOG_FORMAT=json
RUN groupadd --system --gid 10001 trioproxy \
    && useradd --system --uid 10001 --gid trioproxy --home-dir /data --no-create-home trioproxy \
    && mkdir -p /data && chown trioproxy:trioproxy /data
COPY --from=build /opt/venv /opt/venv
USER 10001:10001
WORKDIR /data
VOLUME ["/data"]
EXPOSE 2455
HEALTHCHECK --interval=15s --timeout=3s --start-period=10s --retries=3 \
    CMD ["python", "-c", "import sys, urllib.request; sys.exit(0 if urllib.request.urlopen('http://127.0.0.1:2455/health/live', timeout=2).status == 200 else 1)"]
ENTRYPOINT ["trioproxy", "serve", "--host", "0.0.0.0"]
