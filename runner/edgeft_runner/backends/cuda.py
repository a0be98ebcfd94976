"""Minimal ctypes wrapper over the CUDA runtime (libcudart): device memory, copies, streams, events.

The TensorRT backend needs device buffers and a stream, and the runner may import nothing beyond
the stdlib, numpy and the runtime itself: pycuda / cuda-python are not on a stock JetPack image,
libcudart always is. Every call's return code is checked and turned into a one-line RunnerError.
"""

from __future__ import annotations

import ctypes
import glob
import os
import re

import numpy as np

from .. import RunnerError

# JetPack 5 ships CUDA 11.4 (soname .11.0), JetPack 6 CUDA 12, JetPack 7 / Thor CUDA 13. The unversioned
# libcudart.so comes only with the toolkit's -dev package: runtime-only images have just the versioned ones.
LIBCUDART_SONAMES = ("libcudart.so", "libcudart.so.13", "libcudart.so.12", "libcudart.so.11.0", "libcudart.so.11")
# Where CUDA installs it when the dynamic loader is not told (no ld.so.conf.d entry, e.g. in containers).
CUDA_LIB_DIRS = ("/usr/local/cuda/lib64", "/usr/local/cuda/targets/*/lib", "/usr/local/cuda-*/lib64",
                 "/usr/local/cuda-*/targets/*/lib")
NOT_FOUND = "CUDA runtime (libcudart) not found on this device: install JetPack / the CUDA toolkit"

MEMCPY_HOST_TO_DEVICE = 1  # cudaMemcpyKind
MEMCPY_DEVICE_TO_HOST = 2
ATTR_CC_MAJOR = 75  # cudaDevAttrComputeCapabilityMajor
ATTR_CC_MINOR = 76  # cudaDevAttrComputeCapabilityMinor
# cudaDeviceProp grew across CUDA releases (~1 KiB in 12.x); the name is its first field either way,
# so a buffer far larger than any version's struct is safe to hand to any of them.
DEVICE_PROP_BUFFER_BYTES = 16384
DEVICE_NAME_BYTES = 256

_c = ctypes
_PTR = _c.c_void_p
# name -> (restype is always cudaError_t = int, argtypes); declared so ints are never truncated.
_SIGNATURES = {
    "cudaGetDeviceCount": (_c.POINTER(_c.c_int),),
    "cudaMalloc": (_c.POINTER(_PTR), _c.c_size_t),
    "cudaFree": (_PTR,),
    "cudaHostAlloc": (_c.POINTER(_PTR), _c.c_size_t, _c.c_uint),
    "cudaFreeHost": (_PTR,),
    "cudaMemcpyAsync": (_PTR, _PTR, _c.c_size_t, _c.c_int, _PTR),
    "cudaStreamCreate": (_c.POINTER(_PTR),),
    "cudaStreamSynchronize": (_PTR,),
    "cudaStreamDestroy": (_PTR,),
    "cudaEventCreate": (_c.POINTER(_PTR),),
    "cudaEventRecord": (_PTR, _PTR),
    "cudaEventSynchronize": (_PTR,),
    "cudaEventElapsedTime": (_c.POINTER(_c.c_float), _PTR, _PTR),
    "cudaEventDestroy": (_PTR,),
    "cudaDeviceGetAttribute": (_c.POINTER(_c.c_int), _c.c_int, _c.c_int),
}


def _version(path: str) -> tuple[int, ...]:
    suffix = os.path.basename(path)[len("libcudart.so"):]  # "" or ".12.2.140"
    return tuple(int(part) for part in re.findall(r"\d+", suffix))


def libcudart_candidates(lib_dirs=CUDA_LIB_DIRS) -> list[str]:
    """What to try, in order: the sonames (the dynamic loader's own search), then the libcudart.so* files
    in CUDA's install directories (glob patterns), per directory the unversioned one first, then the
    newest version."""
    found = []
    for pattern in lib_dirs:
        for directory in sorted(glob.glob(pattern)):
            files = [p for p in glob.glob(os.path.join(glob.escape(directory), "libcudart.so*"))
                     if re.fullmatch(r"libcudart\.so(\.\d+)*", os.path.basename(p))]
            found += sorted(files, key=lambda p: (bool(_version(p)), [-v for v in _version(p)]))
    return list(dict.fromkeys([*LIBCUDART_SONAMES, *found]))


def load_libcudart(candidates=None) -> ctypes.CDLL:
    """The first candidate (default: libcudart_candidates()) that loads; RunnerError(NOT_FOUND) when none does."""
    for name in libcudart_candidates() if candidates is None else candidates:
        try:
            return ctypes.CDLL(name)
        except OSError:
            continue
    raise RunnerError(NOT_FOUND)


class CudaRuntime:
    """Device 0 of this process (Jetsons have one GPU); pointers, streams and events are plain ints."""

    def __init__(self, candidates=None):
        self.lib = load_libcudart(candidates)
        for name, argtypes in _SIGNATURES.items():
            fn = getattr(self.lib, name)
            fn.argtypes, fn.restype = argtypes, _c.c_int
        self.lib.cudaGetErrorString.argtypes, self.lib.cudaGetErrorString.restype = (_c.c_int,), _c.c_char_p
        # CUDA 12 renamed the struct-versioned entry point (the old name keeps the old, smaller struct).
        self._get_properties = getattr(self.lib, "cudaGetDeviceProperties_v2", None) or self.lib.cudaGetDeviceProperties
        self._get_properties.argtypes, self._get_properties.restype = (_c.c_char_p, _c.c_int), _c.c_int
        # Fails here, with CUDA's own words, when there is no GPU or the driver is too old.
        count = _c.c_int()
        self.check(self.lib.cudaGetDeviceCount(_c.byref(count)), "cudaGetDeviceCount")

    def check(self, status: int, call: str) -> None:
        if status != 0:
            text = self.lib.cudaGetErrorString(status)
            text = text.decode(errors="replace") if text else "unknown error"
            raise RunnerError(f"CUDA error in {call}: {text} (cudaError {status})")

    # --- device facts ---
    def device_name(self, device: int = 0) -> str:
        buffer = _c.create_string_buffer(DEVICE_PROP_BUFFER_BYTES)
        self.check(self._get_properties(buffer, device), "cudaGetDeviceProperties")
        return buffer.raw[:DEVICE_NAME_BYTES].split(b"\0", 1)[0].decode(errors="replace")

    def compute_capability(self, device: int = 0) -> tuple[int, int]:
        major, minor = _c.c_int(), _c.c_int()
        self.check(self.lib.cudaDeviceGetAttribute(_c.byref(major), ATTR_CC_MAJOR, device), "cudaDeviceGetAttribute")
        self.check(self.lib.cudaDeviceGetAttribute(_c.byref(minor), ATTR_CC_MINOR, device), "cudaDeviceGetAttribute")
        return major.value, minor.value

    # --- memory ---
    def malloc(self, nbytes: int) -> int:
        ptr = _PTR()
        self.check(self.lib.cudaMalloc(_c.byref(ptr), nbytes), f"cudaMalloc({nbytes} bytes)")
        return ptr.value

    def free(self, ptr: int) -> None:
        self.check(self.lib.cudaFree(ptr), "cudaFree")

    def host_alloc(self, nbytes: int) -> np.ndarray:
        """Page-locked host memory as a uint8 array: copies from it are true async DMA, where pageable
        memory is first staged by the driver, synchronously. Free with free_host(array.ctypes.data)."""
        ptr = _PTR()
        self.check(self.lib.cudaHostAlloc(_c.byref(ptr), nbytes, 0), f"cudaHostAlloc({nbytes} bytes)")
        return np.ctypeslib.as_array((_c.c_uint8 * nbytes).from_address(ptr.value))

    def free_host(self, ptr: int) -> None:
        self.check(self.lib.cudaFreeHost(ptr), "cudaFreeHost")

    def copy_to_device_async(self, device_ptr: int, host: np.ndarray, stream: int) -> None:
        """host must be C-contiguous and stay alive until the stream is synchronized."""
        self.check(self.lib.cudaMemcpyAsync(device_ptr, host.ctypes.data, host.nbytes, MEMCPY_HOST_TO_DEVICE, stream),
                   "cudaMemcpyAsync (host to device)")

    def copy_to_host_async(self, host: np.ndarray, device_ptr: int, stream: int) -> None:
        self.check(self.lib.cudaMemcpyAsync(host.ctypes.data, device_ptr, host.nbytes, MEMCPY_DEVICE_TO_HOST, stream),
                   "cudaMemcpyAsync (device to host)")

    # --- streams and events ---
    def stream_create(self) -> int:
        stream = _PTR()
        self.check(self.lib.cudaStreamCreate(_c.byref(stream)), "cudaStreamCreate")
        return stream.value

    def stream_synchronize(self, stream: int) -> None:
        self.check(self.lib.cudaStreamSynchronize(stream), "cudaStreamSynchronize")

    def stream_destroy(self, stream: int) -> None:
        self.check(self.lib.cudaStreamDestroy(stream), "cudaStreamDestroy")

    def event_create(self) -> int:
        event = _PTR()
        self.check(self.lib.cudaEventCreate(_c.byref(event)), "cudaEventCreate")
        return event.value

    def event_record(self, event: int, stream: int) -> None:
        self.check(self.lib.cudaEventRecord(event, stream), "cudaEventRecord")

    def event_synchronize(self, event: int) -> None:
        self.check(self.lib.cudaEventSynchronize(event), "cudaEventSynchronize")

    def event_elapsed_ms(self, start: int, end: int) -> float:
        ms = _c.c_float()
        self.check(self.lib.cudaEventElapsedTime(_c.byref(ms), start, end), "cudaEventElapsedTime")
        return float(ms.value)

    def event_destroy(self, event: int) -> None:
        self.check(self.lib.cudaEventDestroy(event), "cudaEventDestroy")
