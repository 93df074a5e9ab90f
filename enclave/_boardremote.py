"""``bulle board list|approve|refuse|export``: the board's decisions over the coordinator's
HTTP API, with the board's own key (each request signed, ``privacy.sign_board_request``) or
a hub token. See ``enclave/_board.py`` for the commands."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx


def remote(args: argparse.Namespace) -> int:
    import os

    url = args.url or os.environ.get("BULLE_URL")
    key = args.key or (None if args.token else _env_path("BULLE_BOARD_KEY"))
    token = args.token or os.environ.get("BULLE_TOKEN") or os.environ.get(
        "JUPYTERHUB_API_TOKEN")
    if not url or not (key or token):
        print("bulle board: pass --url and --key (the board's private key) or --token "
              "(or set BULLE_URL and BULLE_BOARD_KEY or BULLE_TOKEN)", file=sys.stderr)
        return 2
    try:
        auth: httpx.Auth = _SignedByBoard(key.read_bytes()) if key else _Bearer(str(token))
    except OSError as e:
        print(f"bulle board: {e}", file=sys.stderr)
        return 2
    http = httpx.Client(base_url=url.rstrip("/"), timeout=60, auth=auth)
    try:
        if args.cmd == "approve" and key and not args.grant:
            r = _approve_signed_here(http, args, key.read_bytes())
        else:
            r = _request(http, args)
    except httpx.HTTPError as e:
        print(f"bulle board: coordinator unreachable ({e})", file=sys.stderr)
        return 1
    except (ValueError, KeyError) as e:
        print(f"bulle board: {e}", file=sys.stderr)
        return 1
    return _print_answer(args, r)


def _env_path(name: str) -> Path | None:
    import os

    value = os.environ.get(name)
    return Path(value) if value else None


class _Bearer(httpx.Auth):
    def __init__(self, token: str) -> None:
        self.token = token

    def auth_flow(self, request: httpx.Request) -> Iterator[httpx.Request]:
        request.headers["Authorization"] = f"Bearer {self.token}"
        yield request


class _SignedByBoard(httpx.Auth):
    """Each request signed with the board's key: method, raw path and query, body."""

    requires_request_body = True

    def __init__(self, private_key: bytes) -> None:
        self.private_key = private_key

    def auth_flow(self, request: httpx.Request) -> Iterator[httpx.Request]:
        from privacy import BOARD_REQUEST_SCHEME, sign_board_request

        token = sign_board_request(self.private_key, request.method,
                                   request.url.raw_path.decode("ascii"), request.content)
        request.headers["Authorization"] = f"{BOARD_REQUEST_SCHEME} {token}"
        yield request


def _approve_signed_here(http: httpx.Client, args: argparse.Namespace, key: bytes
                         ) -> httpx.Response:
    """Approve with a grant signed here from the project as submitted (and the amendments
    given): the coordinator only verifies it, as the nodes will."""
    from privacy import Grant, sign_grant

    r = http.get(f"/v1/projects/{args.project}")
    if r.status_code >= 400:
        return r
    p = r.json()
    now = datetime.now(UTC)
    days = args.days if args.days is not None else float(p["duration_days"])
    grant = Grant(p["name"], tuple(p["team"]), tuple(sorted(args.dataset or p["datasets"])),
                  float(args.epsilon if args.epsilon is not None else p["epsilon"]),
                  float(args.delta if args.delta is not None else p["delta"]),
                  now + timedelta(days=days), p["purpose"], now)
    body: dict = {"decision": "approve", "reason": args.reason, "grant": sign_grant(grant, key)}
    if args.days is not None:
        body["days"] = args.days
    return http.post(f"/v1/projects/{args.project}/decision", json=body)


def _request(http: httpx.Client, args: argparse.Namespace) -> httpx.Response:
    if args.cmd == "list":
        return http.get("/v1/projects", params={"status": args.status} if args.status else None)
    if args.cmd == "export":
        return http.get("/v1/board/export", params={"format": args.format,
                                                     "table": args.table})
    body: dict = {"decision": "refuse" if args.cmd == "refuse" else "approve",
                  "reason": args.reason}
    if args.cmd == "approve":
        body.update({k: v for k, v in (("epsilon", args.epsilon), ("delta", args.delta),
                                        ("days", args.days), ("datasets", args.dataset))
                     if v is not None})
        if args.grant:
            body["grant"] = args.grant.read_text().strip()
    return http.post(f"/v1/projects/{args.project}/decision", json=body)


def _print_answer(args: argparse.Namespace, r: httpx.Response) -> int:
    if r.status_code >= 400:
        try:
            err = r.json().get("error", {})
            message = f"{err.get('code')}: {err.get('message')}"
        except ValueError:
            message = r.text[:200]
        print(f"bulle board: HTTP {r.status_code}: {message}", file=sys.stderr)
        return 1
    if args.cmd == "export":
        if args.out:
            args.out.write_bytes(r.content)
            print(f"{args.table} written to {args.out}")
        else:
            sys.stdout.write(r.text)
        return 0
    if args.cmd == "list":
        projects = r.json()["projects"]
        if args.json:
            print(json.dumps(projects, indent=2))
            return 0
        print(f"{'project':<24} {'status':<9} {'ε asked':>8} {'ε granted':>9}  expires     "
              "team")
        for p in projects:
            granted = "" if p["granted_epsilon"] is None else f"{p['granted_epsilon']:g}"
            print(f"{p['name']:<24} {p['status']:<9} {p['epsilon']:>8g} {granted:>9}  "
                  f"{(p['expires_at'] or '')[:10]:<10}  {', '.join(p['team'])}")
        return 0
    p = r.json()
    print(f"{p['name']}: {p['status']}" + (f" (ε {p['granted_epsilon']:g}, expires "
                                            f"{p['expires_at'][:10]})"
                                            if p["status"] == "approved" else
                                            f" — {p['reason']}"))
    return 0
