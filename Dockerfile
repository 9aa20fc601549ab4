# The gateway image: `gateway serve` as a non-root user, the table from a mounted file (see README "Deploying").
FROM python:3.11.7-slim-bookworm

# Every version (pip, setuptools and the build requirements included) is pinned by constraints.txt.
ENV PIP_CONSTRAINT=/app/constraints.txt \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1
WORKDIR /app
COPY pyproject.toml README.md constraints.txt ./
COPY gateway ./gateway
COPY routing_config ./routing_config
RUN pip install "pip==26.3" && pip install . \
 && useradd --system --uid 10001 --gid 0 --home-dir /var/lib/gateway --shell /usr/sbin/nologin gateway \
 && mkdir -p /etc/gateway /var/lib/gateway/queues \
 && cp routing_config/example.yaml /etc/gateway/table.yaml \
 && chown -R 10001:0 /var/lib/gateway && chmod -R g=u /var/lib/gateway

# The routing table: mount yours over /etc/gateway (a Kubernetes ConfigMap: deploy/kubernetes/); the
# image carries the example table there so that `docker run` alone starts. A changed file is reloaded.
ENV GATEWAY_CONFIG=/etc/gateway/table.yaml
# Admin changes (SPEC §6) and the async queue (SPEC §10) persist here: keep the volume to keep them.
VOLUME /var/lib/gateway

USER 10001
# public HTTP, admin (health, metrics, §6 API), gRPC
EXPOSE 8080 9090 50051
# The admin listener answers /healthz inside the container even on loopback; the stdlib is enough.
HEALTHCHECK --interval=10s --timeout=3s --start-period=15s --retries=3 \
  CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:9090/healthz', timeout=2)"]
STOPSIGNAL SIGTERM
# SIGTERM drains for up to --drain-timeout (30 s): stop with `docker stop --time 40`.
# The admin listener stays on loopback unless GATEWAY_ADMIN_TOKEN is set and `--admin-host 0.0.0.0` is added.
ENTRYPOINT ["gateway", "serve"]
CMD ["--host", "0.0.0.0", "--port", "8080", "--admin-port", "9090", "--grpc-port", "50051", \
     "--store", "/var/lib/gateway/admin.json", "--queue-store", "/var/lib/gateway/queues", "--drain-timeout", "30"]
