"""Atomic, locked writes under data_dir: temporary file, fsync, rename, fsync of the folder."""

from __future__ import annotations

import contextlib
import fcntl
import os
import secrets
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import BinaryIO

from nodes._config import DatasetConfig
from nodes._onboard._spec import IngestError


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_temp(target: Path, write: Callable[[BinaryIO], None]) -> Path:
    """Write next to ``target`` under a temporary name, fsynced; the caller renames it."""
    tmp = target.with_name(f".{target.stem}.{secrets.token_hex(6)}.tmp{target.suffix}")
    try:
        with tmp.open("xb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return tmp


def _publish(tmp: Path, target: Path) -> None:
    os.replace(tmp, target)  # atomic on POSIX: readers see the old or the new file
    _fsync_dir(target.parent)


def atomic_write(target: Path, data: bytes) -> None:
    _publish(_write_temp(target, lambda f: f.write(data)), target)


def outputs(ds: DatasetConfig) -> tuple[Path, Path, Path]:
    """(Parquet, quality report, manifest) of an ingested dataset."""
    parquet = ds.source[0]
    return (parquet, parquet.with_name(parquet.stem + ".quality.json"),
            parquet.with_name(parquet.stem + ".manifest.json"))


@contextlib.contextmanager
def _locked(data_dir: Path, table: str) -> Iterator[None]:
    with (data_dir / f".{table}.lock").open("a") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise IngestError("another ingest of this dataset is running") from None
        yield
