"""Release receipts for researchers and anyone else: check one offline.

``verify_receipt(receipt, keys)`` takes a receipt (a dict, a released DataFrame carrying
one, or a JSON file) and the published public keys (``/v1/keys``'s JSON as a dict, a file
holding it, or a mapping owner → PEM); ``bulle receipt verify FILE --keys KEYS`` is the
same from a shell. Format and privacy argument: privacy/_receipts.py.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

from privacy import ReceiptError
from privacy import verify_receipt as _verify


def _load(x: Any) -> Any:
    if isinstance(x, (str, os.PathLike)) and Path(x).is_file():
        return json.loads(Path(x).read_text(encoding="utf-8"))
    return x


def verify_receipt(receipt: Any, keys: Any) -> dict[str, Any]:
    """The signed statement of a valid receipt (its nodes' statements opened); raises
    :class:`ReceiptError` (``code``, ``reason``) when anything was changed or a key is not
    among ``keys``."""
    attrs = getattr(receipt, "attrs", None)
    if isinstance(attrs, dict):  # a released DataFrame
        receipt = (attrs.get("bulle") or {}).get("receipt")
        if receipt is None:
            raise ReceiptError("malformed", "this frame carries no receipt")
    return _verify(_load(receipt), _load(keys))


def save_receipt(receipt: dict[str, Any], path: str | os.PathLike[str]) -> Path:
    """Write a receipt as JSON (what ``bulle receipt verify`` reads)."""
    out = Path(path)
    out.write_text(json.dumps(receipt, indent=1, ensure_ascii=False), encoding="utf-8")
    return out


def receipt_main(argv: list[str]) -> int:
    """``bulle receipt verify FILE --keys KEYS``: 0 valid, 1 invalid (with the reason)."""
    parser = argparse.ArgumentParser(prog="bulle receipt")
    sub = parser.add_subparsers(dest="cmd", required=True)
    verify = sub.add_parser("verify", help="check a receipt offline with published keys")
    verify.add_argument("file", type=Path, help="the receipt (JSON)")
    verify.add_argument("--keys", required=True, type=Path,
                        help="the published public keys: a saved copy of GET /v1/keys")
    args = parser.parse_args(argv[1:])
    try:
        signed = verify_receipt(args.file, args.keys)
    except (ReceiptError, OSError, ValueError, KeyError) as e:
        print(f"receipt INVALID: {getattr(e, 'reason', e)}", file=sys.stderr)
        return 1
    nodes = ", ".join(n["node"] for n in signed["nodes"]) or "none (streamed rows)"
    print(f"receipt valid: query {signed['query']} of project {signed['project']}, "
          f"ε {signed['epsilon']:g}, grant {signed['grant'][:12] or '-'}, "
          f"values {signed['values_sha256'][:12]}, nodes {nodes}")
    return 0
