"""Helpers the tests share (fixtures live in conftest.py): the shared data check, the server clients."""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

import openai
import pytest

from config import SHARED_DATA


def require_shared_data(sub: str = "") -> Path:
    """The path under ../shared/data; fail under CI=true when missing, skip otherwise."""
    p = SHARED_DATA / sub
    if not p.exists():
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"{p} is missing: CI must provide ../shared/data")
        pytest.skip(f"{p} not available")
    return p


def openai_client(server, key: str = "unused") -> openai.OpenAI:
    """The official client pointed at a ServerThread, with no retries: each error reaches the test."""
    return openai.OpenAI(base_url=server.url + "/v1", api_key=key, max_retries=0, timeout=60)


def wait_for(pred, timeout: float = 20.0) -> bool:
    """Poll ``pred`` until it holds or ``timeout`` seconds pass (server state changes in other threads)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(0.05)
    return False


def sse(client, path: str, body: dict) -> list[dict]:
    """POST ``body`` streamed; the JSON events up to the final ``data: [DONE]``."""
    with client.stream("POST", path, json={**body, "stream": True}) as r:
        assert r.status_code == 200, r.read()
        lines = [line for line in r.iter_lines() if line]
    assert lines[-1] == "data: [DONE]"
    return [json.loads(line[6:]) for line in lines[:-1]]
