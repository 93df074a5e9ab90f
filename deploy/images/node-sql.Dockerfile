# Slim node agent image: `bulle node serve` (gRPC, mutual TLS) for a node that serves
# federated SQL only — the core dependencies, no torch, flwr, opacus, jupyterhub,
# dp-accounting or scipy. A node of the DP training tier uses node.Dockerfile.
# Two variants (deploy/README.md, "Images"), by the build argument DP:
# - DP=1 (the default): with OpenDP (the `dp` extra), for a node that serves a sensitive
#   dataset. 482 MB from the debootstrap base, built in 58 s cold, 16 s when only the
#   sources changed; OpenDP's stripped library alone is 171 MB (PyPI has no smaller build).
# - DP=0: without OpenDP, for a node serving only open and restricted tables: 311 MB, built
#   in 45 s cold, 24 s when only the sources changed.
#   Started with a sensitive dataset, it refuses to start and says so.
# The runtime stage is distroless-style (node-sql-rootfs.sh: python, its pruned standard
# library, the venv, an ldd closure of shared libraries; no shell).
# Build from the repository root:
#   docker build -f deploy/images/node-sql.Dockerfile -t bulle-node-sql:0.1.0 .
#   docker build -f deploy/images/node-sql.Dockerfile --build-arg DP=0 \
#     -t bulle-node-sql-nodp:0.1.0 .
# BASE_IMAGE: any Debian-based image with python3.11 and python3-venv (the CI builds one with
# debootstrap, no registry being reachable there: tests/test_images.py).
ARG BASE_IMAGE=python:3.11.14-slim-bookworm
FROM ${BASE_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PATH=/opt/bulle/bin:$PATH
# binutils for `strip`, in this stage only
# hadolint ignore=DL3008
RUN apt-get update && apt-get install -y --no-install-recommends binutils \
 && rm -rf /var/lib/apt/lists/*
RUN python3 -m venv /opt/bulle && pip install "pip==26.3"
WORKDIR /src
# The dependencies first, from pyproject.toml alone (empty package folders), so that a
# change of the sources rebuilds only the last, seconds-long layers.
COPY pyproject.toml README.md ./
# DP=1: OpenDP too (the `dp` extra). Declared here, so that both variants share the layers
# above in the build cache.
ARG DP=1
RUN mkdir privacy nodes federation enclave bulle_flower bulle_demo && touch bulle_cli.py jupyterhub_config.py \
 && if [ "$DP" = 1 ]; then pip install "/src[node,dp]"; else pip install "/src[node]"; fi \
 && pip uninstall -y bulle && rm -rf build bulle.egg-info
# What a SQL node never loads (issue 15; each removal is checked by the imports below):
# - symbol tables: OpenDP's library ships unstripped (--strip-unneeded: 265 → 168 MB),
#   pyarrow's, SQLAlchemy's and cryptography's in part (−30 MB); numpy's libraries, patched
#   by auditwheel, are left alone (strip can break patchelf'd files; the gain is 3 MB);
# - pyarrow's Flight, Substrait, ORC and remote filesystems (pyarrow.fs imports those
#   optionally; libarrow_substrait stays, every pyarrow module links it), its tests,
#   headers and Cython sources, and the unversioned copies of its
#   libraries (wheels hold no symlinks: the loader asks for the .so.NNNN names);
# - numpy's tests, its test and SIMD-introspection extensions, f2py, numpy.distutils,
#   C headers and static library (build-time only: −6 MB);
# - SQLAlchemy's test harness and the MySQL, SQL Server and Oracle dialects (a node's stores
#   are SQLite; the ledger's PostgreSQL branch stays: −4 MB); type stubs (.pyi: −2 MB).
RUN set -eu; sp=/opt/bulle/lib/python3.11/site-packages; \
    rm -rf "$sp/numpy/distutils" "$sp/numpy/f2py" "$sp/numpy/_pyinstaller" \
      "$sp/numpy/_core/include" "$sp/numpy/_core/lib" "$sp/numpy/_core"/_*tests*.so \
      "$sp/numpy/_core"/_simd*.so "$sp/sqlalchemy/testing" "$sp/sqlalchemy/dialects/mysql" \
      "$sp/sqlalchemy/dialects/mssql" "$sp/sqlalchemy/dialects/oracle" "$sp/_duckdb-stubs" \
      "$sp/wrapt-stubs"; \
    find "$sp" -name '*.pyi' -delete; \
    find "$sp/pyarrow" -maxdepth 1 \( -name tests -o -name include -o -name src \
      -o -name '*.pxd' -o -name '*.pyx' -o -name '*.pxi' -o -name '*.h' \
      -o -name '_flight*.so' -o -name 'libarrow_flight.so*' -o -name 'flight.py' \
      -o -name 'libarrow_python_flight.so*' -o -name '_substrait*.so' -o -name 'substrait.py' \
      -o -name '_orc*.so' -o -name '_dataset_orc*.so' \
      -o -name 'orc.py' -o -name '_s3fs*.so' -o -name 'libarrow_s3.so*' -o -name '_gcsfs*.so' \
      -o -name '_azurefs*.so' -o -name '_hdfs*.so' -o -name '_pyarrow_cpp_tests*.so' \
      -o -name 'libarrow_python*.so' -o -name 'libarrow_python*.so.*.*.*' \) -exec rm -rf {} +; \
    find "$sp/numpy" -depth -type d -name tests -exec rm -rf {} +; \
    find "$sp" -type f \( -name '*.so' -o -name '*.so.[0-9]*' \) -not -path "$sp/numpy*" \
      -exec strip --strip-unneeded {} +
COPY bulle_cli.py jupyterhub_config.py ./
COPY privacy ./privacy
COPY nodes ./nodes
COPY federation ./federation
COPY enclave ./enclave
COPY bulle_flower ./bulle_flower
COPY bulle_demo ./bulle_demo
# The sources, then the venv without its installers (a running node installs nothing).
RUN pip install --no-deps /src && python -m pip uninstall -y pip setuptools
# The runtime root fs, distroless-style (the script says what goes in), and a check, run in
# it as the node's user, that everything a SQL node loads still loads there: Parquet,
# compute, IPC, DuckDB, a restricted-tier perturbation, with DP=1 a DP release through
# OpenDP's stripped library (with DP=0: no OpenDP at all), the serve and doctor paths,
# ctypes' libc lookup (malloc tuning), TLS with the CA bundle (/dev/null only for the
# check: ctypes' lookup reads it; docker provides /dev at run time).
COPY deploy/images/node-sql-rootfs.sh /usr/local/bin/
RUN node-sql-rootfs.sh /rootfs && mkdir /rootfs/dev && mknod -m 666 /rootfs/dev/null c 1 3 \
 && env -i PATH=/opt/bulle/bin:/usr/bin LANG=C.UTF-8 PYTHONDONTWRITEBYTECODE=1 DP="$DP" \
    /usr/sbin/chroot --userspec=10001:10001 /rootfs python -c "import os, sys, io, \
ctypes.util, ssl, importlib.util, numpy as np, pyarrow as pa, pyarrow.parquet as pq, \
pyarrow.compute, pyarrow.ipc, duckdb, nodes.cli, \
nodes._engine, nodes._service, nodes._onboard, nodes._restricted, nodes._doctor, privacy; \
t = pa.table({'x': [1, 2]}); b = io.BytesIO(); pq.write_table(t, b); \
assert pq.read_table(io.BytesIO(b.getvalue())).equals(t); \
assert duckdb.sql('SELECT 41 + 1').fetchall() == [(42,)]; \
dp = os.environ['DP'] == '1'; assert (importlib.util.find_spec('opendp') is not None) == dp; \
dp and privacy.dp_count([10.0], 1.0); \
p = privacy.count_perturbation(privacy.ptable_for(privacy.CkmParams()), np.array([0, 30]), \
np.array([7, 12345])); assert p[0] == 0 and abs(p[1]) <= 4, p; \
assert ctypes.util.find_library('c') == 'libc.so.6'; \
assert ssl.create_default_context().cert_store_stats()['x509_ca'] > 0; \
bad = {'dp_accounting', 'scipy'} & set(sys.modules); assert not bad, bad" \
 && env -i PATH=/opt/bulle/bin:/usr/bin /usr/sbin/chroot --userspec=10001:10001 /rootfs \
    bulle node doctor --help >/dev/null \
 && rm -rf /rootfs/dev /rootfs/tmp/* && chmod 1777 /rootfs/tmp

FROM scratch
COPY --from=build /rootfs /
ENV PATH=/opt/bulle/bin:/usr/bin \
    LANG=C.UTF-8 PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
# /etc/bulle: config, TLS files, board key (read-only mounts); /data: the operator's
# extracts (read-only); /var/lib/bulle: ledger, audit chain, release cache (a volume).
WORKDIR /var/lib/bulle
VOLUME ["/var/lib/bulle"]
USER 10001:10001
EXPOSE 50051
ENTRYPOINT ["bulle"]
CMD ["node", "serve", "--config", "/etc/bulle/node.toml"]
