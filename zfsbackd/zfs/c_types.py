"""pyzfs's ``libzfs_core.ctypes``: integers of an exact C type for nvlist values (``lzc.ctypes.int32_t(5)``).

A plain ``int`` goes into an nvlist as ``uint64``; a value made here goes in
with its own width and signedness, which some kernel interfaces insist on.
Each function checks the range (OverflowError, as in pyzfs) and returns a
cffi ``CData`` that :mod:`zfsbackd.zfs._nvlist` recognises by its C type.

The casts use an FFI of their own with the two typedefs they need, so they
work before (and without) libzfs_core being loaded, as pyzfs's do.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import cffi


@functools.cache
def _ffi() -> cffi.FFI:
    """Made on first use: parsing C declarations imports pycparser, ~15 ms every CLI start would pay."""
    ffi = cffi.FFI()
    ffi.cdef("typedef enum { B_FALSE = 0, B_TRUE = 1 } boolean_t; typedef unsigned char uchar_t;")
    return ffi


def _cast(type_name: str) -> Callable[[int], Any]:
    """A function that makes a ``type_name`` value, refusing what does not fit (pyzfs's ``_ffi_cast``)."""

    def cast(value: int) -> Any:
        ffi = _ffi()
        type_info = ffi.typeof(type_name)
        if type_info.kind == "enum":
            if value not in type_info.elements:
                raise OverflowError(f"Invalid enum <{type_info.cname}> value {value}: {value!r}")
        else:
            ffi.new(type_name + "*", value)  # raises OverflowError when out of range
        return ffi.cast(type_name, value)

    cast.__name__ = type_name
    return cast


uint8_t = _cast("uint8_t")
int8_t = _cast("int8_t")
uint16_t = _cast("uint16_t")
int16_t = _cast("int16_t")
uint32_t = _cast("uint32_t")
int32_t = _cast("int32_t")
uint64_t = _cast("uint64_t")
int64_t = _cast("int64_t")
boolean_t = _cast("boolean_t")
uchar_t = _cast("uchar_t")
