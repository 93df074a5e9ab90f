# Slim node agent image: `bulle node serve` (gRPC, mutual TLS) for a node that serves
# federated SQL only — the core dependencies, no torch, flwr, opacus or jupyterhub (about
# 0.4 GB instead of 2.6). A node of the DP training tier uses node.Dockerfile.
# Build from the repository root:
#   docker build -f deploy/images/node-sql.Dockerfile -t bulle-node-sql:0.1.0 .
# BASE_IMAGE: any Debian-based image with python3.11 and python3-venv (the CI builds one with
# debootstrap, no registry being reachable there: tests/test_images.py).
ARG BASE_IMAGE=python:3.11.14-slim-bookworm
FROM ${BASE_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PATH=/opt/bulle/bin:$PATH
RUN python3 -m venv /opt/bulle && pip install "pip==26.3"
WORKDIR /src
# The dependencies first, from pyproject.toml alone (empty package folders), so that a
# change of the sources rebuilds only the last, seconds-long layer.
COPY pyproject.toml README.md ./
RUN mkdir privacy nodes federation enclave bulle_flower && touch bulle_cli.py \
 && pip install "/src[node]" && pip uninstall -y bulle && rm -rf build bulle.egg-info
COPY bulle_cli.py ./
COPY privacy ./privacy
COPY nodes ./nodes
COPY federation ./federation
COPY enclave ./enclave
COPY bulle_flower ./bulle_flower
RUN pip install --no-deps /src

FROM ${BASE_IMAGE}
RUN groupadd --system --gid 10001 bulle \
 && useradd --system --uid 10001 --gid bulle --home-dir /var/lib/bulle --create-home \
    --shell /usr/sbin/nologin bulle
COPY --from=build /opt/bulle /opt/bulle
ENV PATH=/opt/bulle/bin:$PATH PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
# /etc/bulle: config, TLS files, board key (read-only mounts); /data: the operator's
# extracts (read-only); /var/lib/bulle: ledger, audit chain, release cache (a volume).
WORKDIR /var/lib/bulle
VOLUME ["/var/lib/bulle"]
USER 10001:10001
EXPOSE 50051
ENTRYPOINT ["bulle"]
CMD ["node", "serve", "--config", "/etc/bulle/node.toml"]
