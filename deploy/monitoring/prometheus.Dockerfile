# Prometheus for the compose stack's "monitoring" profile without a registry: Debian bookworm's
# prometheus package (2.42), installed by debootstrap into invoker-prometheus-base:bookworm
# (deploy/compose/images.sh). Built by images.sh with this directory as its context.
#
# Like prom/prometheus: configuration in /etc/prometheus (mounted read-only by the compose
# file), data in /prometheus, port 9090; the flags are given by the compose file.
FROM invoker-prometheus-base:bookworm
LABEL org.opencontainers.image.title="invoker-local/prometheus" \
      org.opencontainers.image.description="Prometheus from Debian's prometheus package"
# the package made the prometheus system user; the volume mounted on /prometheus starts out
# with this directory's owner
RUN mkdir -p /prometheus && chown prometheus:prometheus /prometheus
USER prometheus
WORKDIR /prometheus
VOLUME /prometheus
EXPOSE 9090
# no curl or wget in the image: GET /-/ready over bash's /dev/tcp
HEALTHCHECK --interval=10s --timeout=5s --start-period=30s --retries=6 \
    CMD ["bash", "-c", "exec 3<>/dev/tcp/127.0.0.1/9090 && printf 'GET /-/ready HTTP/1.0\\r\\n\\r\\n' >&3 && head -n1 <&3 | grep -q ' 200 '"]
ENTRYPOINT ["/usr/bin/prometheus"]
CMD ["--config.file=/etc/prometheus/prometheus.yml", "--storage.tsdb.path=/prometheus"]
