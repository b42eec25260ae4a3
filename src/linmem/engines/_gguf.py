"""Read a GGUF file's header (metadata and tensor table) without llama.cpp, to check a file before
loading it and to fingerprint it.

llama.cpp answers a bad file with a NULL model and a line on stderr; reading the header first lets
linmem say what is wrong in the file's own terms: not a GGUF, truncated (the tensor table points
past the end), or an architecture this llama.cpp does not know.

Format facts (GGUF v2/v3): magic ``GGUF``, a uint32 version, uint64 tensor and key counts, then
typed key/value pairs, then per tensor its name, dimensions, ggml type and data offset; the data
starts at the next multiple of ``general.alignment`` (default 32) after the table.
"""

from __future__ import annotations

import hashlib
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from ..errors import ModelUnavailable

MAGIC = b"GGUF"
# Value types: fixed-size scalars as struct formats; 8 is a string, 9 an array.
_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
_STRING, _ARRAY = 8, 9
# ggml tensor types: (elements per block, bytes per block), for the size of each tensor's data.
_BLOCKS = {
    0: (1, 4), 1: (1, 2), 2: (32, 18), 3: (32, 20), 6: (32, 22), 7: (32, 24), 8: (32, 34),
    9: (32, 36), 10: (256, 84), 11: (256, 110), 12: (256, 144), 13: (256, 176), 14: (256, 210),
    15: (256, 292), 16: (256, 66), 17: (256, 74), 18: (256, 98), 19: (256, 50), 20: (32, 18),
    21: (256, 110), 22: (256, 82), 23: (256, 136), 24: (1, 1), 25: (1, 2), 26: (1, 4),
    27: (1, 8), 28: (1, 8), 29: (256, 56), 30: (1, 2), 34: (256, 54), 35: (256, 66), 39: (32, 17),
}  # fmt: skip
# Arrays longer than this are skipped, not kept (a vocabulary is read past, not into memory).
_KEEP_ARRAY = 64
# A header's counts and lengths beyond these are a damaged file, not a model.
_MAX_COUNT = 1 << 24
_MAX_STRING = 1 << 26


@dataclass(frozen=True)
class Header:
    """What a GGUF says about itself: metadata (long arrays left out), tensor count, the bytes its
    data needs, and a sha256 of the header bytes (metadata, vocabulary and tensor table)."""

    path: Path
    version: int
    metadata: dict[str, Any]
    tensors: int
    data_end: int  # file size the tensor table implies
    size: int
    header_sha256: str

    @property
    def architecture(self) -> str:
        return str(self.metadata.get("general.architecture", ""))

    def get(self, key: str, default: Any = None) -> Any:
        """A metadata value by its key without the architecture prefix, e.g. "context_length"."""
        return self.metadata.get(f"{self.architecture}.{key}", default)


def read_header(path: Path) -> Header:
    """The header of the GGUF at `path`; ModelUnavailable naming the file and the problem when it
    is not a whole GGUF."""
    size = path.stat().st_size
    with path.open("rb") as f:
        magic = f.read(4)
        if magic != MAGIC:
            raise ModelUnavailable(
                f"{path}: not a GGUF file (it starts with {magic!r}, a GGUF with {MAGIC!r}); "
                "give a .gguf model file (llama.cpp, ollama and LM Studio use them)"
            )
        try:
            version, n_tensors, n_kv = struct.unpack("<IQQ", _exact(f, 20))
            if version not in (2, 3) or n_tensors > _MAX_COUNT or n_kv > _MAX_COUNT:
                raise ValueError(f"version {version}, {n_tensors} tensors, {n_kv} keys")
            metadata = {_string(f): _value(f, struct.unpack("<I", _exact(f, 4))[0]) for _ in range(n_kv)}
            infos = [_tensor_info(f) for _ in range(n_tensors)]
            table_end = f.tell()
        except (ValueError, struct.error, UnicodeDecodeError) as e:
            raise ModelUnavailable(f"{path}: a damaged or truncated GGUF header ({e})") from None
        f.seek(0)
        header_sha = hashlib.sha256(f.read(table_end)).hexdigest()
    align = int(metadata.get("general.alignment", 32) or 32)
    data_start = -(-table_end // align) * align
    data_end = max((data_start + offset + nbytes for offset, nbytes in infos), default=data_start)
    if data_end > size:
        raise ModelUnavailable(
            f"{path}: truncated GGUF: its tensors need {data_end} bytes, the file has {size} "
            "(an interrupted download or copy: fetch the file again)"
        )
    return Header(path, version, metadata, n_tensors, data_end, size, header_sha)


def fingerprint(header: Header, samples: int = 16, chunk: int = 1 << 16) -> str:
    """Identity of the model file: its header bytes, its size and `samples` chunks of its weights
    spread over the file. Cheap for a multi-GB file, and different whenever the weights are
    (hashing every byte of a 20 GB model at each load would cost a minute)."""
    h = hashlib.sha256(f"{header.header_sha256}\0{header.size}".encode())
    with header.path.open("rb") as f:
        for i in range(samples):
            f.seek(max(0, (header.size - chunk) * i // max(1, samples - 1)))
            h.update(f.read(chunk))
    return h.hexdigest()


def _exact(f: BinaryIO, n: int) -> bytes:
    data = f.read(n)
    if len(data) != n:
        raise ValueError(f"the file ends inside its header (wanted {n} bytes at offset {f.tell()})")
    return data


def _string(f: BinaryIO) -> str:
    (n,) = struct.unpack("<Q", _exact(f, 8))
    if n > _MAX_STRING:
        raise ValueError(f"a string of {n} bytes")
    return _exact(f, n).decode("utf-8")


def _value(f: BinaryIO, kind: int) -> Any:
    if kind in _SCALARS:
        fmt = "<" + _SCALARS[kind]
        return struct.unpack(fmt, _exact(f, struct.calcsize(fmt)))[0]
    if kind == _STRING:
        return _string(f)
    if kind == _ARRAY:
        item, n = struct.unpack("<IQ", _exact(f, 12))
        if n > _MAX_COUNT * 4:
            raise ValueError(f"an array of {n} items")
        if item in _SCALARS and n > _KEEP_ARRAY:  # skip a long numeric array in one seek
            f.seek(n * struct.calcsize("<" + _SCALARS[item]), 1)
            return None
        values = [_value(f, item) for _ in range(n)]
        return values if n <= _KEEP_ARRAY else None
    raise ValueError(f"unknown value type {kind}")


def _tensor_info(f: BinaryIO) -> tuple[int, int]:
    """(data offset, data bytes) of one tensor-table entry."""
    _string(f)
    (n_dims,) = struct.unpack("<I", _exact(f, 4))
    if n_dims > 8:
        raise ValueError(f"a tensor of {n_dims} dimensions")
    dims = struct.unpack(f"<{n_dims}Q", _exact(f, 8 * n_dims))
    kind, offset = struct.unpack("<IQ", _exact(f, 12))
    elements = 1
    for d in dims:
        elements *= d
    per_block, block_bytes = _BLOCKS.get(kind, (1, 0))  # an unknown type: its offset is still checked
    return offset, -(-elements // per_block) * block_bytes
