"""``bulle demo up|down|env|status|add-node`` — the one-command demo federation."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def main(argv: list[str]) -> int:
    from bulle_demo import EXAMPLE, NODES, Demo

    parser = argparse.ArgumentParser(prog="bulle demo")
    parser.add_argument("action", choices=["up", "down", "env", "status", "add-node"])
    parser.add_argument("config", nargs="?", type=Path,
                        help="add-node: the new node's config (like bulle_demo/nodes/*.toml)")
    parser.add_argument("--state", type=Path,
                        help="state folder (default $BULLE_DEMO_STATE or ./.bulle-demo)")
    parser.add_argument("--data", type=Path,
                        help="the open-data folder (default $BULLE_DATA or ../shared/data)")
    args = parser.parse_args(argv[1:])
    demo = Demo(args.state, args.data)
    if args.action == "down":
        demo.down()
        return 0
    if args.action == "env":
        print(demo.env_lines())
        return 0
    if args.action == "add-node":
        if args.config is None:
            parser.error("add-node needs the node's config file")
        try:
            demo.add_node(args.config)
        except RuntimeError as e:
            print(f"bulle demo add-node: {e}", file=sys.stderr)
            return 1
        return 0
    if args.action == "status":
        running = demo.running()
        for name in (*demo.node_ids(), "coordinator", "hub"):
            state = f"running (pid {running[name]})" if name in running else "stopped"
            print(f"{name:<12} {state}")
        return 0 if demo.healthy() else 1
    try:
        info = demo.up()
    except RuntimeError as e:
        print(f"bulle demo: {e}", file=sys.stderr)
        return 1
    print(f"""
Bulle demo federation is up: {len(NODES)} nodes on real open data, \
started in {info['started_in_s']} s.
  coordinator API   {info['url']}   (interactive docs: {info['url']}/docs)
  researcher        {info['researcher']} (project {info['project']})
  token             {info['state']}/researcher.token
  logs              {info['state']}/logs/
  processes         {info.get('processes', '')}

Try it (paste into your shell):
  eval "$(.venv/bin/bulle demo env)"
  .venv/bin/python -c "from enclave import connect; print(connect().sql(\\"{EXAMPLE}\\"))"

Stop everything with: .venv/bin/bulle demo down
""")
    _print_hub(info)
    return 0


def _print_hub(info: dict) -> None:
    """The hub's URL and the demo accounts; passwords only when just generated."""
    if not info.get("hub_url"):
        return
    passwords = info.get("passwords") or {}
    home = f"{info['hub_url']}/services/bulle/"
    print(f"JupyterHub          {info['hub_url']}")
    print(f"Bulle home          {home}   (catalogue {home}catalog/, ethics board "
          f"{home}board/, node pages {home}operator/)")
    print(f"Standing indicators {home}indicators/   (observers land there)")
    for name, role in info.get("accounts", {}).items():
        secret = passwords.get(name, "(printed at first start)")
        print(f"  {role:<14} {name:<17} password {secret}")
    if passwords:
        print("  These passwords are shown once (only their hashes are kept); to reset them:\n"
              f"  bulle demo down && rm {info['state']}/hub/users.json && bulle demo up")
    print("In a notebook: from enclave import connect; hub = connect()  "
          "(examples in ~/examples)")
