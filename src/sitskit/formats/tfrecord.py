"""TFRecord files of `tf.train.Example` protos, read and written without TensorFlow.

Framing of one record: ``u64 length | u32 masked_crc32c(length) | data | u32 masked_crc32c(data)``,
all little-endian. An Example is ``Features{ map<string, Feature> }`` where a Feature holds a BytesList
(field 1), FloatList (field 2) or Int64List (field 3). Both CRCs are verified on read.
"""
from __future__ import annotations

import gzip
import io
import os
import struct
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path

import numpy as np
from crc32c import crc32c as _crc32c


class TFRecordError(ValueError):
    """A TFRecord file that is truncated, corrupt (length or data CRC) or not an Example."""


def masked_crc32c(data: bytes) -> int:
    crc = _crc32c(data)
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


# ------------------------------------------------------------------------------------ protobuf, minimal
def _varint(value: int) -> bytes:
    value &= 0xFFFFFFFFFFFFFFFF  # negative int64 -> 10-byte two's complement, as protobuf does
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _read_varint(buf: memoryview, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        if pos >= len(buf):
            raise TFRecordError("truncated varint in Example proto")
        byte = buf[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return result, pos
        shift += 7
        if shift > 63:
            raise TFRecordError("varint longer than 10 bytes in Example proto")


def _field(number: int, wire: int, payload: bytes) -> bytes:
    key = _varint((number << 3) | wire)
    if wire == 2:
        return key + _varint(len(payload)) + payload
    return key + payload


def _encode_feature(value) -> bytes:
    if isinstance(value, (bytes, bytearray)):
        return _field(1, 2, _field(1, 2, bytes(value)))
    if isinstance(value, (list, tuple)) and value and all(isinstance(v, (bytes, bytearray)) for v in value):
        return _field(1, 2, b"".join(_field(1, 2, bytes(v)) for v in value))
    arr = np.asarray(value)
    if arr.dtype.kind in "iub":
        packed = b"".join(_varint(int(v)) for v in arr.reshape(-1))
        return _field(3, 2, _field(1, 2, packed))
    if arr.dtype.kind == "f":
        return _field(2, 2, _field(1, 2, arr.astype("<f4").tobytes()))
    raise TypeError(f"cannot encode a feature of type {type(value).__name__} / dtype {arr.dtype}")


def encode_example(features: Mapping[str, object]) -> bytes:
    """Serialise a dict of features into a `tf.train.Example` (keys written in sorted order)."""
    entries = b"".join(
        _field(1, 2, _field(1, 2, key.encode()) + _field(2, 2, _encode_feature(features[key])))
        for key in sorted(features)
    )
    return _field(1, 2, entries)


def _iter_fields(buf: memoryview) -> Iterator[tuple[int, int, object]]:
    pos = 0
    while pos < len(buf):
        key, pos = _read_varint(buf, pos)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, pos = _read_varint(buf, pos)
        elif wire == 2:
            length, pos = _read_varint(buf, pos)
            if pos + length > len(buf):
                raise TFRecordError("length-delimited field runs past the end of the Example proto")
            value, pos = buf[pos:pos + length], pos + length
        elif wire == 5:
            value, pos = buf[pos:pos + 4], pos + 4
        elif wire == 1:
            value, pos = buf[pos:pos + 8], pos + 8
        else:
            raise TFRecordError(f"unsupported protobuf wire type {wire}")
        yield number, wire, value


def _decode_feature(buf: memoryview):
    for kind, _, payload in _iter_fields(buf):
        if kind == 1:  # BytesList
            return [bytes(v) for n, _, v in _iter_fields(payload) if n == 1]
        if kind == 2:  # FloatList: packed (wire 2) or unpacked (wire 5)
            chunks = [bytes(v) for n, _, v in _iter_fields(payload) if n == 1]
            return np.frombuffer(b"".join(chunks), dtype="<f4").astype(np.float32)
        if kind == 3:  # Int64List: packed (wire 2) or unpacked (wire 0)
            values: list[int] = []
            for n, wire, v in _iter_fields(payload):
                if n != 1:
                    continue
                if wire == 0:
                    values.append(v)
                else:
                    pos = 0
                    while pos < len(v):
                        x, pos = _read_varint(v, pos)
                        values.append(x)
            arr = np.array(values, dtype=np.uint64).view(np.int64)
            return arr
    return []  # an empty Feature


def decode_example(data: bytes) -> dict[str, object]:
    """Parse a serialised Example: BytesList -> list[bytes], Int64List -> int64 array, FloatList -> float32."""
    out: dict[str, object] = {}
    for number, _, features in _iter_fields(memoryview(data)):
        if number != 1:
            continue
        for n, _, entry in _iter_fields(features):
            if n != 1:
                continue
            key, value = None, memoryview(b"")
            for m, _, v in _iter_fields(entry):
                if m == 1:
                    key = bytes(v).decode()
                elif m == 2:
                    value = v
            if key is None:
                raise TFRecordError("Example feature map entry without a key")
            out[key] = _decode_feature(value)
    return out


# ------------------------------------------------------------------------------------------- framing
def _open(path: Path, mode: str, compression: str | None):
    if compression == "auto":
        compression = "gzip" if str(path).endswith(".gz") else None
    if compression == "gzip":
        return gzip.open(path, mode)
    if compression is None:
        return open(path, mode)
    raise ValueError(f"unknown compression {compression!r} (use 'gzip', None or 'auto')")


def write_tfrecord(path: str | os.PathLike, examples: Iterable[Mapping[str, object] | bytes],
                   compression: str | None = "auto") -> None:
    """Write Examples (feature dicts or already serialised bytes) as one TFRecord file."""
    path = Path(path)
    with _open(path, "wb", compression) as f:
        for ex in examples:
            data = ex if isinstance(ex, (bytes, bytearray)) else encode_example(ex)
            header = struct.pack("<Q", len(data))
            f.write(header + struct.pack("<I", masked_crc32c(header)) + data
                    + struct.pack("<I", masked_crc32c(bytes(data))))


def iter_records(path: str | os.PathLike, compression: str | None = "auto") -> Iterator[bytes]:
    """Yield the raw record payloads of a TFRecord file, verifying length and data CRCs."""
    path = Path(path)
    try:
        with _open(path, "rb", compression) as f:
            raw = f.read()
    except (OSError, EOFError, gzip.BadGzipFile) as exc:
        raise TFRecordError(f"{path}: cannot decompress/read ({exc})") from exc
    stream, index = io.BytesIO(raw), 0
    while True:
        header = stream.read(8)
        if not header:
            return
        if len(header) < 8:
            raise TFRecordError(f"{path}: record {index} truncated in its length field")
        crc = stream.read(4)
        if len(crc) < 4 or struct.unpack("<I", crc)[0] != masked_crc32c(header):
            raise TFRecordError(f"{path}: record {index} has a bad length CRC (corrupt file)")
        (length,) = struct.unpack("<Q", header)
        data = stream.read(length)
        crc = stream.read(4)
        if len(data) < length or len(crc) < 4:
            raise TFRecordError(f"{path}: record {index} truncated ({len(data)} of {length} bytes)")
        if struct.unpack("<I", crc)[0] != masked_crc32c(data):
            raise TFRecordError(f"{path}: record {index} has a bad data CRC (corrupt file)")
        yield data
        index += 1


def read_tfrecord(path: str | os.PathLike, compression: str | None = "auto") -> Iterator[dict[str, object]]:
    """Yield the decoded Examples of a TFRecord file (see `decode_example`)."""
    for index, data in enumerate(iter_records(path, compression)):
        try:
            yield decode_example(data)
        except TFRecordError as exc:
            raise TFRecordError(f"{path}: record {index}: {exc}") from exc
