"""``bulle board …`` and ``bulle audit …``: the ethics board's tools.

- ``keygen``: the board's Ed25519 key pair (the private key never leaves the board);
- ``grant``: sign a project's grant (who, which datasets, ε/δ, expiry, purpose);
- ``show``: print and verify a grant (the board's public key from ``--public-key``, else
  from a coordinator or node config: ``--config``, else the demo's ``coordinator.toml``);
- ``list``, ``approve``, ``refuse``, ``export``: the dashboard's twin, over the coordinator's
  HTTP API (``--url``, default ``BULLE_URL``). Credential: the board's own private key
  (``--key`` or ``BULLE_BOARD_KEY``): each request is signed with it and the coordinator
  checks it against its ``board_public_key`` (no hub login, no notebook server); with
  ``--key``, ``approve`` also signs the grant here, so the key never leaves the board.
  Or a hub token with ``custom:bulle:approve`` or ``…:audit`` (``--token``, default
  ``BULLE_TOKEN`` or ``JUPYTERHUB_API_TOKEN``);
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
    s.add_argument("--public-key", type=Path,
                   help="the board's public key (default: board_public_key of --config)")
    s.add_argument("--config", type=Path, help="a coordinator or node config naming it "
                   "(default: the demo's coordinator.toml)")
    _remote_parsers(sub)
    args = parser.parse_args(argv[1:])
    if args.cmd in _REMOTE:
        from enclave._boardremote import remote  # httpx: not on a SQL-only node

        return remote(args)
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
        public_key = args.public_key or _public_key_from_config(args.config)
        grant = verify_grant(args.grant.read_text().strip(), public_key.read_bytes())
        print(json.dumps({**grant.__dict__, "expires": grant.expires.isoformat(),
                          "issued": grant.issued.isoformat()}, indent=2))
        return 0
    except (GrantError, ValueError, OSError) as e:
        print(f"bulle board: {e}", file=sys.stderr)
        return 2


_REMOTE = ("list", "approve", "refuse", "export")


def _public_key_from_config(config: Path | None) -> Path:
    """``board_public_key`` of a coordinator or node config (relative to the file, with
    ``${VAR}`` expanded), the demo's coordinator config when none is given."""
    import os
    import re
    import tomllib

    if config is None:
        state = Path(os.environ.get("BULLE_DEMO_STATE") or ".bulle-demo")
        config = state / "coordinator.toml"
        if not config.is_file():
            raise ValueError("pass --public-key or --config (a coordinator or node config "
                             "with board_public_key)")
    raw = tomllib.loads(config.read_text()).get("board_public_key")
    if not isinstance(raw, str):
        raise ValueError(f"{config}: no board_public_key")
    path = Path(re.sub(r"\$\{(\w+)\}", lambda m: os.environ.get(m.group(1), ""), raw))
    return path if path.is_absolute() else config.parent / path


def _remote_parsers(sub: argparse._SubParsersAction) -> None:
    def common(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
        p.add_argument("--url", help="coordinator URL (default $BULLE_URL)")
        p.add_argument("--key", type=Path, help="the board's private key: sign each request "
                       "with it, no hub token needed (default $BULLE_BOARD_KEY)")
        p.add_argument("--token", help="or a hub token (default $BULLE_TOKEN or "
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
