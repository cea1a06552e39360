"""Pixel decoders that crash instead of raising: contained at the one place we decode.

pylibjpeg-rle (the ``codecs`` extra) is written in Rust; on corrupt RLE segments it *panics*, and pyo3 turns
a panic into ``pyo3_runtime.PanicException``, which derives from ``BaseException``, not ``Exception``
(pyo3 does this on purpose, so that ``except Exception`` does not swallow a broken invariant). For us a
decoder's broken invariant on attacker-controlled bytes is just "this pixel data cannot be decoded": an
undecodable instance must be a "not analysed" reason (PS3.5 §8.2 encapsulation gone wrong), never a
crashed job or worker (found by tests/reliability/test_fuzz_dicom.py).

GDCM (the ``codecs`` extra) is worse: on some corrupt JPEG frames its C++ code throws where nothing catches
it, and the process *aborts* (``std::terminate``: a JPEG Baseline dataset of 15 frames whose fragments are
three bytes of noise and nothing, found by the fuzzer's long form). pydicom tries GDCM first for every JPEG
and JPEG 2000 syntax and falls back to the next plugin when one raises, so a frame every decoder rejects
reaches GDCM last anyway: nothing can contain it in this process. So wherever another plugin decodes the
same syntax (pylibjpeg, Pillow, pyjpegls), GDCM is dropped before our first decode
(:func:`_without_gdcm`); it stays only for a syntax nothing else here decodes, where the install asked for it.

The codestream checks (:func:`codestream_mismatch`) guard the same place against the other way a decoder
hurts us: allocating what a compressed frame's own header claims.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from itertools import islice

from pydicom.encaps import generate_fragments
from pydicom.pixels import get_decoder
from pydicom.uid import (
    AllTransferSyntaxes,
    JPEG2000TransferSyntaxes,
    JPEGLSTransferSyntaxes,
    JPEGTransferSyntaxes,
)

from service.errors import DecoderPanicError

__all__ = ["codestream_mismatch", "contained_decoder", "is_decoder_panic"]


def is_decoder_panic(exc: BaseException) -> bool:
    """pyo3's PanicException; matched by name: its module (``pyo3_runtime``) exists only once loaded."""
    return type(exc).__name__ == "PanicException" and type(exc).__module__ == "pyo3_runtime"


_gdcm_checked = threading.Event()
_gdcm_lock = threading.Lock()


def _without_gdcm() -> None:
    """Drop GDCM from every pixel decoder that has another plugin (see the module docstring); once per
    process, before the first decode (pydicom's plugin registry is not thread-safe: under a lock)."""
    if _gdcm_checked.is_set():
        return
    with _gdcm_lock:
        if _gdcm_checked.is_set():
            return
        for uid in AllTransferSyntaxes:
            try:
                decoder = get_decoder(uid)
            except NotImplementedError:
                continue
            if "gdcm" in decoder.available_plugins and len(decoder.available_plugins) > 1:
                decoder.remove_plugin("gdcm")
        _gdcm_checked.set()


@contextmanager
def contained_decoder() -> Iterator[None]:
    """Turn a decoder panic inside the block into :class:`DecoderPanicError`; everything else passes."""
    _without_gdcm()
    try:
        yield
    except BaseException as exc:
        if is_decoder_panic(exc):
            raise DecoderPanicError(f"the pixel decoder failed on corrupt data: {exc}") from None
        raise


_SOF_MARKERS = frozenset([*range(0xC0, 0xC4), *range(0xC5, 0xC8), *range(0xC9, 0xCC), 0xCD, 0xCE, 0xCF, 0xF7])
"""JPEG (ITU T.81 B.1.1.3, SOF0-SOF15 less DHT/JPG/DAC) and JPEG-LS (T.87, SOF55) frame headers."""


def _jpeg_size(fragment: bytes) -> tuple[int, int, int] | None:
    """(rows, columns, components) from a JPEG or JPEG-LS frame header; None if it has none we can read."""
    if fragment[:2] != b"\xff\xd8":
        return None
    i = 2
    while i + 4 <= len(fragment):
        if fragment[i] != 0xFF:
            return None
        marker = fragment[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        if marker == 0x01 or 0xD0 <= marker <= 0xD8:  # markers without a length
            i += 2
            continue
        if marker in _SOF_MARKERS:
            if i + 10 > len(fragment):
                return None
            rows = int.from_bytes(fragment[i + 5 : i + 7], "big")
            columns = int.from_bytes(fragment[i + 7 : i + 9], "big")
            return rows, columns, fragment[i + 9]
        if marker in (0xDA, 0xD9):  # scan or end before any frame header
            return None
        i += 2 + int.from_bytes(fragment[i + 2 : i + 4], "big")
    return None


def _j2k_size(fragment: bytes) -> tuple[int, int, int] | None:
    """(rows, columns, components) from a JPEG 2000 SIZ segment (T.800 A.5.1), wherever it is: the
    decoder also accepts a codestream wrapped in JP2 boxes."""
    at = fragment.find(b"\xff\x4f\xff\x51")
    if at < 0 or at + 42 > len(fragment):
        return None
    siz = fragment[at + 4 : at + 42]
    xsiz, ysiz, xosiz, yosiz = (int.from_bytes(siz[o : o + 4], "big") for o in (4, 8, 12, 16))
    return max(0, ysiz - yosiz), max(0, xsiz - xosiz), int.from_bytes(siz[36:38], "big")


def codestream_mismatch(tsuid: str, pixel_data: bytes, rows: int, columns: int, samples: int) -> str | None:
    """Why a compressed frame does not fit the dataset's Rows x Columns x SamplesPerPixel; None if all do.

    The JPEG family's decoders allocate what the codestream's own header says, not what the dataset says,
    so a small fragment claiming a huge frame would be decoded in full before pydicom noticed the
    mismatch. (RLE needs no check: pydicom's decoder sizes its output from the dataset.) A frame header
    with a zero size is refused too: JPEG's DNL marker would then set the height after allocation.
    """
    if tsuid in JPEG2000TransferSyntaxes:
        read_size = _j2k_size
    elif tsuid in JPEGTransferSyntaxes or tsuid in JPEGLSTransferSyntaxes:
        read_size = _jpeg_size
    else:
        return None
    # The first item is the Basic Offset Table (PS3.5 A.4), which generate_fragments also yields.
    for fragment in islice(generate_fragments(pixel_data), 1, None):
        size = read_size(fragment)
        if size is None:
            continue  # a continuation fragment, or one no decoder can read either
        f_rows, f_columns, f_samples = size
        if not 0 < f_rows <= rows or not 0 < f_columns <= columns or f_samples > samples:
            return (
                f"a compressed frame is {f_columns} x {f_rows} with {f_samples} component(s) but the "
                f"dataset says {columns} x {rows} with {samples}; refused before decoding"
            )
    return None
