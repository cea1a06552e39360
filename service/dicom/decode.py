"""Pixel decoders that crash instead of raising: contained at the one place we decode.

pylibjpeg-rle (the ``codecs`` extra) is written in Rust; on corrupt RLE segments it *panics*, and pyo3 turns
a panic into ``pyo3_runtime.PanicException``, which derives from ``BaseException``, not ``Exception``
(pyo3 does this on purpose, so that ``except Exception`` does not swallow a broken invariant). For us a
decoder's broken invariant on attacker-controlled bytes is just "this pixel data cannot be decoded": an
undecodable instance must be a "not analysed" reason (PS3.5 §8.2 encapsulation gone wrong), never a
crashed job or worker (found by tests/reliability/test_fuzz_dicom.py).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

__all__ = ["DecoderPanicError", "contained_decoder", "is_decoder_panic"]


class DecoderPanicError(ValueError):
    """A native pixel decoder panicked on the data (corrupt codestream)."""


def is_decoder_panic(exc: BaseException) -> bool:
    """pyo3's PanicException; matched by name: its module (``pyo3_runtime``) exists only once loaded."""
    return type(exc).__name__ == "PanicException" and type(exc).__module__ == "pyo3_runtime"


@contextmanager
def contained_decoder() -> Iterator[None]:
    """Turn a decoder panic inside the block into :class:`DecoderPanicError`; everything else passes."""
    try:
        yield
    except BaseException as exc:
        if is_decoder_panic(exc):
            raise DecoderPanicError(f"the pixel decoder failed on corrupt data: {exc}") from None
        raise
