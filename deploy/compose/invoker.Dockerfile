# The invoker daemon / recorder / load generator image, built without any registry or index.
#
# Context: the repo root (as docker-compose.yml says). It reads only deploy/compose/.wheels/{deps,invoker}/,
# which deploy/compose/images.sh fills on the host (the project wheel and its dependencies:
# pip inside `docker build` cannot reach PyPI here) before it builds this image from a context
# of just those files. Build it with that script rather than `docker compose build`, which would
# send the whole work tree (.venv included) to the engine.
#
# The base is the debootstrap'ed bookworm minbase with python3 (deploy/images.sh): it has
# neither pip nor ensurepip, so a venv is made --without-pip and the pip wheel itself (a zip
# with a runnable pip package) installs the rest into it, --no-index.

FROM invoker-python-base:bookworm AS build
# the dependencies first: a change of the project's code reuses this layer
COPY deploy/compose/.wheels/deps/ /wheels/
RUN set -eu; \
    python3 -m venv --without-pip /opt/invoker; \
    pip_whl="$(ls /wheels/pip-*.whl | head -n1)"; \
    /opt/invoker/bin/python "$pip_whl/pip" install --no-index --no-cache-dir \
        --disable-pip-version-check --quiet $(ls /wheels/*.whl | grep -v '/pip-')
COPY deploy/compose/.wheels/invoker/ /wheels-invoker/
RUN set -eu; \
    pip_whl="$(ls /wheels/pip-*.whl | head -n1)"; \
    /opt/invoker/bin/python "$pip_whl/pip" install --no-index --no-deps --no-cache-dir \
        --disable-pip-version-check --quiet /wheels-invoker/*.whl; \
    /opt/invoker/bin/python "$pip_whl/pip" check --disable-pip-version-check; \
    /opt/invoker/bin/invoker --help >/dev/null

FROM invoker-python-base:bookworm
LABEL org.opencontainers.image.title="invoker" \
      org.opencontainers.image.description="invoker daemon, recorder and load generator"
# Non-root. Talking to the Docker engine needs the group of /var/run/docker.sock: compose adds
# it with group_add (DOCKER_GID), nothing about the host is baked in here.
RUN useradd --uid 10001 --user-group --home-dir /nonexistent --no-create-home \
        --shell /usr/sbin/nologin invoker
COPY --from=build /opt/invoker /opt/invoker
ENV PATH=/opt/invoker/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    INVOKER_METRICS_HOST=0.0.0.0
USER 10001:10001
WORKDIR /tmp
EXPOSE 9180 9181
CMD ["invoker", "run"]
