"""Who is calling: the coordinator's bearer tokens, or JupyterHub tokens with their scopes.

The coordinator is a JupyterHub *service*. A hub token is checked by asking the hub who
owns it (``GET {hub}/api/user`` with the token itself: the hub answers with the user and
the token's own scopes, already narrowed to what the user holds), cached for
``HubConfig.cache_s`` seconds so a notebook's burst of calls costs one round trip. A
revoked or expired token is refused once its cache entry ages out.

Browsers (the ethics-board dashboard) log in with the hub's OAuth: the service's own API
token is its OAuth client secret; the access token obtained is kept server-side, behind a
random session cookie.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlencode

import httpx

from federation._config import HubConfig, Researcher

SCOPE_QUERY = "custom:bulle:query"  # catalogue, federated SQL, own projects and budget
SCOPE_TRAIN = "custom:bulle:train"  # DP training runs (Flower)
SCOPE_APPROVE = "custom:bulle:approve"  # decide projects (the ethics board)
SCOPE_AUDIT = "custom:bulle:audit"  # read the audit chain, releases and spend
SCOPE_OBSERVE = "custom:bulle:observe"  # read standing indicators (no query rights)
SCOPE_METRICS = "custom:bulle:metrics"  # scrape /metrics (Prometheus), nothing else
ALL_SCOPES = (SCOPE_QUERY, SCOPE_TRAIN, SCOPE_APPROVE, SCOPE_AUDIT, SCOPE_OBSERVE,
              SCOPE_METRICS)
# What a token from the coordinator's own config may do: it names a researcher.
CONFIG_TOKEN_SCOPES = frozenset({SCOPE_QUERY, SCOPE_TRAIN})
_CACHE_MAX = 10_000


class HubUnavailable(RuntimeError):
    """The hub could not be asked (down, or answered nonsense)."""


@dataclass(frozen=True)
class Caller:
    """An authenticated caller: a name, what their token may do, the projects they're in."""

    name: str
    scopes: frozenset[str]
    via: str  # "config" (coordinator bearer token) | "hub"
    config_projects: tuple[str, ...] = ()

    def can(self, *any_of: str) -> bool:
        return any(s in self.scopes for s in any_of)

    def researcher(self, registry_projects: tuple[str, ...] = ()) -> Researcher:
        """The query-side identity: config projects first, then the registry's."""
        projects = tuple(dict.fromkeys((*self.config_projects, *registry_projects)))
        return Researcher(self.name, "", projects)


class HubAuth:
    def __init__(self, config: HubConfig) -> None:
        self.config = config
        self._http = httpx.Client(timeout=10.0)
        self._cache: OrderedDict[str, tuple[float, dict[str, Any]]] = OrderedDict()
        self._lock = threading.Lock()
        self._sessions: dict[str, tuple[float, str]] = {}  # session id → (created, token)
        self._secret = secrets.token_bytes(32)  # CSRF tokens; sessions die with the process

    def close(self) -> None:
        self._http.close()

    # -- tokens -------------------------------------------------------------------------
    def identify(self, token: str) -> Caller | None:
        """The hub user owning ``token`` with the token's scopes, or None if refused."""
        model = self._user_model(token)
        if model is None or model.get("kind", "user") != "user" or not model.get("name"):
            return None  # services and unknown tokens are not researchers
        return Caller(str(model["name"]), frozenset(model.get("scopes") or ()), "hub")

    def _user_model(self, token: str) -> dict[str, Any] | None:
        key = hashlib.sha256(token.encode()).hexdigest()
        now = time.monotonic()
        with self._lock:
            hit = self._cache.get(key)
            if hit and now - hit[0] < self.config.cache_s:
                return hit[1]
        try:
            r = self._http.get(f"{self.config.api_url}/user",
                               headers={"Authorization": f"token {token}"})
        except httpx.HTTPError as e:
            raise HubUnavailable(f"the hub is unreachable ({type(e).__name__})") from None
        if r.status_code in (401, 403, 404):
            with self._lock:
                self._cache.pop(key, None)
            return None  # refusals are not cached: a new token works at once
        if r.status_code != 200:
            raise HubUnavailable(f"the hub answered HTTP {r.status_code}")
        model = r.json()
        with self._lock:
            self._cache[key] = (now, model)
            while len(self._cache) > _CACHE_MAX:
                self._cache.popitem(last=False)
        return model

    # -- OAuth (browsers) ---------------------------------------------------------------
    @property
    def client_id(self) -> str:
        return f"service-{self.config.service_name}"

    @property
    def redirect_uri(self) -> str:
        return f"{self.config.public_url}{self.config.prefix}/oauth_callback"

    def authorize_url(self, state: str) -> str:
        query = urlencode({"client_id": self.client_id, "redirect_uri": self.redirect_uri,
                           "response_type": "code", "state": state})
        return f"{self.config.public_url}/hub/api/oauth2/authorize?{query}"

    def token_for_code(self, code: str) -> str | None:
        try:
            r = self._http.post(f"{self.config.api_url}/oauth2/token", data={
                "client_id": self.client_id, "client_secret": self.config.api_token,
                "grant_type": "authorization_code", "code": code,
                "redirect_uri": self.redirect_uri})
        except httpx.HTTPError as e:
            raise HubUnavailable(f"the hub is unreachable ({type(e).__name__})") from None
        return r.json().get("access_token") if r.status_code == 200 else None

    def new_session(self, token: str, max_age_s: float = 8 * 3600) -> str:
        sid = secrets.token_urlsafe(32)
        now = time.monotonic()
        with self._lock:
            self._sessions = {k: v for k, v in self._sessions.items()
                              if now - v[0] < max_age_s}
            self._sessions[sid] = (now, token)
        return sid

    def session_token(self, sid: str | None, max_age_s: float = 8 * 3600) -> str | None:
        if not sid:
            return None
        with self._lock:
            hit = self._sessions.get(sid)
        return hit[1] if hit and time.monotonic() - hit[0] < max_age_s else None

    def end_session(self, sid: str | None) -> None:
        with self._lock:
            self._sessions.pop(sid or "", None)

    def csrf(self, sid: str) -> str:
        return hmac.new(self._secret, sid.encode(), hashlib.sha256).hexdigest()[:32]

    def check_csrf(self, sid: str, value: str) -> bool:
        return hmac.compare_digest(self.csrf(sid), value or "")
