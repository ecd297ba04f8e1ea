"""Read the metrics of a wandb run logged in offline mode, without wandb's servers.

What wandb 0.31 writes offline (checked by running it): ``<dir>/wandb/offline-run-<time>-<id>/``
with ``run-<id>.wandb`` (the only place the metrics are), ``files/requirements.txt`` and ``logs/``.
No ``wandb-summary.json`` is written until the run is synced; online or synced runs do have
``files/wandb-summary.json``, which is read when present.

The ``.wandb`` file is a LevelDB-style record log: a 7-byte header (``:W&B``, magic 0xBEE1, version),
then 32 KiB blocks of records, each with a 7-byte header (crc32c, little-endian uint16 length, type
1=full 2=first 3=middle 4=last) whose payloads are ``wandb_internal_pb2.Record`` protobufs. History
records hold one logged step (``history.item``: key or nested_key, JSON value).
"""
from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any, Iterator

_BLOCK = 32768
_HEADER = 7


class WandbFileError(ValueError):
    """The ``.wandb`` file is not a wandb record log (or is damaged beyond its first records)."""


def _records(data: bytes) -> Iterator[bytes]:
    if data[:4] != b":W&B":
        raise WandbFileError("not a wandb run file (bad header)")
    pos, pending = _HEADER, b""
    while pos + _HEADER <= len(data):
        left = _BLOCK - pos % _BLOCK
        if left < _HEADER:  # block trailer padding
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + _HEADER])
        pos += _HEADER
        if kind == 0 and length == 0:
            pos += left - _HEADER  # zero padding up to the next block
            continue
        chunk = data[pos:pos + length]
        pos += length
        if len(chunk) < length:  # a run killed while writing: keep what was complete
            return
        if kind == 1:
            yield chunk
        elif kind == 2:
            pending = chunk
        elif kind == 3:
            pending += chunk
        elif kind == 4:
            yield pending + chunk
            pending = b""
        else:
            raise WandbFileError(f"unknown record type {kind} at byte {pos - length - _HEADER}")


def _item_key(item: Any) -> str:
    return item.key or "/".join(item.nested_key)


def read_wandb_file(path: str | Path) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """(history rows in logging order, run config) of one ``run-<id>.wandb`` file.

    Each history row maps metric name -> value (``_step``, ``_runtime`` etc. included).
    """
    from wandb.proto import wandb_internal_pb2 as pb  # lazy: wandb is slow to import

    history: list[dict[str, Any]] = []
    config: dict[str, Any] = {}
    for raw in _records(Path(path).read_bytes()):
        rec = pb.Record()
        try:
            rec.ParseFromString(raw)
        except Exception as err:  # noqa: BLE001 - protobuf raises DecodeError subclasses
            raise WandbFileError(f"damaged record: {err}") from None
        kind = rec.WhichOneof("record_type")
        if kind == "history":
            history.append({_item_key(i): json.loads(i.value_json) for i in rec.history.item})
        elif kind == "run":
            config.update({i.key: json.loads(i.value_json) for i in rec.run.config.update if i.key != "_wandb"})
        elif kind == "config":
            config.update({i.key: json.loads(i.value_json) for i in rec.config.update if i.key != "_wandb"})
    return history, config


def wandb_run_dirs(run_dir: str | Path) -> list[Path]:
    """The wandb run folders under ``<run_dir>/wandb`` (offline and online), oldest first."""
    root = Path(run_dir) / "wandb"
    if not root.is_dir():
        return []
    dirs = [p for p in root.iterdir() if p.is_dir() and (p.name.startswith("offline-run-") or p.name.startswith("run-"))]
    return sorted(dirs, key=lambda p: p.name.split("-", 1)[1] if p.name.startswith("offline-") else p.name)


def read_wandb_history(run_dir: str | Path) -> list[dict[str, Any]]:
    """Every logged step of every wandb run under ``run_dir`` (a resumed run has several), in order.

    Falls back to ``files/wandb-summary.json`` (one row) for a run folder without a ``.wandb`` file.
    """
    rows: list[dict[str, Any]] = []
    for d in wandb_run_dirs(run_dir):
        files = sorted(d.glob("run-*.wandb"))
        if files:
            for f in files:
                rows.extend(read_wandb_file(f)[0])
            continue
        summary = d / "files" / "wandb-summary.json"
        if summary.is_file():
            rows.append(json.loads(summary.read_text()))
    return rows
