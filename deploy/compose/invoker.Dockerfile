# The invoker daemon / recorder / load generator image. Context: the repo root.
#
# Two ways to build it, one Dockerfile:
# - With a package index (a machine with a registry and PyPI): `docker compose build`, on the
#   public python:3.11-slim-bookworm; pip installs the project from its sources.
# - Offline (`make images`, deploy/compose/images.sh): on the debootstrap'ed python base
#   (--build-arg PYTHON_BASE=invoker-python-base:bookworm), from the wheels images.sh stages in
#   deploy/compose/wheels/{deps,invoker}/ (pip inside `docker build` cannot reach PyPI there).
#   Both ways take the versions pinned in constraints.txt (images.sh stages wheels by it).
#   That base has neither pip nor ensurepip: the venv is made --without-pip and the pip wheel
#   itself (a zip with a runnable pip package) installs the rest, --no-index.
# The COPY sources with [x] patterns match nothing when the wheels are not staged; README.md
# is always there, so the COPY never fails.

ARG PYTHON_BASE=python:3.11-slim-bookworm

FROM ${PYTHON_BASE} AS build
# the dependencies first: a change of the project's code reuses this layer
COPY deploy/compose/wheels/README.md deploy/compose/wheels/dep[s] /wheels/deps/
RUN set -eu; \
    if ls /wheels/deps/*.whl >/dev/null 2>&1; then \
        python3 -m venv --without-pip /opt/invoker; \
        pip_whl="$(ls /wheels/deps/pip-*.whl | head -n1)"; \
        /opt/invoker/bin/python "$pip_whl/pip" install --no-index --no-cache-dir \
            --disable-pip-version-check --quiet $(ls /wheels/deps/*.whl | grep -v '/pip-'); \
    else \
        python3 -m venv /opt/invoker; \
    fi
COPY deploy/compose/wheels/README.md deploy/compose/wheels/invoke[r] /wheels/invoker/
COPY pyproject.toml constraints.txt /src/
COPY invoker /src/invoker
COPY store /src/store
COPY overflow /src/overflow
RUN set -eu; \
    if ls /wheels/deps/*.whl >/dev/null 2>&1; then \
        pip="/opt/invoker/bin/python $(ls /wheels/deps/pip-*.whl | head -n1)/pip"; \
        $pip install --no-index --no-deps --no-cache-dir --disable-pip-version-check --quiet \
            /wheels/invoker/*.whl; \
    else \
        pip="/opt/invoker/bin/python -m pip"; \
        $pip install --no-cache-dir --disable-pip-version-check --quiet \
            -c /src/constraints.txt /src; \
    fi; \
    $pip check --disable-pip-version-check; \
    /opt/invoker/bin/invoker --help >/dev/null

FROM ${PYTHON_BASE}
LABEL org.opencontainers.image.title="invoker" \
      org.opencontainers.image.description="invoker daemon, recorder and load generator"
# Non-root. Talking to the Docker engine needs the group of /var/run/docker.sock, which differs
# between hosts: the entrypoint finds it when the container starts as root (the compose invoker
# service) and drops to 10001; nothing about the host is baked in here.
RUN useradd --uid 10001 --user-group --home-dir /nonexistent --no-create-home \
        --shell /usr/sbin/nologin invoker
COPY --from=build /opt/invoker /opt/invoker
COPY deploy/compose/invoker-entrypoint.sh /usr/local/bin/invoker-entrypoint
ENV PATH=/opt/invoker/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    INVOKER_METRICS_HOST=0.0.0.0
USER 10001:10001
WORKDIR /tmp
EXPOSE 9180 9181
ENTRYPOINT ["/usr/local/bin/invoker-entrypoint"]
CMD ["invoker", "run"]
