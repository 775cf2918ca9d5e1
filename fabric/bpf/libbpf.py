"""Thin ctypes binding of libbpf for pinned maps and BPF_PROG_TEST_RUN.

bcc compiles and loads our programs, but its table objects exist only inside the process that
compiled them. The maps of the translator are pinned in bpffs, so everything that reads or writes
them (the agent after a restart, ``fabric-tool state`` without compiling anything, the tests)
opens the pin with ``bpf_obj_get`` and uses the plain map syscalls through libbpf, which every
bcc installation ships (``libbpf.so.1``). bcc 0.26's ``libbcc.py`` binds neither these calls
nor ``bpf_prog_test_run_opts``, hence this module.

libbpf >= 1.0 returns ``-errno`` from these calls; :func:`_check` turns that into ``OSError``.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

_log = logging.getLogger(__name__)

# enum bpf_map_type values we use (include/uapi/linux/bpf.h)
MAP_TYPE_PERCPU_ARRAY = 6
MAP_TYPE_LPM_TRIE = 11
BPF_F_NO_PREALLOC = 1
BPF_ANY = 0

_lib: ctypes.CDLL | None = None


class _MapInfo(ctypes.Structure):
    """The head of ``struct bpf_map_info``; the kernel fills as much as we ask for."""

    _fields_ = [
        ("type", ctypes.c_uint32),
        ("id", ctypes.c_uint32),
        ("key_size", ctypes.c_uint32),
        ("value_size", ctypes.c_uint32),
        ("max_entries", ctypes.c_uint32),
        ("map_flags", ctypes.c_uint32),
        ("name", ctypes.c_char * 16),
    ]


class _TestRunOpts(ctypes.Structure):
    """``struct bpf_test_run_opts`` of libbpf (bpf.h), ``sz`` first for versioning."""

    _fields_ = [
        ("sz", ctypes.c_size_t),
        ("data_in", ctypes.c_void_p),
        ("data_out", ctypes.c_void_p),
        ("data_size_in", ctypes.c_uint32),
        ("data_size_out", ctypes.c_uint32),
        ("ctx_in", ctypes.c_void_p),
        ("ctx_out", ctypes.c_void_p),
        ("ctx_size_in", ctypes.c_uint32),
        ("ctx_size_out", ctypes.c_uint32),
        ("retval", ctypes.c_uint32),
        ("repeat", ctypes.c_int),
        ("duration", ctypes.c_uint32),
        ("flags", ctypes.c_uint32),
        ("cpu", ctypes.c_uint32),
        ("batch_size", ctypes.c_uint32),
    ]


def lib() -> ctypes.CDLL:
    global _lib
    if _lib is None:
        name = ctypes.util.find_library("bpf") or "libbpf.so.1"
        handle = ctypes.CDLL(name, use_errno=True)
        vp, u32, i32 = ctypes.c_void_p, ctypes.c_uint32, ctypes.c_int
        for fn, args in {
            "bpf_obj_get": [ctypes.c_char_p],
            "bpf_obj_get_info_by_fd": [i32, vp, ctypes.POINTER(u32)],
            "bpf_map_lookup_elem": [i32, vp, vp],
            "bpf_map_update_elem": [i32, vp, vp, ctypes.c_uint64],
            "bpf_map_delete_elem": [i32, vp],
            "bpf_map_get_next_key": [i32, vp, vp],
            "bpf_prog_test_run_opts": [i32, ctypes.POINTER(_TestRunOpts)],
            "libbpf_num_possible_cpus": [],
        }.items():
            f = getattr(handle, fn)
            f.argtypes = args
            f.restype = i32
        _lib = handle
    return _lib


def _check(ret: int, what: str) -> int:
    if ret < 0:
        code = -ret if ret < -1 else ctypes.get_errno()
        raise OSError(code, f"{what}: {os.strerror(code)}")
    return ret


def possible_cpus() -> int:
    return _check(lib().libbpf_num_possible_cpus(), "libbpf_num_possible_cpus")


@dataclass(frozen=True)
class MapDef:
    """What makes two maps interchangeable: a pin is reused only if all of this matches."""

    type: int
    key_size: int
    value_size: int
    max_entries: int
    flags: int


class PinnedMap:
    """A map opened from its bpffs pin, with ctypes key and value types.

    Per-CPU maps hand back one value per possible CPU (the kernel rounds each to 8 bytes).
    """

    def __init__(self, path: Path, key_type: Any, value_type: Any) -> None:
        self.path = path
        self.key_type = key_type
        self.value_type = value_type
        self.fd = _check(lib().bpf_obj_get(str(path).encode()), f"opening pinned map {path}")
        self.info = map_info(self.fd)
        self.percpu = self.info.type == MAP_TYPE_PERCPU_ARRAY
        self._ncpu = possible_cpus() if self.percpu else 1
        self._stride = (ctypes.sizeof(value_type) + 7) & ~7

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def _buf(self) -> ctypes.Array[ctypes.c_char]:
        return ctypes.create_string_buffer(self._stride * self._ncpu)

    def _values(self, buf: ctypes.Array[ctypes.c_char]) -> list[Any]:
        return [self.value_type.from_buffer_copy(buf.raw, i * self._stride) for i in range(self._ncpu)]

    def keys(self) -> list[Any]:
        out: list[Any] = []
        cur: Any = None
        while True:
            nxt = self.key_type()
            ret = lib().bpf_map_get_next_key(self.fd, None if cur is None else ctypes.byref(cur), ctypes.byref(nxt))
            if ret == -errno.ENOENT or (ret == -1 and ctypes.get_errno() == errno.ENOENT):
                return out
            _check(ret, f"iterating {self.path}")
            out.append(nxt)
            cur = nxt

    def lookup(self, key: Any) -> list[Any] | None:
        """The value (a list with one entry, or one per CPU), None if the key is absent."""
        buf = self._buf()
        ret = lib().bpf_map_lookup_elem(self.fd, ctypes.byref(key), buf)
        if ret == -errno.ENOENT or (ret == -1 and ctypes.get_errno() == errno.ENOENT):
            return None
        _check(ret, f"lookup in {self.path}")
        return self._values(buf)

    def items(self) -> list[tuple[Any, list[Any]]]:
        out = []
        for k in self.keys():
            v = self.lookup(k)
            if v is not None:
                out.append((k, v))
        return out

    def update(self, key: Any, value: Any) -> None:
        """Write value (for per-CPU maps: the same value on every CPU)."""
        buf = self._buf()
        raw = bytes(value)
        for i in range(self._ncpu):
            ctypes.memmove(ctypes.addressof(buf) + i * self._stride, raw, len(raw))
        _check(lib().bpf_map_update_elem(self.fd, ctypes.byref(key), buf, BPF_ANY), f"update of {self.path}")

    def delete(self, key: Any) -> bool:
        ret = lib().bpf_map_delete_elem(self.fd, ctypes.byref(key))
        if ret == -errno.ENOENT or (ret == -1 and ctypes.get_errno() == errno.ENOENT):
            return False
        _check(ret, f"delete from {self.path}")
        return True


def map_info(fd: int) -> MapDef:
    info = _MapInfo()
    size = ctypes.c_uint32(ctypes.sizeof(info))
    _check(lib().bpf_obj_get_info_by_fd(fd, ctypes.byref(info), ctypes.byref(size)), "bpf_obj_get_info_by_fd")
    return MapDef(info.type, info.key_size, info.value_size, info.max_entries, info.map_flags)


def pinned_map_def(path: Path) -> MapDef:
    fd = _check(lib().bpf_obj_get(str(path).encode()), f"opening pinned map {path}")
    try:
        return map_info(fd)
    finally:
        os.close(fd)


@dataclass(frozen=True)
class ProgTestRun:
    retval: int
    data: bytes
    duration_ns: int


def prog_test_run(prog_fd: int, data: bytes, *, repeat: int = 1, out_size: int = 0) -> ProgTestRun:
    """Run a loaded program on one packet in the kernel (``BPF_PROG_TEST_RUN``).

    For tc programs the packet starts with its Ethernet header (the kernel runs
    ``eth_type_trans`` on it); ``duration_ns`` is the kernel's average per repetition.
    """
    size = out_size or len(data) + 256
    inbuf = ctypes.create_string_buffer(data, len(data))
    outbuf = ctypes.create_string_buffer(size)
    opts = _TestRunOpts(
        sz=ctypes.sizeof(_TestRunOpts),
        data_in=ctypes.cast(inbuf, ctypes.c_void_p),
        data_out=ctypes.cast(outbuf, ctypes.c_void_p),
        data_size_in=len(data),
        data_size_out=size,
        repeat=repeat,
    )
    _check(lib().bpf_prog_test_run_opts(prog_fd, ctypes.byref(opts)), "bpf_prog_test_run_opts")
    return ProgTestRun(opts.retval, outbuf.raw[: opts.data_size_out], opts.duration)
