"""Helpers for tests against a real JupyterHub: log in with a password, make and revoke
tokens through the hub's REST API, as a person would from the token page; start a
person's server and run code in a kernel there."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from typing import Any

import httpx


class HubSession:
    """A logged-in browser-like session (cookies, XSRF) on the hub."""

    def __init__(self, hub_url: str, user: str, password: str) -> None:
        self.hub_url, self.user = hub_url.rstrip("/"), user
        self.http = httpx.Client(base_url=self.hub_url, timeout=60, follow_redirects=False)
        self.http.get("/hub/login")
        xsrf = self.http.cookies.get("_xsrf", "")
        r = self.http.post("/hub/login", data={"username": user, "password": password,
                                              "_xsrf": xsrf})
        if r.status_code != 302 or "jupyterhub-session-id" not in self.http.cookies:
            raise RuntimeError(f"login of {user} failed: HTTP {r.status_code}")
        self.landing = r.headers["location"]  # where the hub sends them after login

    def api(self, method: str, path: str, **kw: Any) -> httpx.Response:
        headers = {"X-XSRFToken": self.http.cookies.get("_xsrf", "")}
        return self.http.request(method, f"/hub/api{path}", headers=headers, **kw)

    def token(self, scopes: list[str] | None = None, expires_in: int | None = None
              ) -> tuple[str, str]:
        """A new API token of this user: (token, token id)."""
        body: dict[str, Any] = {"note": "bulle test"}
        if scopes is not None:
            body["scopes"] = scopes
        if expires_in is not None:
            body["expires_in"] = expires_in
        r = self.api("POST", f"/users/{self.user}/tokens", json=body)
        r.raise_for_status()
        return r.json()["token"], r.json()["id"]

    def revoke(self, token_id: str) -> None:
        self.api("DELETE", f"/users/{self.user}/tokens/{token_id}").raise_for_status()

    def close(self) -> None:
        self.http.close()


def start_server(hub_url: str, user: str, token: str, timeout: float = 120) -> None:
    """Start ``user``'s default server through the hub's API (with one of their tokens) and
    wait until the hub says it is ready (already running is fine)."""
    api = httpx.Client(base_url=f"{hub_url.rstrip('/')}/hub/api", timeout=60,
                       headers={"Authorization": f"token {token}"})
    with api:
        r = api.post(f"/users/{user}/server")
        if r.status_code not in (201, 202, 400):
            r.raise_for_status()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            server = api.get(f"/users/{user}").json().get("servers", {}).get("")
            if server and server.get("ready"):
                return
            time.sleep(0.5)
    raise TimeoutError(f"the server of {user} was not ready within {timeout:g} s")


def run_in_kernel(hub_url: str, user: str, token: str, code: str, timeout: float = 120
                  ) -> str:
    """Run ``code`` in a new kernel of ``user``'s running server (through the hub's proxy,
    the kernel websocket as JupyterLab uses it) and return what it printed."""
    base = f"{hub_url.rstrip('/')}/user/{user}/api/kernels"
    headers = {"Authorization": f"token {token}"}
    r = httpx.post(base, headers=headers, json={"name": "python3"}, timeout=60)
    r.raise_for_status()
    kernel = r.json()["id"]
    try:
        url = base.replace("http", "ws", 1) + f"/{kernel}/channels"
        return asyncio.run(_execute(url, headers, code, timeout))
    finally:
        httpx.delete(f"{base}/{kernel}", headers=headers, timeout=60)


async def _execute(url: str, headers: dict[str, str], code: str, timeout: float) -> str:
    from tornado.httpclient import HTTPRequest
    from tornado.websocket import websocket_connect

    conn = await websocket_connect(HTTPRequest(url, headers=headers))
    msg_id, out = uuid.uuid4().hex, []
    conn.write_message(json.dumps({
        "header": {"msg_id": msg_id, "msg_type": "execute_request", "username": "test",
                   "session": uuid.uuid4().hex, "version": "5.3", "date": ""},
        "parent_header": {}, "metadata": {}, "channel": "shell", "buffers": [],
        "content": {"code": code, "silent": False, "store_history": False,
                    "user_expressions": {}, "allow_stdin": False, "stop_on_error": True}}))
    try:
        while True:
            raw = await asyncio.wait_for(conn.read_message(), timeout)
            if raw is None:
                raise RuntimeError("the kernel's websocket closed")
            if isinstance(raw, bytes):
                continue
            msg = json.loads(raw)
            if msg.get("parent_header", {}).get("msg_id") != msg_id:
                continue
            kind, content = msg["msg_type"], msg["content"]
            if kind == "stream":
                out.append(content["text"])
            elif kind == "error":
                raise RuntimeError("\n".join(content["traceback"]))
            elif kind == "status" and content["execution_state"] == "idle":
                return "".join(out)
    finally:
        conn.close()
