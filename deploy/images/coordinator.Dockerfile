# syntax=docker/dockerfile:1
# Coordinator image: `bulle coordinator serve`, the Alembic migrations of its PostgreSQL
# store, and flwr (the same image runs the Flower SuperLink, see deploy/k8s/manifests).
# Build from the repository root (not on the project's machines, which have no docker):
#   docker build -f deploy/images/coordinator.Dockerfile -t bulle-coordinator:0.1.0 .

FROM python:3.11.14-slim-bookworm AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PATH=/opt/bulle/bin:$PATH
RUN python -m venv /opt/bulle
# The Makefile's install step, in the same order: pip, then torch 2.13.0 from the CPU wheel
# first (otherwise opacus pulls the multi-GB CUDA build), then the project.
RUN pip install "pip==26.3" \
 && pip install --index-url https://download.pytorch.org/whl/cpu "torch==2.13.0"
WORKDIR /src
COPY pyproject.toml README.md bulle_cli.py ./
COPY privacy ./privacy
COPY nodes ./nodes
COPY federation ./federation
COPY enclave ./enclave
COPY bulle_flower ./bulle_flower
RUN pip install "/src[postgres]"

FROM python:3.11.14-slim-bookworm
RUN groupadd --system --gid 10001 bulle \
 && useradd --system --uid 10001 --gid bulle --home-dir /var/lib/bulle --create-home \
    --shell /usr/sbin/nologin bulle
COPY --from=build /opt/bulle /opt/bulle
COPY deploy/migrations /opt/bulle/migrations
ENV PATH=/opt/bulle/bin:$PATH PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
WORKDIR /var/lib/bulle
USER 10001:10001
EXPOSE 8700
ENTRYPOINT ["bulle"]
CMD ["coordinator", "serve", "--config", "/etc/bulle/coordinator.toml"]
