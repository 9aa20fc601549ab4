"""Absolute-form request targets (RFC 9112 §3.2.2; issue 13), the pure rule: clients configured with an
HTTP proxy send `POST http://model-x.../predict`. The target's authority routes; a Host that disagrees
is 400. Through a running gateway: tests/test_proxy.py."""

from __future__ import annotations

import pytest

from gateway.errors import ClientError
from gateway.headers import absolute_form

STD = "model-abc123.api.example.com"


@pytest.mark.parametrize(
    ("target", "host", "expected"),
    [
        ("/production/predict", None, None),
        (f"http://{STD}/production/predict", None, (STD, "/production/predict")),
        (
            f"HTTPS://{STD}:8443/production/sync/v1/models?limit=2",
            STD,
            (f"{STD}:8443", "/production/sync/v1/models?limit=2"),
        ),
        (f"http://{STD}", STD.upper(), (STD, "/")),
        (f"http://{STD}?x=1", None, (STD, "/?x=1")),
    ],
)
def test_absolute_form_gives_the_routing_host_and_the_origin_form(
    target: str, host: str | None, expected: object
) -> None:
    assert absolute_form(target, host) == expected


@pytest.mark.parametrize(
    ("target", "host", "words"),
    [
        (f"ftp://{STD}/production/predict", None, "not http or https"),
        (f"http://user@{STD}/production/predict", None, "user information"),
        ("http:///production/predict", None, "authority"),
        (f"http://{STD}/production/predict", "model-xyz789.api.example.com", "another host"),
    ],
)
def test_bad_absolute_forms_are_400(target: str, host: str | None, words: str) -> None:
    with pytest.raises(ClientError, match=words):
        absolute_form(target, host)
