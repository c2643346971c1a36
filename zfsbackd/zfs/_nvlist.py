"""Python dicts to and from libnvpair ``nvlist_t``, in pyzfs's format, with deterministic frees.

libzfs_core takes and returns its arguments as nvlists. The Python side uses
the same shapes as pyzfs so that callers see identical values:

- keys are ``bytes``;
- ``None`` is a flag (``DATA_TYPE_BOOLEAN``: the key's presence is the value);
- ``bool`` is ``boolean_value``, ``int`` is ``uint64`` (``uint32``/``int32``
  for the few keys in :data:`KEY_INT_TYPES`), ``bytes`` is ``string``, a
  ``dict`` is a nested nvlist;
- a typed value made by ``lzc.ctypes`` (cffi ``CData`` such as
  ``int32_t(5)``) has the width and signedness of its C type;
- a ``list`` is an array of one of those types (all elements the same type;
  typed elements all of one C type).

Decoding accepts every type libzfs_core returns (integers of all widths,
strings, nested nvlists and their arrays) and gives ``int``, ``bool``,
``bytes``, ``dict``, ``None`` and lists of them.

Every nvlist allocated here is freed when its ``with`` block ends, also on
errors; output nvlists that libzfs_core allocated are freed the same way.
nvlist_add_nvlist and the array adders copy their argument, so nested lists are
freed right after they were added.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from typing import Any

NV_UNIQUE_NAME = 1
"""nvlist_alloc flag: one value per key, which is what libzfs_core expects."""

KEY_INT_TYPES = {
    b"rewind-request": "uint32",
    b"type": "uint32",
    b"N_MORE_ERRORS": "int32",
    b"pool_context": "int32",
}
"""Keys whose plain ``int`` values the kernel reads as 32-bit (pyzfs's ``_prop_name_to_type_str``)."""

CDATA_SUFFIXES = {
    "uint8_t": ("uint8", "uint8"),
    "int8_t": ("int8", "int8"),
    "uint16_t": ("uint16", "uint16"),
    "int16_t": ("int16", "int16"),
    "uint32_t": ("uint32", "uint32"),
    "int32_t": ("int32", "int32"),
    "uint64_t": ("uint64", "uint64"),
    "int64_t": ("int64", "int64"),
    "boolean_t": ("boolean_value", "boolean"),
    "unsigned char": ("byte", "byte"),
}
"""C type of a typed value -> ``nvlist_add_*`` suffix for one value and for an array (pyzfs's table).

Keyed by the type's C name: the casts of ``lzc.ctypes`` come from another
``cffi.FFI`` than the loaded library, and cffi shares only primitive types
between instances (``boolean_t`` is an enum, ``uchar_t`` is ``unsigned char``).
"""


@dataclass
class NvlistOut:
    """An ``nvlist_t **`` for a C function to fill; ``value`` holds its contents after the block."""

    ptr: Any
    value: dict[bytes, Any] = field(default_factory=dict)


class NvlistCodec:
    """Converts with one loaded libnvpair (``ffi`` from the shared cdef, ``lib`` from dlopen)."""

    def __init__(self, ffi: Any, lib: Any) -> None:
        self._ffi = ffi
        self._lib = lib
        # data_type_t -> (nvpair_value_* suffix, C type of the out-parameter, convert one element)
        self._scalars: dict[int, tuple[str, str, Any]] = {
            lib.DATA_TYPE_BOOLEAN_VALUE: ("boolean_value", "boolean_t *", bool),
            lib.DATA_TYPE_BYTE: ("byte", "uchar_t *", int),
            lib.DATA_TYPE_INT8: ("int8", "int8_t *", int),
            lib.DATA_TYPE_UINT8: ("uint8", "uint8_t *", int),
            lib.DATA_TYPE_INT16: ("int16", "int16_t *", int),
            lib.DATA_TYPE_UINT16: ("uint16", "uint16_t *", int),
            lib.DATA_TYPE_INT32: ("int32", "int32_t *", int),
            lib.DATA_TYPE_UINT32: ("uint32", "uint32_t *", int),
            lib.DATA_TYPE_INT64: ("int64", "int64_t *", int),
            lib.DATA_TYPE_UINT64: ("uint64", "uint64_t *", int),
            lib.DATA_TYPE_STRING: ("string", "char **", ffi.string),
            lib.DATA_TYPE_NVLIST: ("nvlist", "nvlist_t **", self.to_dict),
        }
        self._arrays: dict[int, tuple[str, str, Any]] = {
            lib.DATA_TYPE_BOOLEAN_ARRAY: ("boolean_array", "boolean_t **", bool),
            lib.DATA_TYPE_BYTE_ARRAY: ("byte_array", "uchar_t **", int),
            lib.DATA_TYPE_INT8_ARRAY: ("int8_array", "int8_t **", int),
            lib.DATA_TYPE_UINT8_ARRAY: ("uint8_array", "uint8_t **", int),
            lib.DATA_TYPE_INT16_ARRAY: ("int16_array", "int16_t **", int),
            lib.DATA_TYPE_UINT16_ARRAY: ("uint16_array", "uint16_t **", int),
            lib.DATA_TYPE_INT32_ARRAY: ("int32_array", "int32_t **", int),
            lib.DATA_TYPE_UINT32_ARRAY: ("uint32_array", "uint32_t **", int),
            lib.DATA_TYPE_INT64_ARRAY: ("int64_array", "int64_t **", int),
            lib.DATA_TYPE_UINT64_ARRAY: ("uint64_array", "uint64_t **", int),
            lib.DATA_TYPE_STRING_ARRAY: ("string_array", "char ***", ffi.string),
            lib.DATA_TYPE_NVLIST_ARRAY: ("nvlist_array", "nvlist_t ***", self.to_dict),
        }

    # ---- Python -> nvlist ---------------------------------------------------

    @contextmanager
    def nvlist_in(self, props: Mapping[bytes, Any]) -> Iterator[Any]:
        """Yield an ``nvlist_t *`` holding ``props``; it is freed when the block ends."""
        nvl = self._alloc()
        try:
            self._fill(nvl, props)
            yield nvl
        finally:
            self._lib.nvlist_free(nvl)

    def _alloc(self) -> Any:
        ptr = self._ffi.new("nvlist_t **")
        if self._lib.nvlist_alloc(ptr, NV_UNIQUE_NAME, 0) != 0:
            raise MemoryError("nvlist_alloc failed")
        return ptr[0]

    def _fill(self, nvl: Any, props: Mapping[bytes, Any]) -> None:
        lib = self._lib
        for key, value in props.items():
            if not isinstance(key, bytes):
                raise TypeError(f"Unsupported key type {type(key).__name__}")
            _check_c_string(key)
            if isinstance(value, Mapping):
                with self.nvlist_in(value) as nested:
                    ret = lib.nvlist_add_nvlist(nvl, key, nested)
            elif isinstance(value, list):
                ret = self._add_array(nvl, key, value)
            elif isinstance(value, bytes):
                _check_c_string(value)
                ret = lib.nvlist_add_string(nvl, key, value)
            elif isinstance(value, bool):
                ret = lib.nvlist_add_boolean_value(nvl, key, int(value))
            elif value is None:
                ret = lib.nvlist_add_boolean(nvl, key)
            elif isinstance(value, int):
                ret = getattr(lib, "nvlist_add_" + KEY_INT_TYPES.get(key, "uint64"))(nvl, key, value)
            elif isinstance(value, self._ffi.CData):
                ret = getattr(lib, "nvlist_add_" + _cdata_suffixes(self._ffi, value)[0])(nvl, key, int(value))
            else:
                raise TypeError(f"Unsupported value type {type(value).__name__}")
            if ret != 0:
                raise MemoryError(f"nvlist_add failed for {key!r}, err = {ret}")

    def _add_array(self, nvl: Any, key: bytes, values: list[Any]) -> int:
        if not values:
            raise TypeError(f"Cannot tell the element type of the empty list for {key!r}")
        ffi, lib = self._ffi, self._lib
        kind = _element_kind(ffi, values[0])
        for element in values[1:]:
            if _element_kind(ffi, element) != kind:
                raise TypeError(
                    f"Array has elements of different types: {type(values[0]).__name__} and {type(element).__name__}"
                )
        if kind == "dict":
            with ExitStack() as stack:
                nested = [stack.enter_context(self.nvlist_in(v)) for v in values]
                return lib.nvlist_add_nvlist_array(nvl, key, ffi.new("nvlist_t *[]", nested), len(nested))
        if kind == "bytes":
            for v in values:
                _check_c_string(v)
            strings = [ffi.new("char[]", v) for v in values]  # kept alive until the call returns
            return lib.nvlist_add_string_array(nvl, key, ffi.new("char *[]", strings), len(strings))
        if kind == "bool":
            return lib.nvlist_add_boolean_array(nvl, key, ffi.new("boolean_t[]", [int(v) for v in values]), len(values))
        if kind == "int":
            suffix = KEY_INT_TYPES.get(key, "uint64")
            return getattr(lib, f"nvlist_add_{suffix}_array")(nvl, key, ffi.new(f"{suffix}_t[]", values), len(values))
        # typed values: kind is the C type's name
        array = ffi.new(f"{kind}[]", [int(v) for v in values])
        return getattr(lib, f"nvlist_add_{_cdata_suffixes(ffi, values[0])[1]}_array")(nvl, key, array, len(values))

    # ---- nvlist -> Python ---------------------------------------------------

    @contextmanager
    def nvlist_out(self) -> Iterator[NvlistOut]:
        """Yield an :class:`NvlistOut` whose ``ptr`` a C function fills; decode and free it afterwards.

        The value is decoded only when the block ends normally; the nvlist is
        freed in every case.
        """
        out = NvlistOut(ptr=self._ffi.new("nvlist_t **"))
        out.ptr[0] = self._ffi.NULL
        try:
            yield out
            if out.ptr[0] != self._ffi.NULL:
                out.value = self.to_dict(out.ptr[0])
        finally:
            if out.ptr[0] != self._ffi.NULL:
                self._lib.nvlist_free(out.ptr[0])
                out.ptr[0] = self._ffi.NULL

    def to_dict(self, nvl: Any) -> dict[bytes, Any]:
        """Decode an ``nvlist_t *`` (not freed: its owner frees it)."""
        ffi, lib = self._ffi, self._lib
        result: dict[bytes, Any] = {}
        pair = lib.nvlist_next_nvpair(nvl, ffi.NULL)
        while pair != ffi.NULL:
            name = ffi.string(lib.nvpair_name(pair))
            result[name] = self._value(pair, name)
            pair = lib.nvlist_next_nvpair(nvl, pair)
        return result

    def _value(self, pair: Any, name: bytes) -> Any:
        ffi, lib = self._ffi, self._lib
        type_id = int(lib.nvpair_type(pair))
        if type_id == lib.DATA_TYPE_BOOLEAN:
            return None
        if type_id in self._scalars:
            suffix, ctype, convert = self._scalars[type_id]
            out = ffi.new(ctype)
            if getattr(lib, "nvpair_value_" + suffix)(pair, out) != 0:
                raise RuntimeError(f"nvpair_value_{suffix} failed for {name!r}")
            return convert(out[0])
        if type_id in self._arrays:
            suffix, ctype, convert = self._arrays[type_id]
            out = ffi.new(ctype)
            count = ffi.new("uint_t *")
            if getattr(lib, "nvpair_value_" + suffix)(pair, out, count) != 0:
                raise RuntimeError(f"nvpair_value_{suffix} failed for {name!r}")
            return [convert(out[0][i]) for i in range(count[0])]
        raise TypeError(f"nvpair {name!r} has data type {type_id}, which the shim does not decode")


def _cdata_suffixes(ffi: Any, value: Any) -> tuple[str, str]:
    """The ``nvlist_add_*`` suffixes for a typed value; TypeError for a C type nvlists cannot hold."""
    cname = ffi.typeof(value).cname
    if cname not in CDATA_SUFFIXES:
        raise TypeError(f"Unsupported value type {cname}")
    return CDATA_SUFFIXES[cname]


def _element_kind(ffi: Any, value: Any) -> str:
    """Which nvlist array an element belongs to (bool before int: bool is an int subclass).

    A typed value's kind is its C type's name, so that an array holds one C type only.
    """
    if isinstance(value, ffi.CData):
        _cdata_suffixes(ffi, value)
        return ffi.typeof(value).cname
    if isinstance(value, Mapping):
        return "dict"
    if isinstance(value, bytes):
        return "bytes"
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, int):
        return "int"
    raise TypeError(f"Unsupported value type {type(value).__name__}")


def _check_c_string(value: bytes) -> None:
    """Refuse NUL bytes: C would silently cut the string there (a different dataset name!)."""
    if b"\0" in value:
        raise ValueError(f"embedded NUL byte in {value!r}")
