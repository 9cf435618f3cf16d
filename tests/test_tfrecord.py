"""The TF-free TFRecord codec: round trips, framing CRCs and corrupt-file detection."""
import gzip
import struct

import numpy as np
import pytest

from sitskit.formats.mtlcc_record import decode_mtlcc_example, encode_mtlcc_example
from sitskit.formats.tfrecord import (
    TFRecordError,
    decode_example,
    encode_example,
    iter_records,
    masked_crc32c,
    read_tfrecord,
    write_tfrecord,
)


def test_masked_crc32c_known_value():
    # crc32c("123456789") = 0xE3069283 (RFC 3720 check value), masked as TensorFlow does
    crc = 0xE3069283
    assert masked_crc32c(b"123456789") == (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def test_example_roundtrip_all_feature_kinds():
    feats = {"b": b"\x00\x01raw", "bl": [b"a", b"bc"], "i": np.array([0, 1, -5, 2**40], np.int64),
             "f": np.array([0.5, -1.25], np.float32)}
    out = decode_example(encode_example(feats))
    assert out["b"] == [b"\x00\x01raw"] and out["bl"] == [b"a", b"bc"]
    np.testing.assert_array_equal(out["i"], feats["i"])
    np.testing.assert_array_equal(out["f"], feats["f"])


@pytest.mark.parametrize("name", ["x.tfrecord", "x.tfrecord.gz"])
def test_file_roundtrip_and_crc_framing(tmp_path, name):
    rng = np.random.default_rng(0)
    t, h = 5, 12
    ex = encode_mtlcc_example(
        rng.integers(0, 9000, (t, h, h, 4)), rng.integers(0, 9000, (t, h // 2, h // 2, 6)),
        rng.integers(0, 9000, (t, h // 6, h // 6, 3)), np.array([10, 40, 90, 0, 0]),
        np.full(t, 2016), rng.integers(0, 27, (h, h)))
    path = tmp_path / name
    write_tfrecord(path, [ex, ex])
    raw = gzip.decompress(path.read_bytes()) if name.endswith(".gz") else path.read_bytes()
    (length,) = struct.unpack("<Q", raw[:8])
    assert struct.unpack("<I", raw[8:12])[0] == masked_crc32c(raw[:8])
    assert struct.unpack("<I", raw[12 + length:16 + length])[0] == masked_crc32c(raw[12:12 + length])
    recs = list(read_tfrecord(path))
    assert len(recs) == 2
    arrays = decode_mtlcc_example(recs[0])
    assert arrays["x10"].shape == (t, h, h, 4) and arrays["labels"].shape == (t, h, h)
    assert (arrays["labels"] == arrays["labels"][0]).all()
    np.testing.assert_array_equal(arrays["doy"], [10, 40, 90, 0, 0])


def test_corruption_is_detected(tmp_path):
    path = tmp_path / "a.tfrecord"
    write_tfrecord(path, [{"k": b"payload-bytes"}])
    data = bytearray(path.read_bytes())
    data[20] ^= 0xFF  # flip a payload byte -> data CRC mismatch
    (tmp_path / "bad.tfrecord").write_bytes(bytes(data))
    with pytest.raises(TFRecordError, match="data CRC"):
        list(iter_records(tmp_path / "bad.tfrecord"))
    (tmp_path / "short.tfrecord").write_bytes(path.read_bytes()[:-6])
    with pytest.raises(TFRecordError, match="truncated"):
        list(iter_records(tmp_path / "short.tfrecord"))
    hdr = bytearray(path.read_bytes())
    hdr[0] ^= 0x01  # length field changed -> length CRC mismatch
    (tmp_path / "len.tfrecord").write_bytes(bytes(hdr))
    with pytest.raises(TFRecordError, match="length CRC"):
        list(iter_records(tmp_path / "len.tfrecord"))
