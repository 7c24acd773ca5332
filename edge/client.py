"""A client of the edge device agent (edge/agent.py) over HTTP: the standard library only.

    c = EdgeClient("http://127.0.0.1:8470", token)
    report = c.push("torch-v3.tar.gz")           # the on-device report; EdgeError(400/401/409/413/422) otherwise
    c.status(); c.predict({"input": [[1.0]]}, variant="int8"); c.rollback()
"""
from __future__ import annotations

import json
import os
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np


class EdgeError(RuntimeError):
    """The agent answered with an error (status, message, and the whole JSON body), or could not be reached
    (status 0)."""

    def __init__(self, status: int, message: str, body: dict | None = None):
        super().__init__(f"{status}: {message}" if status else message)
        self.status, self.message, self.body = status, message, body or {}


class EdgeClient:
    def __init__(self, url: str, token: str | None, *, timeout: float = 300.0):
        self.url, self.token, self.timeout = url.rstrip("/"), token, timeout

    def _request(self, method: str, path: str, *, data=None, headers: dict | None = None,
                 query: dict | None = None) -> dict:
        url = self.url + path + (("?" + urllib.parse.urlencode(query)) if query else "")
        headers = dict(headers or {})
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        req = urllib.request.Request(url, data=data, method=method, headers=headers)
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                raw = resp.read()
        except urllib.error.HTTPError as e:
            raw = e.read()
            try:
                body = json.loads(raw)
            except ValueError:
                body = {"error": raw.decode(errors="replace")[:500]}
            raise EdgeError(e.code, body.get("error") or e.reason, body) from None
        except (urllib.error.URLError, OSError) as e:
            raise EdgeError(0, f"{method} {url}: could not reach the agent ({getattr(e, 'reason', e)})") from None
        return json.loads(raw) if raw else {}

    def health(self) -> dict:
        return self._request("GET", "/health")

    def status(self) -> dict:
        return self._request("GET", "/status")

    def push(self, package_path: Path, *, allow_downgrade: bool = False) -> dict:
        """Upload a package (streamed from disk); returns the agent's on-device report (201)."""
        path = Path(package_path)
        size = path.stat().st_size
        with open(path, "rb") as f:
            return self._request("POST", "/bundles", data=f,
                                 headers={"Content-Type": "application/gzip", "Content-Length": str(size)},
                                 query={"allow_downgrade": "1"} if allow_downgrade else None)

    def predict(self, inputs: Any, variant: str | None = None) -> dict:
        """`inputs`: one array (a one-input model) or {name: array}; arrays or nested lists. Returns
        {name: np.ndarray} of the outputs."""
        def plain(v):
            return np.asarray(v).tolist()
        payload = {"inputs": {k: plain(v) for k, v in inputs.items()} if isinstance(inputs, dict) else plain(inputs)}
        body = self._request("POST", "/predict", data=json.dumps(payload).encode(),
                             headers={"Content-Type": "application/json"},
                             query={"variant": variant} if variant else None)
        return {k: np.asarray(v) for k, v in body.get("outputs", {}).items()}

    def predict_raw(self, body: dict, variant: str | None = None) -> dict:
        return self._request("POST", "/predict", data=json.dumps(body).encode(),
                             headers={"Content-Type": "application/json"},
                             query={"variant": variant} if variant else None)

    def rollback(self) -> dict:
        return self._request("POST", "/rollback", data=b"")


def from_env() -> EdgeClient:
    """EDGE_AGENT_URL and EDGE_AGENT_TOKEN."""
    return EdgeClient(os.environ.get("EDGE_AGENT_URL", "http://127.0.0.1:8470"), os.environ.get("EDGE_AGENT_TOKEN"))
