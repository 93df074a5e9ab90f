"""Files generated from the error-code catalogue (``federation._errors.ERROR_CODES``):
``enclave/_error_hints.py`` (the SDK's hints: a data module with no imports, so a notebook
loads no coordinator code) and ``docs/errors.md``. ``python -m federation._errordocs`` (or
``make errors``) writes them; tests/unit/test_error_codes.py fails when they are stale."""

from __future__ import annotations

import json
from pathlib import Path

from federation._errors import ERROR_CODES

ROOT = Path(__file__).resolve().parents[1]
HINTS_FILE = ROOT / "enclave" / "_error_hints.py"
DOCS_FILE = ROOT / "docs" / "errors.md"


def render_hints() -> str:
    entries = "".join(f"    {json.dumps(c)}: {json.dumps(e.hint, ensure_ascii=False)},\n"
                      for c, e in sorted(ERROR_CODES.items()) if e.hint)
    return ('"""Hints shown under a BulleError, by code. Generated from federation/_errors.py '
            "by\n`python -m federation._errordocs`: do not edit.\"\"\"\n"
            "# ruff: noqa: E501\n\n"
            f"HINTS: dict[str, str] = {{\n{entries}}}\n")


def render_markdown() -> str:
    lines = ["# Error codes", "",
             "Every refusal or failure the coordinator's API returns, and every error the SDK "
             "raises, carries one of these codes (`{\"error\": {\"code\", \"message\"}}` in "
             "the API, `BulleError.code` in a notebook). Messages never carry anything about "
             "one person.", "",
             "Generated from `federation/_errors.py` by `python -m federation._errordocs`: "
             "do not edit.", "",
             "| code | HTTP status | meaning | what to do |", "|---|---|---|---|"]
    for e in ERROR_CODES.values():
        status = str(e.status) if e.status else "— (SDK or record)"
        lines.append(f"| `{e.code}` | {status} | {e.meaning} | {e.hint} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    HINTS_FILE.write_text(render_hints(), encoding="utf-8")
    DOCS_FILE.write_text(render_markdown(), encoding="utf-8")
    print(f"wrote {HINTS_FILE.relative_to(ROOT)} and {DOCS_FILE.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
