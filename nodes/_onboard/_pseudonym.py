"""Pseudonyms: HMAC-SHA256 of the normalised value under the trusted third party's key."""

from __future__ import annotations

import hashlib
import hmac
import os
import unicodedata
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc

from nodes._onboard._spec import IngestError, PseudonymSpec


def _normalise(value: str) -> str:
    return " ".join(unicodedata.normalize("NFC", value).split()).casefold()


def pseudonym(key: bytes, value: str, length: int = 32) -> str | None:
    """The pseudonym of one identifier value (None for an empty one)."""
    norm = _normalise(value)
    if not norm:
        return None
    return hmac.new(key, norm.encode("utf-8"), hashlib.sha256).hexdigest()[:length]


def key_fingerprint(key: bytes) -> str:
    """Names a key without revealing it (an HMAC of a constant): detects a key change."""
    return hmac.new(key, b"bulle pseudonymisation key id", hashlib.sha256).hexdigest()[:16]


def _load_key(spec: PseudonymSpec, data_dir: Path, where: str) -> bytes:
    if spec.key_file is not None:
        if spec.key_file.resolve().is_relative_to(data_dir.resolve()):
            raise IngestError(f"{where}: the pseudonymisation key must not be kept with the "
                              f"data (it is under data_dir: {spec.key_file})")
        try:
            key = spec.key_file.read_bytes().strip()
        except OSError as e:
            raise IngestError(f"{where}: cannot read the pseudonymisation key file "
                              f"{spec.key_file}: {e.strerror}; refusing to ingest") from None
    else:
        key = os.environ.get(spec.key_env, "").strip().encode()
        if not key:
            raise IngestError(f"{where}: environment variable {spec.key_env} (the "
                              "pseudonymisation key) is not set; refusing to ingest")
    if len(key) < 16:
        raise IngestError(f"{where}: the pseudonymisation key is shorter than 16 bytes")
    return key


def _pseudonymise(values: pa.ChunkedArray, key: bytes, length: int) -> pa.ChunkedArray:
    # HMAC once per distinct value, then a vectorised lookup
    text = pc.cast(values, pa.string())
    distinct = pc.unique(text)
    mapped = pa.array([None if v is None else pseudonym(key, v, length)
                       for v in distinct.to_pylist()], pa.string())
    return pc.take(mapped, pc.index_in(text, value_set=distinct))
