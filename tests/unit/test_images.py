"""Images on the wire (opd/images.py, opd/protocol.py): encoded bytes with their hash, each bad kind refused with
its reason before pixels are decoded where that matters (a decompression bomb by its header)."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from opd.images import ImageBlob, ImageError, check_blob, open_rgb
from opd.protocol import ProtocolError, Trajectory, decode, encode


def _png(w: int = 8, h: int = 8, mode: str = "L") -> bytes:
    buf = io.BytesIO()
    Image.new(mode, (w, h), 128).save(buf, format="PNG")
    return buf.getvalue()


def _jpeg() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (10, 200, 30)).save(buf, format="JPEG")
    return buf.getvalue()


def _bomb(w: int, h: int) -> bytes:
    """A PNG whose header claims w x h 8-bit grayscale pixels with a few bytes of (deflated) zeros: tiny on the
    wire, w*h bytes once decoded."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    raw = zlib.compress(b"\x00" * ((w + 1) * 64), 9)  # only the first rows: the header is what is judged
    header = struct.pack(">IIBBBBB", w, h, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", raw) + chunk(b"IEND", b"")


def test_a_good_png_and_jpeg_pass_and_open():
    for data, fmt in ((_png(8, 6), "png"), (_jpeg(), "jpeg")):
        blob = ImageBlob.of(data)
        assert blob.format == fmt and len(blob.sha256) == 64
        assert check_blob(blob) in ((8, 6), (8, 8))
        assert open_rgb(blob).mode == "RGB"


BAD = {
    "unsupported format": (lambda: ImageBlob("gif", "0" * 64, b"GIF89a" + b"\x00" * 20), "not one of"),
    "not an image": (lambda: ImageBlob.of(b"hello world, no image"), "not a PNG or JPEG"),
    "declared another format": (
        lambda: ImageBlob("jpeg", ImageBlob.of(_png()).sha256, _png()),
        "bytes are png",
    ),
    "hash mismatch": (lambda: ImageBlob("png", "ab" * 32, _png()), "does not match"),
    "corrupt bytes": (lambda: ImageBlob.of(_png()[:40] + b"\x00" * 10), "does not decode"),
    "over the pixel limit": (lambda: ImageBlob.of(_bomb(20000, 20000)), "exceeds the limit"),
}


@pytest.mark.parametrize("case", list(BAD), ids=list(BAD))
def test_each_bad_image_is_refused_with_its_reason(case):
    make, reason = BAD[case]
    with pytest.raises(ImageError, match=reason):
        check_blob(make(), max_pixels=1 << 24)


def test_a_bomb_is_refused_on_its_header_before_decoding():
    bomb = ImageBlob.of(_bomb(30000, 30000))
    assert len(bomb.data) < 20_000  # a few KB on the wire; 900 MB of pixels once decoded
    with pytest.raises(ImageError, match="refused before decoding"):
        check_blob(bomb, max_pixels=1 << 24)


def _traj(images) -> Trajectory:
    return Trajectory(
        run_id="r",
        prompt_id="p",
        group_id="g",
        sample_index=0,
        prompt_token_ids=np.array([1, 5], dtype=np.int32),
        response_token_ids=np.array([6], dtype=np.int32),
        behaviour_logprobs=np.array([-1.0], dtype=np.float32),
        policy_version=0,
        images=images,
    )


def test_images_travel_as_bytes_with_their_hash_and_a_tampered_one_is_refused():
    blobs = [ImageBlob.of(_png()), ImageBlob.of(_jpeg())]
    back = decode(encode(_traj(blobs)))
    assert back.images == blobs
    assert decode(encode(_traj(None))).images is None
    tampered = encode(_traj([ImageBlob("png", blobs[0].sha256, blobs[0].data[:-1] + b"\x00")]))
    with pytest.raises(ProtocolError, match=r"images\[0\]: sha256 does not match"):
        decode(tampered)


def test_the_configured_pixel_limit_is_the_one_applied():
    small = ImageBlob.of(_png(64, 64))
    assert check_blob(small, max_pixels=64 * 64) == (64, 64)
    with pytest.raises(ImageError, match=r"64x64 = 4096 pixels exceeds the limit of 4095"):
        check_blob(small, max_pixels=64 * 64 - 1)
