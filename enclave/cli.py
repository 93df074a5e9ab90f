"""``bulle board …``, ``bulle audit …`` and ``bulle receipt …``."""

from __future__ import annotations


def main(argv: list[str]) -> int:
    if argv[0] == "receipt":
        from enclave._receipts import receipt_main

        return receipt_main(argv)
    if argv[0] in ("board", "audit"):
        from enclave._board import audit_main, board_main

        return board_main(argv) if argv[0] == "board" else audit_main(argv)
    raise SystemExit(f"bulle: unknown command {argv[0]!r}")
