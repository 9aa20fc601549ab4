FROM python:3.11-slim
WORKDIR /app
COPY pyproject.toml README.md ./
COPY gateway ./gateway
COPY routing_config ./routing_config
RUN pip install --no-cache-dir .
EXPOSE 8080 9090
# The admin listener stays on loopback unless GATEWAY_ADMIN_TOKEN is set (SPEC §11).
CMD ["gateway", "serve", "--config", "/app/routing_config/example.yaml", "--host", "0.0.0.0", "--port", "8080"]
