FROM python:3.11-slim
WORKDIR /app
COPY pyproject.toml README.md constraints.txt ./
COPY gateway ./gateway
COPY routing_config ./routing_config
RUN PIP_CONSTRAINT=/app/constraints.txt pip install --no-cache-dir .
EXPOSE 8080 9090
# Admin API changes (SPEC §6) persist in the admin store; mount a volume at /var/lib/gateway to keep
# them across containers.
RUN mkdir -p /var/lib/gateway
VOLUME /var/lib/gateway
# The admin listener stays on loopback unless GATEWAY_ADMIN_TOKEN is set (SPEC §11).
CMD ["gateway", "serve", "--config", "/app/routing_config/example.yaml", "--store", "/var/lib/gateway/admin.json", \
     "--host", "0.0.0.0", "--port", "8080"]
