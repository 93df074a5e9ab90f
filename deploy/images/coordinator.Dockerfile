# Coordinator image: `bulle coordinator serve`, the Alembic migrations of its PostgreSQL
# store, and flwr (the same image runs the Flower SuperLink, see deploy/k8s/manifests).
# Build from the repository root (not on the project's machines, which have no docker):
#   docker build -f deploy/images/coordinator.Dockerfile -t bulle-coordinator:0.1.0 .

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
 && pip install "/src[coordinator,training]" && pip uninstall -y bulle && rm -rf build bulle.egg-info
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
COPY deploy/migrations /opt/bulle/migrations
ENV PATH=/opt/bulle/bin:$PATH PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
WORKDIR /var/lib/bulle
USER 10001:10001
EXPOSE 8700
ENTRYPOINT ["bulle"]
CMD ["coordinator", "serve", "--config", "/etc/bulle/coordinator.toml"]
