from __future__ import annotations

import base64
import json
import os
import stat
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from privacy import Grant, GrantError, generate_board_keys, sign_grant, verify_grant
from privacy._grants import load_private_key

NOW = datetime(2026, 11, 25, 12, 0, tzinfo=UTC)


def make_grant(**kw: object) -> Grant:
    base: dict[str, object] = dict(
        project="reading-gaps",
        researchers=("alice@uni.example", "bob@uni.example"),
        datasets=("region_north.pupils", "vendor_a.scores"),
        epsilon=2.5,
        delta=1e-6,
        expires=NOW + timedelta(days=90),
        purpose="Effect of class size on reading — élèves de CM1",
        issued=NOW - timedelta(days=1),
    )
    base.update(kw)
    return Grant(**base)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return generate_board_keys(tmp_path_factory.mktemp("board"))


def b64(b: bytes) -> str:
    return base64.urlsafe_b64encode(b).rstrip(b"=").decode()


def unb64(s: str) -> bytes:
    return base64.urlsafe_b64decode(s + "=" * (-len(s) % 4))


def code_of(token: str, pub: object, now: datetime = NOW) -> str:
    with pytest.raises(GrantError) as exc:
        verify_grant(token, pub, now=now)  # type: ignore[arg-type]
    return exc.value.code


def test_keys_files_and_modes(keys: tuple[Path, Path]) -> None:
    priv, pub = keys
    assert stat.S_IMODE(os.stat(priv).st_mode) == 0o600
    assert b"PRIVATE KEY" in priv.read_bytes() and b"PUBLIC KEY" in pub.read_bytes()
    with pytest.raises(FileExistsError):
        generate_board_keys(priv.parent)  # never overwrite a board key


def test_round_trip(keys: tuple[Path, Path]) -> None:
    priv, pub = keys
    g = make_grant()
    token = sign_grant(g, priv)
    assert verify_grant(token, pub, now=NOW) == g
    assert verify_grant(token, pub.read_bytes(), now=NOW) == g
    p64, s64 = token.split(".")
    assert len(unb64(s64)) == 64 and "=" not in token
    assert json.loads(unb64(p64))["epsilon"] == 2.5


def test_bad_signature(keys: tuple[Path, Path]) -> None:
    priv, pub = keys
    p64, s64 = sign_grant(make_grant(), priv).split(".")
    sig = bytearray(unb64(s64))
    sig[10] ^= 0x01
    assert code_of(f"{p64}.{b64(bytes(sig))}", pub) == "bad_signature"


def test_tampered_payload(keys: tuple[Path, Path]) -> None:
    priv, pub = keys
    p64, s64 = sign_grant(make_grant(), priv).split(".")
    data = json.loads(unb64(p64))
    data["epsilon"] = 25.0  # canonical re-encoding, signature kept
    forged = json.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    with pytest.raises(GrantError, match="payload altered") as exc:
        verify_grant(f"{b64(forged.encode())}.{s64}", pub, now=NOW)
    assert exc.value.code == "bad_signature"


def test_expired_and_not_yet_valid(keys: tuple[Path, Path]) -> None:
    priv, pub = keys
    token = sign_grant(make_grant(), priv)
    assert code_of(token, pub, now=NOW + timedelta(days=90)) == "expired"
    assert code_of(token, pub, now=NOW - timedelta(days=2)) == "not_yet_valid"


def test_wrong_key(keys: tuple[Path, Path]) -> None:
    priv, _ = keys
    other = Ed25519PrivateKey.generate().public_key()
    with pytest.raises(GrantError, match="this node trusts") as exc:
        verify_grant(sign_grant(make_grant(), priv), other, now=NOW)
    assert exc.value.code == "wrong_key"


@pytest.mark.parametrize(
    "mangle",
    [
        lambda t: t.replace(".", ""),  # one part
        lambda t: t + ".x",  # three parts
        lambda t: "!!!" + t,  # not base64url
        lambda t: t.split(".")[0] + "." + b64(b"short"),  # signature not 64 bytes
        lambda t: b64(b"not json") + "." + t.split(".")[1],
        lambda t: b64(b"[1, 2]") + "." + t.split(".")[1],
        lambda t: "",
    ],
)
def test_malformed(keys: tuple[Path, Path], mangle) -> None:  # type: ignore[no-untyped-def]
    priv, pub = keys
    assert code_of(mangle(sign_grant(make_grant(), priv)), pub) == "malformed"


def test_signed_but_non_canonical_or_invalid_payload(keys: tuple[Path, Path]) -> None:
    # Even a payload the board's key really signed is refused if it is not canonical or
    # lacks fields (e.g. produced by another tool).
    priv, pub = keys
    key = load_private_key(priv)
    good = json.loads(unb64(sign_grant(make_grant(), priv).split(".")[0]))
    no_datasets = {k: v for k, v in good.items() if k != "datasets"}
    canonical = json.dumps(no_datasets, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    for payload in (json.dumps(good, indent=1).encode(), canonical.encode()):
        token = f"{b64(payload)}.{b64(key.sign(payload))}"
        assert code_of(token, pub) == "malformed"


def test_grant_validation() -> None:
    with pytest.raises(ValueError):
        make_grant(epsilon=0.0)
    with pytest.raises(ValueError):
        make_grant(expires=datetime(2027, 1, 1))  # naive datetime
    with pytest.raises(ValueError):
        make_grant(researchers=[])
