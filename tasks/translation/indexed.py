"""fairseq's binarized token files (``<prefix>.idx`` + ``<prefix>.bin``), read with numpy memmap.

Two layouts, told apart by the index's magic bytes:

* ``mmap`` (fairseq's default): ``.idx`` = ``MMIDIDX\\x00\\x00``, u64 version 1, u8 dtype code, u64 N,
  int32 sizes[N], int64 byte pointers[N] into ``.bin``; ``.bin`` holds the ids as stored.
* ``lazy``/``cached`` (TorchNet, older fairseq): ``.idx`` = ``TNTIDX\\x00\\x00``, u64 version 1, u64 dtype
  code, u64 element size, u64 N, u64 S, int64 dim_offsets[N+1], int64 data_offsets[N+1] (in elements),
  int64 sizes[S]; ``.bin`` holds id + 1 (Lua indexing), so the reader subtracts 1.

Nothing is loaded whole: the index arrays and the data are memory maps; a sentence is copied out when
asked for. Both readers check the file sizes against the header (a truncated or corrupt file is one
clear error naming it). :func:`write_mmap` writes the mmap layout (what the preparation scripts use).
"""
from __future__ import annotations

import struct
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from tasks.common.errors import DataError

MMAP_MAGIC = b"MMIDIDX\x00\x00"
TNT_MAGIC = b"TNTIDX\x00\x00"
DTYPES = {1: np.uint8, 2: np.int8, 3: np.int16, 4: np.int32, 5: np.int64, 6: np.float64, 7: np.double,
          8: np.uint16, 9: np.uint32, 10: np.uint64}
_INT_CODES = {1, 2, 3, 4, 5, 8, 9, 10}
_REBUILD = "re-run fairseq-preprocess or scripts/prepare_translation.py to rebuild it"


def _corrupt(path: Path, what: str) -> DataError:
    return DataError(f"{path} is corrupt or truncated ({what}); {_REBUILD}.")


class TokenFile:
    """One binarized split of one language: ``len``, ``sizes`` (tokens incl. ``</s>``), ``[i]`` -> int64 ids."""

    format: str = ""

    def __init__(self, prefix: str | Path):
        self.prefix = str(prefix)
        self._open()

    def __getstate__(self) -> dict:  # DataLoader workers reopen the maps instead of pickling the data
        return {"prefix": self.prefix}

    def __setstate__(self, state: dict) -> None:
        self.prefix = state["prefix"]
        self._open()

    @property
    def idx_path(self) -> Path:
        return Path(self.prefix + ".idx")

    @property
    def bin_path(self) -> Path:
        return Path(self.prefix + ".bin")

    def _open(self) -> None:
        raise NotImplementedError

    def __len__(self) -> int:
        return int(self.sizes.shape[0])

    def max_id(self, chunk: int = 1 << 24) -> int:
        """The largest id in the file (read in chunks through the memory map)."""
        data, best = self._data, -1
        for start in range(0, data.shape[0], chunk):
            part = data[start:start + chunk]
            if part.size:
                best = max(best, int(part.max()))
        return best - self._shift


class MMapTokenFile(TokenFile):
    format = "mmap"

    def _open(self) -> None:
        idx, binp = self.idx_path, self.bin_path
        size = idx.stat().st_size
        with open(idx, "rb") as f:
            head = f.read(26)
        if len(head) < 26 or head[:9] != MMAP_MAGIC:
            raise _corrupt(idx, "no MMIDIDX header")
        (version,) = struct.unpack("<Q", head[9:17])
        code = head[17]
        (n,) = struct.unpack("<Q", head[18:26])
        if version != 1 or code not in _INT_CODES:
            raise _corrupt(idx, f"version {version}, dtype code {code}")
        if size != 26 + 12 * n:
            raise _corrupt(idx, f"{size} bytes, the header promises {26 + 12 * n} for {n} sentences")
        self.dtype = np.dtype(DTYPES[code])
        raw = np.memmap(idx, mode="r", dtype=np.uint8)
        self.sizes = np.frombuffer(raw, dtype=np.int32, count=n, offset=26)
        self._pointers = np.frombuffer(raw, dtype=np.int64, count=n, offset=26 + 4 * n)
        nbytes = binp.stat().st_size
        if n:
            ends = self._pointers + self.sizes.astype(np.int64) * self.dtype.itemsize
            if (self.sizes < 0).any() or (self._pointers < 0).any() or int(ends.max()) > nbytes \
                    or (self._pointers % self.dtype.itemsize).any():
                raise _corrupt(binp, f"{nbytes} bytes, the index points up to {int(ends.max())}")
        self._data = np.memmap(binp, mode="r", dtype=self.dtype) if nbytes else np.zeros(0, self.dtype)
        self._offsets = self._pointers // self.dtype.itemsize
        self._shift = 0

    def __getitem__(self, i: int) -> np.ndarray:
        start = int(self._offsets[i])
        return self._data[start:start + int(self.sizes[i])].astype(np.int64)

    def last_tokens(self) -> np.ndarray:
        """The last id of every non-empty sentence (fairseq ends each with ``</s>``)."""
        keep = self.sizes > 0
        return self._data[(self._offsets + self.sizes - 1)[keep]].astype(np.int64)


class TNTTokenFile(TokenFile):
    format = "lazy"

    def _open(self) -> None:
        idx, binp = self.idx_path, self.bin_path
        size = idx.stat().st_size
        with open(idx, "rb") as f:
            head = f.read(48)
        if len(head) < 48 or head[:8] != TNT_MAGIC:
            raise _corrupt(idx, "no TNTIDX header")
        version, code, elem, n, s = struct.unpack("<QQQQQ", head[8:48])
        if version != 1 or code not in _INT_CODES or elem != np.dtype(DTYPES[code]).itemsize:
            raise _corrupt(idx, f"version {version}, dtype code {code}, element size {elem}")
        if size != 48 + 8 * (2 * (n + 1) + s):
            raise _corrupt(idx, f"{size} bytes, the header promises {48 + 8 * (2 * (n + 1) + s)}")
        raw = np.memmap(idx, mode="r", dtype=np.uint8)
        dim_offsets = np.frombuffer(raw, dtype=np.int64, count=n + 1, offset=48)
        data_offsets = np.frombuffer(raw, dtype=np.int64, count=n + 1, offset=48 + 8 * (n + 1))
        shapes = np.frombuffer(raw, dtype=np.int64, count=s, offset=48 + 16 * (n + 1))
        if s != n or (n and not np.array_equal(dim_offsets, np.arange(n + 1))):
            raise _corrupt(idx, "items are not 1-D token sequences")
        self.dtype = np.dtype(DTYPES[code])
        nbytes = binp.stat().st_size
        if n and (int(data_offsets[-1]) * elem != nbytes or (np.diff(data_offsets) != shapes).any()):
            raise _corrupt(binp, f"{nbytes} bytes, the index promises {int(data_offsets[-1]) * elem}")
        self.sizes = shapes.astype(np.int32)
        self._offsets = data_offsets[:-1]
        self._data = np.memmap(binp, mode="r", dtype=self.dtype) if nbytes else np.zeros(0, self.dtype)
        self._shift = 1

    def __getitem__(self, i: int) -> np.ndarray:
        start = int(self._offsets[i])
        return self._data[start:start + int(self.sizes[i])].astype(np.int64) - 1

    def last_tokens(self) -> np.ndarray:
        keep = self.sizes > 0
        return self._data[(self._offsets + self.sizes - 1)[keep]].astype(np.int64) - 1


def open_token_file(prefix: str | Path) -> TokenFile:
    """Open ``<prefix>.idx/.bin`` in whichever layout its magic bytes say."""
    prefix = str(prefix)
    idx, binp = Path(prefix + ".idx"), Path(prefix + ".bin")
    for p in (idx, binp):
        if not p.is_file():
            raise DataError(f"{p} does not exist; the data folder misses this split or language: {_REBUILD}.")
    with open(idx, "rb") as f:
        magic = f.read(9)
    if magic == MMAP_MAGIC:
        return MMapTokenFile(prefix)
    if magic[:8] == TNT_MAGIC:
        return TNTTokenFile(prefix)
    raise _corrupt(idx, f"unknown magic {magic!r}; expected fairseq's mmap or lazy/cached format")


def best_dtype(vocab_size: int) -> np.dtype:
    """fairseq's choice: uint16 below 65,500 entries, uint32 below 2^32, else int64."""
    if vocab_size < 65500:
        return np.dtype(np.uint16)
    return np.dtype(np.uint32) if vocab_size < 4294967295 else np.dtype(np.int64)


def write_mmap(prefix: str | Path, sentences: Iterable[Sequence[int]], vocab_size: int) -> int:
    """Write fairseq's mmap layout (ids as given, each sentence already ending in ``</s>``); returns N."""
    dtype = best_dtype(vocab_size)
    code = next(k for k, v in DTYPES.items() if np.dtype(v) == dtype)
    sizes: list[int] = []
    with open(str(prefix) + ".bin", "wb") as f:
        for ids in sentences:
            arr = np.asarray(ids, dtype=dtype)
            f.write(arr.tobytes())
            sizes.append(arr.shape[0])
    s = np.asarray(sizes, dtype=np.int32)
    pointers = np.zeros(len(sizes), dtype=np.int64)
    if len(sizes) > 1:
        pointers[1:] = np.cumsum(s[:-1].astype(np.int64) * dtype.itemsize)
    with open(str(prefix) + ".idx", "wb") as f:
        f.write(MMAP_MAGIC + struct.pack("<Q", 1) + struct.pack("<B", code) + struct.pack("<Q", len(sizes)))
        f.write(s.tobytes())
        f.write(pointers.tobytes())
    return len(sizes)
