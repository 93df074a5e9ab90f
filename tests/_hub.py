"""Helpers for tests against a real JupyterHub: log in with a password, make and revoke
tokens through the hub's REST API, as a person would from the token page."""

from __future__ import annotations

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
