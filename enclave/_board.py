"""``bulle board …`` and ``bulle audit …``: the ethics board's tools.

- ``keygen``: the board's Ed25519 key pair (the private key never leaves the board);
- ``grant``: sign a project's grant (who, which datasets, ε/δ, expiry, purpose);
- ``show``: print and verify a grant;
- ``list``, ``approve``, ``refuse``, ``export``: the dashboard's twin, over the coordinator's
  HTTP API (``--url``/``--token``, default ``BULLE_URL`` and ``BULLE_TOKEN`` or
  ``JUPYTERHUB_API_TOKEN``: a hub token with ``custom:bulle:approve`` or ``…:audit``);
- ``audit verify``: check a hash-chained audit log (node or coordinator) entry by entry.
"""

from __future__ import annotations

import argparse
import json
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path


def board_main(argv: list[str]) -> int:
    from privacy import Grant, GrantError, generate_board_keys, sign_grant, verify_grant

    parser = argparse.ArgumentParser(prog="bulle board")
    sub = parser.add_subparsers(dest="cmd", required=True)
    kg = sub.add_parser("keygen", help="create the board's key pair")
    kg.add_argument("--out", type=Path, required=True)
    g = sub.add_parser("grant", help="sign a project's grant")
    g.add_argument("--key", type=Path, required=True, help="the board's private key (PEM)")
    g.add_argument("--project", required=True)
    g.add_argument("--researcher", action="append", required=True)
    g.add_argument("--dataset", action="append", required=True)
    g.add_argument("--epsilon", type=float, required=True)
    g.add_argument("--delta", type=float, default=1e-6)
    g.add_argument("--days", type=float, default=365.0, help="validity (RGPD retention)")
    g.add_argument("--purpose", required=True)
    g.add_argument("--out", type=Path, help="write the token here (default: stdout)")
    s = sub.add_parser("show", help="verify and print a grant")
    s.add_argument("grant", type=Path)
    s.add_argument("--public-key", type=Path, required=True)
    _remote_parsers(sub)
    args = parser.parse_args(argv[1:])
    if args.cmd in _REMOTE:
        return _remote(args)
    try:
        if args.cmd == "keygen":
            private, public = generate_board_keys(args.out)
            print(f"board private key: {private} (keep it offline)\nboard public key:  {public}"
                  " (give it to every node and the coordinator)")
            return 0
        if args.cmd == "grant":
            now = datetime.now(UTC)
            grant = Grant(args.project, tuple(args.researcher), tuple(args.dataset),
                          args.epsilon, args.delta, now + timedelta(days=args.days),
                          args.purpose, now)
            token = sign_grant(grant, args.key.read_bytes())
            if args.out:
                args.out.write_text(token + "\n")
                print(f"grant for {args.project} written to {args.out}")
            else:
                print(token)
            return 0
        grant = verify_grant(args.grant.read_text().strip(), args.public_key.read_bytes())
        print(json.dumps({**grant.__dict__, "expires": grant.expires.isoformat(),
                          "issued": grant.issued.isoformat()}, indent=2))
        return 0
    except (GrantError, ValueError, OSError) as e:
        print(f"bulle board: {e}", file=sys.stderr)
        return 2


_REMOTE = ("list", "approve", "refuse", "export")


def _remote_parsers(sub: argparse._SubParsersAction) -> None:
    def common(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
        p.add_argument("--url", help="coordinator URL (default $BULLE_URL)")
        p.add_argument("--token", help="hub token (default $BULLE_TOKEN or "
                       "$JUPYTERHUB_API_TOKEN)")
        return p

    ls = common(sub.add_parser("list", help="projects and their status"))
    ls.add_argument("--status", choices=["pending", "approved", "refused", "expired"])
    ls.add_argument("--json", action="store_true")
    ap = common(sub.add_parser("approve", help="approve (or amend) a project"))
    ap.add_argument("project")
    ap.add_argument("--epsilon", type=float, help="amend: the ε granted")
    ap.add_argument("--delta", type=float)
    ap.add_argument("--days", type=float, help="amend: validity from today")
    ap.add_argument("--dataset", action="append", help="amend: datasets granted")
    ap.add_argument("--reason", default="")
    ap.add_argument("--grant", type=Path, help="a grant signed offline (`bulle board grant`)")
    rf = common(sub.add_parser("refuse", help="refuse a project, with the reason"))
    rf.add_argument("project")
    rf.add_argument("--reason", required=True)
    ex = common(sub.add_parser("export", help="projects, budgets, datasets or releases"))
    ex.add_argument("--format", choices=["csv", "json"], default="csv")
    ex.add_argument("--table", choices=["projects", "budgets", "datasets", "releases"],
                    default="releases")
    ex.add_argument("--out", type=Path, help="file (default: stdout)")


def _remote(args: argparse.Namespace) -> int:
    import os

    import httpx

    url = args.url or os.environ.get("BULLE_URL")
    token = args.token or os.environ.get("BULLE_TOKEN") or os.environ.get(
        "JUPYTERHUB_API_TOKEN")
    if not url or not token:
        print("bulle board: pass --url and --token (or set BULLE_URL and BULLE_TOKEN)",
              file=sys.stderr)
        return 2
    http = httpx.Client(base_url=url.rstrip("/"), timeout=60,
                        headers={"Authorization": f"Bearer {token}"})
    try:
        if args.cmd == "list":
            r = http.get("/v1/projects", params={"status": args.status} if args.status else None)
        elif args.cmd == "export":
            r = http.get("/v1/board/export", params={"format": args.format,
                                                      "table": args.table})
        else:
            body: dict = {"decision": "refuse" if args.cmd == "refuse" else "approve",
                          "reason": args.reason}
            if args.cmd == "approve":
                body.update({k: v for k, v in (("epsilon", args.epsilon), ("delta", args.delta),
                                                ("days", args.days), ("datasets", args.dataset))
                             if v is not None})
                if args.grant:
                    body["grant"] = args.grant.read_text().strip()
            r = http.post(f"/v1/projects/{args.project}/decision", json=body)
    except httpx.HTTPError as e:
        print(f"bulle board: coordinator unreachable ({e})", file=sys.stderr)
        return 1
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


def audit_main(argv: list[str]) -> int:
    from privacy import AuditLog

    parser = argparse.ArgumentParser(prog="bulle audit")
    sub = parser.add_subparsers(dest="cmd", required=True)
    v = sub.add_parser("verify", help="check a hash-chained audit log")
    v.add_argument("log", type=Path, nargs="+", help="audit.sqlite file(s)")
    args = parser.parse_args(argv[1:])
    bad = 0
    for path in args.log:
        if not path.is_file():
            print(f"✘ {path}: no such audit log")
            bad += 1
            continue
        report = AuditLog(path).verify()
        if report.ok:
            print(f"✔ {path}: {report.entries} entries, chain intact")
        else:
            bad += 1
            print(f"✘ {path}: broken at entry {report.first_bad_seq}: {report.reason}")
    return 1 if bad else 0
