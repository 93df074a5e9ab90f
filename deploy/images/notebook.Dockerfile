# syntax=docker/dockerfile:1
# Single-user notebook image for the Zero to JupyterHub chart (singleuser.image): the
# researcher SDK (`from enclave import connect`), jupyterhub-singleuser and JupyterLab.
# No data and no credentials in it; notebooks reach only the coordinator (NetworkPolicy).
# Build from the repository root (not on the project's machines, which have no docker):
#   docker build -f deploy/images/notebook.Dockerfile -t bulle-notebook:0.1.0 .

FROM python:3.11.14-slim-bookworm AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PATH=/opt/bulle/bin:$PATH
RUN python -m venv /opt/bulle
# The Makefile's install step, in the same order: pip, then torch 2.13.0 from the CPU wheel
# first (otherwise opacus pulls the multi-GB CUDA build), then the project. jupyterhub
# (pinned by the project) provides jupyterhub-singleuser; JupyterLab is the UI.
RUN pip install "pip==26.3" \
 && pip install --index-url https://download.pytorch.org/whl/cpu "torch==2.13.0"
WORKDIR /src
COPY pyproject.toml README.md bulle_cli.py ./
COPY privacy ./privacy
COPY nodes ./nodes
COPY federation ./federation
COPY enclave ./enclave
COPY bulle_flower ./bulle_flower
RUN pip install /src "jupyterlab==4.6.6"

FROM python:3.11.14-slim-bookworm
# uid 1000 / gid 100: the chart's singleuser.uid and singleuser.fsGid defaults.
RUN useradd --uid 1000 --gid 100 --home-dir /home/jovyan --create-home --shell /bin/bash \
    jovyan
COPY --from=build /opt/bulle /opt/bulle
ENV PATH=/opt/bulle/bin:$PATH PYTHONUNBUFFERED=1 SHELL=/bin/bash
WORKDIR /home/jovyan
USER 1000:100
EXPOSE 8888
CMD ["jupyterhub-singleuser"]
