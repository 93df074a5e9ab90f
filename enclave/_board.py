"""``bulle board …`` and ``bulle audit …``: the ethics board's tools.

- ``keygen``: the board's Ed25519 key pair (the private key never leaves the board);
- ``grant``: sign a project's grant (who, which datasets, ε/δ, expiry, purpose);
- ``show``: print and verify a grant;
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
    args = parser.parse_args(argv[1:])
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
