# Single-user notebook image for the Zero to JupyterHub chart (singleuser.image): the
# researcher SDK (`from enclave import connect`), jupyterhub-singleuser and JupyterLab.
# No data and no credentials in it; notebooks reach only the coordinator (NetworkPolicy).
# Build from the repository root (not on the project's machines, which have no docker):
#   docker build -f deploy/images/notebook.Dockerfile -t bulle-notebook:0.1.0 .

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
# first (otherwise opacus pulls the multi-GB CUDA build), then the project. jupyterhub
# (pinned by the project) provides jupyterhub-singleuser; JupyterLab is the UI.
RUN pip install "pip==26.3" \
 && PIP_FIND_LINKS="$TORCH_FIND_LINKS" pip install --index-url "$TORCH_INDEX" "torch==2.13.0"
WORKDIR /src
# The dependencies first, from pyproject.toml alone (empty package folders), so that a
# change of the sources rebuilds only the last, seconds-long layer.
COPY pyproject.toml README.md ./
RUN mkdir privacy nodes federation enclave bulle_flower bulle_demo && touch bulle_cli.py jupyterhub_config.py \
 && pip install "/src[sdk,hub,training]" "jupyterlab==4.6.6" && pip uninstall -y bulle && rm -rf build bulle.egg-info
COPY bulle_cli.py jupyterhub_config.py ./
COPY privacy ./privacy
COPY nodes ./nodes
COPY federation ./federation
COPY enclave ./enclave
COPY bulle_flower ./bulle_flower
COPY bulle_demo ./bulle_demo
RUN pip install --no-deps /src

FROM ${BASE_IMAGE}
# uid 1000 / gid 100: the chart's singleuser.uid and singleuser.fsGid defaults.
RUN useradd --uid 1000 --gid 100 --home-dir /home/jovyan --create-home --shell /bin/bash \
    jovyan
COPY --from=build /opt/bulle /opt/bulle
ENV PATH=/opt/bulle/bin:$PATH PYTHONUNBUFFERED=1 SHELL=/bin/bash
WORKDIR /home/jovyan
USER 1000:100
EXPOSE 8888
CMD ["jupyterhub-singleuser"]
