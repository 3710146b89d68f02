"""Images on the wire: encoded bytes with their sha256, checked before anyone decodes pixels from them.

A prompt's images travel inside the trajectory as PNG or JPEG bytes (`ImageBlob`), never as pixel arrays (an
image's encoded form is what the user gave, is several times smaller, and is what a teacher server takes as
`image_data`) and never pickled. Every consumer checks a blob before use (`check_blob`):
  * the format is an allowed one, by its magic bytes, and is the one the blob declares;
  * the sha256 matches the bytes (a blob corrupted or swapped in transit is caught before it is decoded);
  * the size read from the header is within the pixel limit BEFORE the pixels are decoded (a decompression bomb:
    a few KB of PNG that decodes to gigabytes is refused on its header);
  * the pixels decode completely (a truncated or corrupt file is refused, not half-read).
A failure is an `ImageError` with the reason; the components dead-letter the trajectory with it.
"""

from __future__ import annotations

import hashlib
import io
import warnings
from dataclasses import dataclass

FORMATS = {"png": b"\x89PNG\r\n\x1a\n", "jpeg": b"\xff\xd8\xff"}  # format -> its magic bytes
DEFAULT_MAX_PIXELS = 4096 * 4096


class ImageError(ValueError):
    """An image that cannot be used: the reason names what is wrong with it."""


@dataclass(frozen=True)
class ImageBlob:
    """One encoded image as it travels: its format ("png" or "jpeg"), the sha256 of `data` (hex) and the bytes."""

    format: str
    sha256: str
    data: bytes

    @classmethod
    def of(cls, data: bytes) -> ImageBlob:
        """A blob for encoded image bytes, its format read from the magic bytes (ImageError if neither)."""
        return cls(sniff(data), hashlib.sha256(data).hexdigest(), bytes(data))


def sniff(data: bytes) -> str:
    for name, magic in FORMATS.items():
        if data[: len(magic)] == magic:
            return name
    raise ImageError(
        f"not a PNG or JPEG image (starts with {bytes(data[:8])!r}); allowed formats: {sorted(FORMATS)}"
    )


def check_blob(blob: ImageBlob, max_pixels: int = DEFAULT_MAX_PIXELS) -> tuple[int, int]:
    """(width, height) of a usable image; ImageError with the reason otherwise (module docstring)."""
    from PIL import Image  # noqa: PLC0415 (only consumers of images pay for it)

    if blob.format not in FORMATS:
        raise ImageError(f"image format {blob.format!r} is not one of {sorted(FORMATS)}")
    if sniff(blob.data) != blob.format:
        raise ImageError(f"image declared {blob.format} but its bytes are {sniff(blob.data)}")
    if hashlib.sha256(blob.data).hexdigest() != blob.sha256:
        raise ImageError(
            f"image sha256 {blob.sha256[:16]}... does not match its bytes (corrupted in transit?)"
        )
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(blob.data))  # reads the header only
            width, height = img.size
            if width * height > max_pixels:
                raise ImageError(
                    f"image of {width}x{height} = {width * height} pixels exceeds the limit of {max_pixels} "
                    "(images.max_pixels): refused before decoding"
                )
            img.load()  # every pixel: a truncated or corrupt file fails here
    except ImageError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:  # PIL's own header check
        raise ImageError(
            f"image exceeds the limit of {max_pixels} pixels (images.max_pixels; {str(exc)[:60]}): refused "
            "before decoding"
        ) from None
    except Exception as exc:  # PIL raises several unrelated types for corrupt input
        raise ImageError(f"image does not decode ({type(exc).__name__}: {str(exc)[:100]})") from None
    return width, height


def open_rgb(blob: ImageBlob, max_pixels: int = DEFAULT_MAX_PIXELS):
    """The checked image as a PIL RGB image, for a processor."""
    from PIL import Image  # noqa: PLC0415

    check_blob(blob, max_pixels)
    return Image.open(io.BytesIO(blob.data)).convert("RGB")
