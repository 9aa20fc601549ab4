"""`gateway demo --python`: a Python script of calls that work against the demo (printed, then run by tests).

Python clients do not resolve `*.localhost` as curl does (they ask the system resolver, which
answers `gaierror`), so each call connects to 127.0.0.1 and names the gateway host in `Host`.
"""

from __future__ import annotations

BEGIN = "# --- Python (httpx, and the standard library) ---"
END = "# --- end of Python ---"

TEMPLATE = """\
import json
import urllib.request

import httpx  # what the OpenAI and baseten SDKs use underneath; pass them the same base_url and Host header

gateway = httpx.Client(base_url="http://127.0.0.1:{port}", headers={{"Authorization": "Api-Key {key}"}}, timeout=30)

# regional host: prod-us stays in region us (no DNS: the hostname goes in the Host header)
r = gateway.post("/predict", headers={{"Host": "model-abc123-prod-us.localhost"}}, json={{"model_input": {{"prompt": "hello"}}}})
print("regional", r.status_code, r.json()["region"])

# standard host, an environment in the path: /environments/<env>/predict
r = gateway.post("/environments/prod-eu/predict", headers={{"Host": "model-abc123.localhost"}}, json={{}})
print("standard", r.status_code, r.json()["region"])

# token streaming (SSE), read as it comes
with gateway.stream("POST", "/production/predict", headers={{"Host": "model-llm7.localhost"}}, json={{"max_tokens": 3}}) as r:
    events = [line for line in r.iter_lines() if line.startswith("data: ")]
print("streamed", r.status_code, len(events), "events")

# the standard library alone: urllib sends the Host header it is given, too
req = urllib.request.Request(
    "http://127.0.0.1:{port}/production/predict", data=json.dumps({{"model_input": {{}}}}).encode(),
    headers={{"Host": "model-abc123.localhost", "Authorization": "Api-Key {key}", "Content-Type": "application/json"}},
)
with urllib.request.urlopen(req, timeout=30) as resp:
    print("urllib", resp.status, json.load(resp)["environment"])
"""


def python_script(port: int, key: str) -> str:
    """The script, between its BEGIN and END marker lines."""
    return f"{BEGIN}\n{TEMPLATE.format(port=port, key=key)}{END}"
