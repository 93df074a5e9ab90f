# Node agent image: `bulle node serve` (gRPC, mutual TLS) and, with the DP training tier,
# the Flower SuperNode (flwr is already in the image: `flower-supernode`).
# Build from the repository root (not on the project's machines, which have no docker):
#   docker build -f deploy/images/node.Dockerfile -t bulle-node:0.1.0 .
# Run: deploy/node/compose.yaml, or deploy/README.md ("Run a node in a container").

# BASE_IMAGE: any Debian-based image with python3.11 and python3-venv (the CI builds one with
# debootstrap, no registry being reachable there: tests/test_images.py). TORCH_INDEX: where the
# CPU torch wheel comes from; TORCH_FIND_LINKS: an extra wheel folder or URL (the CI serves
# its local wheel with it).
ARG BASE_IMAGE=python:3.11.14-slim-bookworm
FROM ${BASE_IMAGE} AS build
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
ARG TORCH_FIND_LINKS=
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PATH=/opt/bulle/bin:$PATH
RUN python3 -m venv /opt/bulle
# The Makefile's install step, in the same order: pip, then torch 2.13.0 from the CPU wheel
# first (otherwise opacus pulls the multi-GB CUDA build), then the project.
RUN pip install "pip==26.3" \
 && PIP_FIND_LINKS="$TORCH_FIND_LINKS" pip install --index-url "$TORCH_INDEX" "torch==2.13.0"
WORKDIR /src
# The dependencies first, from pyproject.toml alone (empty package folders), so that a
# change of the sources rebuilds only the last, seconds-long layer.
COPY pyproject.toml README.md ./
RUN mkdir privacy nodes federation enclave bulle_flower bulle_demo && touch bulle_cli.py jupyterhub_config.py \
 && pip install "/src[node,dp,training]" && pip uninstall -y bulle && rm -rf build bulle.egg-info
COPY bulle_cli.py jupyterhub_config.py ./
COPY privacy ./privacy
COPY nodes ./nodes
COPY federation ./federation
COPY enclave ./enclave
COPY bulle_flower ./bulle_flower
COPY bulle_demo ./bulle_demo
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
