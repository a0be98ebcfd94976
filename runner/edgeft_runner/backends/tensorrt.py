"""TensorRT backend (Jetson and other NVIDIA GPUs) for the edgeft KV-cache model contract.

The bundle ships the ONNX graph, not an engine: an engine only runs on the TensorRT version and GPU
it was built for, so it is built here, on the device, and cached under a key of everything that
makes it valid (model, TensorRT version, GPU, precision, shape profile). Later runs deserialize it.
Uses the name-based tensor API of TensorRT >= 8.5 (set_input_shape / set_tensor_address /
execute_async_v3); device memory, copies and timing go through the ctypes CUDA wrapper in cuda.py.

The KV cache never leaves the GPU between steps: two cache slots are allocated at load for the
engine's max_context, each step reads its past from one and writes its presents into the other
(TensorRT cannot write an output over an input), and `past` is a HeldPast naming the slot. Per
token only the new ids go up and the logits come down, both through page-locked host memory; the
attention mask is a device buffer of ones set once.
"""

from __future__ import annotations

import hashlib
import json
import mmap
import os
import time
from pathlib import Path

import numpy as np

from .. import RunnerError
from ..bundle import sha256_file
from . import Backend, HeldPast
from .cuda import CudaRuntime

INSTALL_HINT = ("tensorrt Python module not found on this device: install JetPack's python3-libnvinfer "
                "(or pip install tensorrt on x86 GPUs); needed for bundles of runtime tensorrt")
PAST_PREFIX = "past_key_values."
PRESENT_PREFIX = "present."
PRECISIONS = ("fp32", "fp16", "int8")
DEFAULT_MAX_CONTEXT = 256
DEFAULT_WORKSPACE_MB = 1024  # Jetson GPU memory is the system RAM: don't let tactics take all of it
MIN_DEVICE_BUFFER_BYTES = 256  # also gives zero-size tensors (the empty past) a real, non-null address
NUMPY_DTYPES = {"FLOAT": np.float32, "HALF": np.float16, "INT64": np.int64, "INT32": np.int32,
                "BOOL": np.bool_, "INT8": np.int8, "UINT8": np.uint8}
# Weakly typed builds: the builder flags that let TensorRT pick lower precisions (int8: the ONNX carries
# explicit Q/DQ nodes, so no calibrator; fp16 is allowed for everything else).
PRECISION_FLAGS = {"fp32": (), "fp16": ("FP16",), "int8": ("INT8", "FP16")}
STATIC_REFUSED = ("tensorrt option static: true cannot run an edgeft KV-cache model: a static engine fixes the "
                  "cache length, so the prefill (empty cache) and the decode steps (growing cache) cannot both "
                  "run; remove tensorrt.static from the target (opt_tokens sets what TensorRT tunes for) and "
                  "rebuild the bundle")


def _import_trt():
    try:
        import tensorrt
    except ImportError:
        raise RunnerError(INSTALL_HINT)
    if not hasattr(tensorrt, "Builder"):  # e.g. a directory named tensorrt in the working directory
        where = ", ".join(getattr(tensorrt, "__path__", None) or [str(getattr(tensorrt, "__file__", "?"))])
        raise RunnerError(f"{INSTALL_HINT} (the 'tensorrt' found at {where} is not TensorRT)")
    return tensorrt


def installed_version() -> str | None:
    try:
        return _import_trt().__version__
    except RunnerError:
        return None


# --- ONNX graph inputs, read without onnx/protobuf (the device has neither) --------------------------

def _varint(buf, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        byte = buf[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if byte < 0x80:
            return result, pos
        shift += 7


def _fields(buf, start: int, end: int):
    """Yield (field number, value) of one protobuf message: an int for varints, a (start, end) span for
    length-delimited fields, None for fixed-width ones. Spans are skipped, not read: weights cost nothing."""
    pos = start
    while pos < end:
        key, pos = _varint(buf, pos)
        wire = key & 7
        if wire == 0:
            value, pos = _varint(buf, pos)
        elif wire == 2:
            size, pos = _varint(buf, pos)
            value, pos = (pos, pos + size), pos + size
        elif wire in (1, 5):
            value, pos = None, pos + (8 if wire == 1 else 4)
        else:
            raise ValueError(f"unsupported protobuf wire type {wire}")
        if pos > end:
            raise ValueError("truncated protobuf message")
        yield key >> 3, value


def _submessage(buf, span, field: int):
    return next((v for f, v in _fields(buf, *span) if f == field and isinstance(v, tuple)), None)


def onnx_graph_inputs(model_path) -> list[tuple[str, list[int | str | None] | None]]:
    """(name, shape) of each graph input; a dim is an int when fixed, its symbol (str) or None when not.

    Field numbers from onnx.proto: ModelProto.graph=7, GraphProto.input=11, ValueInfoProto.name=1/type=2,
    TypeProto.tensor_type=1, Tensor.shape=2, TensorShapeProto.dim=1, Dimension.dim_value=1/dim_param=2.
    Reading these few fields lets a cached engine be found without parsing the model.
    """
    try:
        with open(model_path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
            graph = _submessage(buf, (0, len(buf)), 7)
            if graph is None:
                raise ValueError("no graph")
            inputs = []
            for field, span in _fields(buf, *graph):
                if field != 11 or not isinstance(span, tuple):
                    continue
                name = bytes(buf[slice(*_submessage(buf, span, 1) or (0, 0))]).decode()
                shape_span = None
                if (type_span := _submessage(buf, span, 2)) and (tensor_span := _submessage(buf, type_span, 1)):
                    shape_span = _submessage(buf, tensor_span, 2)
                shape = None
                if shape_span:
                    shape = []
                    for dim_field, dim_span in _fields(buf, *shape_span):
                        if dim_field == 1 and isinstance(dim_span, tuple):
                            dim = dict(_fields(buf, *dim_span))
                            if 1 in dim:  # int64 varint: a negative value (-1 = unknown) arrives as 2**64 - n
                                shape.append(dim[1] - (1 << 64) if dim[1] >= 1 << 63 else dim[1])
                            else:
                                shape.append(bytes(buf[slice(*dim[2])]).decode() if 2 in dim else None)
                inputs.append((name, shape))
    except (OSError, ValueError, IndexError, UnicodeDecodeError) as exc:
        raise RunnerError(f"{model_path}: cannot read the ONNX graph inputs ({exc})") from exc
    return inputs


# --- pure helpers: the shape profile and the engine cache key ------------------------------------------

def optimization_shapes(inputs, options: dict | None, num_kv_heads: int | None = None,
                        head_dim: int | None = None) -> dict[str, tuple[tuple[int, ...], ...]]:
    """{input name: (min, opt, max) shape} for the one optimization profile of the engine.

    input_ids spans min..max_tokens new tokens, each past 0..max_context-1 cached tokens (0 is the
    prefill's empty cache), attention_mask min_tokens..max_context. The opt point is one consistent
    call (mask = past + seq): TensorRT tunes kernels there and rejects an opt that violates the
    graph's shape checks. Dims fixed in the ONNX graph are kept as they are; kv heads and head_dim
    come from the graph when fixed, else from the arguments (the manifest). options["static"] is refused
    (STATIC_REFUSED): no single shape serves both an empty and a growing cache.
    """
    options = options or {}
    if options.get("static"):
        raise RunnerError(STATIC_REFUSED)
    max_context = int(options.get("max_context") or DEFAULT_MAX_CONTEXT)
    max_tokens = int(options.get("max_tokens") or max_context)
    min_tokens = int(options.get("min_tokens") or 1)
    opt_tokens = int(options.get("opt_tokens") or min(64, max_tokens))
    if not 1 <= min_tokens <= opt_tokens <= max_tokens <= max_context:
        raise RunnerError(f"tensorrt options need 1 <= min_tokens ({min_tokens}) <= opt_tokens ({opt_tokens}) "
                          f"<= max_tokens ({max_tokens}) <= max_context ({max_context})")
    opt_past = int(options.get("opt_past", min(opt_tokens, max_context - opt_tokens)))
    if not 0 <= opt_past <= max_context - opt_tokens:
        raise RunnerError(f"tensorrt options: opt_past {opt_past} must be in 0..max_context - opt_tokens "
                          f"({max_context - opt_tokens})")

    def fixed(shape, dim, fallback, name, what):
        value = shape[dim] if shape and len(shape) > dim and isinstance(shape[dim], int) and shape[dim] > 0 else fallback
        if not isinstance(value, int) or value < 1:
            raise RunnerError(f"{name}: {what} is symbolic in the model and the manifest gives none")
        return value

    shapes = {}
    for name, shape in inputs:
        if name == "input_ids":
            shapes[name] = ((1, min_tokens), (1, opt_tokens), (1, max_tokens))
        elif name == "attention_mask":
            shapes[name] = ((1, min_tokens), (1, opt_past + opt_tokens), (1, max_context))
        elif name.startswith(PAST_PREFIX):
            heads = fixed(shape, 1, num_kv_heads, name, "kv heads")
            dim = fixed(shape, 3, head_dim, name, "head_dim")
            shapes[name] = tuple((1, heads, past, dim) for past in (0, opt_past, max_context - 1))
        elif shape is not None and all(isinstance(d, int) and d >= 0 for d in shape):
            shapes[name] = (tuple(shape),) * 3  # some other input with a fixed shape
        else:
            raise RunnerError(f"model input {name} {shape} is dynamic and not part of the edgeft KV-cache contract")
        if shape is not None and len(shape) != len(shapes[name][0]):
            raise RunnerError(f"model input {name} has rank {len(shape)}, expected {len(shapes[name][0])}")
        # A dim the graph fixes must be the same at every profile point (e.g. a static sequence length).
        shapes[name] = tuple(tuple(s if isinstance(s, int) and s > 0 else d for d, s in zip(point, shape or point))
                             for point in shapes[name])
    return shapes


def network_plan(precision: str, trt_version: str, has_strongly_typed: bool) -> tuple[bool, tuple[str, ...]]:
    """(strongly typed network?, builder flags to set) for one build.

    TensorRT >= 10 builds fp16 and int8 as a strongly typed network: edgeft's fp16 ONNX is fp16-typed and
    its int8 ONNX has explicit Q/DQ, so the model's own types say what runs in which precision, and the
    FP16/INT8 builder flags are deprecated in TensorRT 10 (gone in 11, where every network is strongly
    typed). In that mode the layers outside Q/DQ pairs run in the ONNX's type (fp32 for int8-static).
    fp32 and TensorRT 8.x/9.x: a weakly typed network with PRECISION_FLAGS."""
    major = int(str(trt_version).split(".")[0])
    if precision != "fp32" and has_strongly_typed and major >= 10:
        return True, ()
    return False, PRECISION_FLAGS[precision]


def engine_cache_key(onnx_sha256: str, trt_version: str, gpu_name: str, compute_capability, precision: str,
                     shapes: dict, workspace_mb: int | None = None, strongly_typed: bool = False) -> str:
    """sha256 of everything an engine depends on: a different value for any of them needs a new engine."""
    payload = {
        "onnx_sha256": onnx_sha256, "tensorrt": trt_version, "gpu": gpu_name,
        "compute_capability": list(compute_capability), "precision": precision, "workspace_mb": workspace_mb,
        "shapes": {name: [list(point) for point in points] for name, points in sorted(shapes.items())},
    }
    if strongly_typed:  # only then: weakly typed engines cached before this field existed keep their keys
        payload["strongly_typed"] = True
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def model_files_sha256(model_path, known: dict | None = None) -> str:
    """One sha256 over the model file and every file beside it whose name starts with its name (its
    external data, e.g. model.onnx.data: the bundle ships them by that rule), so two models that share
    a graph but not their weights never share an engine. `known`: {file name: sha256} already verified
    (the manifest's); other files are hashed here."""
    model_path = Path(model_path)
    known = known or {}
    files = sorted(p for p in model_path.parent.iterdir() if p.is_file() and p.name.startswith(model_path.name))
    hashes = {p.name: known.get(p.name) or sha256_file(p) for p in files}
    return hashlib.sha256(json.dumps(hashes, sort_keys=True).encode()).hexdigest()


def engine_cache_dir(options: dict | None) -> Path:
    configured = (options or {}).get("cache_dir") or os.environ.get("EDGEFT_ENGINE_CACHE")
    return Path(configured).expanduser() if configured else Path.home() / ".cache" / "edgeft-runner" / "engines"


def numpy_dtype(trt_dtype) -> type:
    name = str(trt_dtype).rsplit(".", 1)[-1]  # "DataType.HALF" -> "HALF"; avoids members older versions lack
    if name not in NUMPY_DTYPES:
        raise RunnerError(f"TensorRT tensor type {name} is not supported by the runner")
    return NUMPY_DTYPES[name]


def _first_line(text) -> str:
    text = str(text).strip()
    return text.splitlines()[0] if text else "no details"


# --- the backend ---------------------------------------------------------------------------------------

def next_slot(past_slot: int | None, last_written: int) -> int:
    """The slot a step writes its presents into: the one its past is not in (TensorRT cannot write an
    output over an input); from the empty cache, the one not written last (so the past made last stays)."""
    return 1 - past_slot if past_slot is not None else 1 - last_written


class TensorRTBackend(Backend):
    name = "tensorrt"

    def __init__(self):
        self.engine_cached: bool = False
        self.engine_build_s: float | None = None
        self.engine_path: Path | None = None
        self.strongly_typed: bool = False
        self.device_compute_ms: list[float] = []  # GPU time of each execute_async_v3, from CUDA events
        self._buffers: dict[str, tuple[int, int]] = {}  # tensor name -> (device pointer, capacity bytes)
        self._host: dict[str, np.ndarray] = {}  # name -> page-locked host buffer (uint8)
        self._slots: list[list[int]] = []  # 2 cache slots x one device buffer per past tensor
        self._versions = [0, 0]  # writes to each slot so far
        self._last_written = 1  # so the first step writes slot 0
        self._shapes_set: dict[str, tuple] = {}  # input shapes the context has now: unchanged ones are not set again

    def load(self, model_path, threads: int, num_kv_heads: int | None = None, head_dim: int | None = None,
             options: dict | None = None) -> None:
        # threads: TensorRT runs on the GPU, the CPU thread count does not apply.
        options = dict(options or {})
        precision = options.get("precision") or "fp32"
        if precision not in PRECISIONS:
            raise RunnerError(f"tensorrt precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
        workspace_mb = int(options.get("workspace_mb") or DEFAULT_WORKSPACE_MB)
        # Options and shapes first: a bundle that cannot run is refused before any TensorRT or CUDA work.
        self.shapes = optimization_shapes(onnx_graph_inputs(model_path), options, num_kv_heads, head_dim)
        trt = _import_trt()
        self.version = trt.__version__
        self.cuda = CudaRuntime()
        gpu, cc = self.cuda.device_name(), self.cuda.compute_capability()
        self.strongly_typed, builder_flags = network_plan(
            precision, self.version, hasattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED"))
        typing = "strongly typed" if self.strongly_typed else "weakly typed"
        self.providers = [f"TensorRT {self.version} on {gpu} (sm_{cc[0]}{cc[1]}), {precision}, {typing}"]

        # verify_bundle has just checked the files against the manifest's sha256s: reuse them when given.
        onnx_sha256 = model_files_sha256(model_path, options.get("model_files"))
        key = engine_cache_key(onnx_sha256, self.version, gpu, cc, precision, self.shapes, workspace_mb,
                               strongly_typed=self.strongly_typed)
        cache_dir = engine_cache_dir(options)
        self.engine_path = cache_dir / f"{key}.engine"

        self.logger = _error_logger(trt)
        runtime = trt.Runtime(self.logger)
        engine = None
        if self.engine_path.is_file():
            # None for a truncated/corrupt file (or a TensorRT build it does not accept): rebuild it once.
            try:
                engine = runtime.deserialize_cuda_engine(self.engine_path.read_bytes())
            except Exception:  # some bindings raise instead of returning None
                engine = None
            self.logger.errors.clear()  # the failed deserialize's complaint is not the build's
        self.engine_cached = engine is not None
        if engine is None:
            _check_writable(cache_dir)  # before a build that can take many minutes, not after
            t0 = time.perf_counter()
            serialized = _build_engine(trt, self.logger, model_path, self.shapes, precision, workspace_mb,
                                       self.strongly_typed, builder_flags)
            self.engine_build_s = round(time.perf_counter() - t0, 3)
            _write_atomic(self.engine_path, serialized)
            engine = runtime.deserialize_cuda_engine(serialized)
            if engine is None:
                raise RunnerError(f"TensorRT cannot load the engine it just built: {self._last_error()}")
        self.engine = engine
        self.context = engine.create_execution_context()
        if self.context is None:
            raise RunnerError(f"TensorRT cannot create an execution context (GPU memory?): {self._last_error()}")

        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        is_input = {n: engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT for n in names}
        self.dtypes = {n: numpy_dtype(engine.get_tensor_dtype(n)) for n in names}
        if "input_ids" not in names or "logits" not in names:
            raise RunnerError(f"{model_path}: engine lacks the 'input_ids' input or the 'logits' output")
        self.takes_attention_mask = "attention_mask" in names and is_input["attention_mask"]
        self.past_names = [n for n in names if is_input[n] and n.startswith(PAST_PREFIX)]
        presents = [n for n in names if not is_input[n] and n.startswith(PRESENT_PREFIX)]
        if len(self.past_names) != len(presents) or not self.past_names:
            raise RunnerError(f"{model_path}: {len(self.past_names)} past inputs but {len(presents)} "
                              "present outputs (an edgeft KV-cache model has one present per past)")
        # present.{i}.key is written where past_key_values.{i}.key is read next step: pair them by name
        # (by order for other names), and they must agree on the element type.
        by_name = [PRESENT_PREFIX + n[len(PAST_PREFIX):] for n in self.past_names]
        self.present_names = by_name if set(by_name) == set(presents) else presents
        for past, present in zip(self.past_names, self.present_names):
            if self.dtypes[past] != self.dtypes[present]:
                raise RunnerError(f"{model_path}: {present} is {np.dtype(self.dtypes[present]).name} but {past} is "
                                  f"{np.dtype(self.dtypes[past]).name}; the cache must keep one type")
        self.output_names = ["logits", *self.present_names]

        self.stream = self.cuda.stream_create()
        self.event_start, self.event_end = self.cuda.event_create(), self.cuda.event_create()
        self._allocate_cache()

    def _allocate_cache(self) -> None:
        """Both cache slots at the profile's largest cache, the empty cache's address and the mask's ones."""
        largest = [self.shapes[name][2] for name in self.past_names]  # (1, heads, max_context - 1, head_dim)
        self.max_context = largest[0][2] + 1
        self._kv_dims = [(shape[1], shape[3]) for shape in largest]
        slot_bytes = [heads * self.max_context * dim * np.dtype(self.dtypes[name]).itemsize
                      for (heads, dim), name in zip(self._kv_dims, self.past_names)]
        self._slots = [[self.cuda.malloc(max(nbytes, MIN_DEVICE_BUFFER_BYTES)) for nbytes in slot_bytes]
                       for _ in range(2)]
        self._empty = self.cuda.malloc(MIN_DEVICE_BUFFER_BYTES)  # zero-size tensors still need a real address
        if self.takes_attention_mask:
            mask_dtype = self.dtypes["attention_mask"]
            nbytes = self.max_context * np.dtype(mask_dtype).itemsize
            ones = self._host_buffer("attention_mask", nbytes)[:nbytes].view(mask_dtype)
            ones[:] = 1
            ptr = self._device_buffer("attention_mask", nbytes)
            self.cuda.copy_to_device_async(ptr, ones, self.stream)
            self.cuda.stream_synchronize(self.stream)
            self.context.set_tensor_address("attention_mask", ptr)  # each step sets only its length

    def empty_past(self) -> HeldPast:
        return HeldPast(None, 0)

    def past_arrays(self, past) -> list[np.ndarray]:
        """The cache as numpy arrays [1, kv_heads, length, head_dim] (a copy from the GPU: for checks, not steps)."""
        if not isinstance(past, HeldPast):
            return list(past)
        self._check_current(past)
        arrays = [np.empty((1, heads, past.length, dim), dtype=self.dtypes[name])
                  for (heads, dim), name in zip(self._kv_dims, self.past_names)]
        if past.slot is not None:
            for array, ptr in zip(arrays, self._slots[past.slot]):
                self.cuda.copy_to_host_async(array, ptr, self.stream)
            self.cuda.stream_synchronize(self.stream)
        return arrays

    def forward(self, input_ids: np.ndarray, past) -> tuple[np.ndarray, HeldPast]:
        """past: a HeldPast from empty_past / forward, or numpy arrays (copied to the GPU once)."""
        input_ids = np.asarray(input_ids)
        seq = input_ids.shape[1]
        past = self._check_current(past) if isinstance(past, HeldPast) else self._upload(past)
        total = past.length + seq
        if total > self.max_context:
            raise RunnerError(f"tensorrt: {total} tokens exceed the engine's max_context {self.max_context}; "
                              "raise tensorrt.max_context in the target and rebuild the bundle")
        out_slot = next_slot(past.slot, self._last_written)
        context, stream = self.context, self.stream

        ids_dtype = self.dtypes["input_ids"]  # TensorRT 8.x turns int64 ids into int32 inputs
        nbytes = seq * np.dtype(ids_dtype).itemsize
        ids = self._host_buffer("input_ids", nbytes)[:nbytes].view(ids_dtype)
        ids[:] = input_ids[0]
        self._set_shape("input_ids", (1, seq))
        ptr = self._device_buffer("input_ids", nbytes)
        context.set_tensor_address("input_ids", ptr)
        self.cuda.copy_to_device_async(ptr, ids, stream)
        if self.takes_attention_mask:
            self._set_shape("attention_mask", (1, total))
        past_ptrs = self._slots[past.slot] if past.slot is not None else [self._empty] * len(self.past_names)
        for name, (heads, dim), ptr in zip(self.past_names, self._kv_dims, past_ptrs):
            self._set_shape(name, (1, heads, past.length, dim))
            context.set_tensor_address(name, ptr)
        for name, ptr in zip(self.present_names, self._slots[out_slot]):
            context.set_tensor_address(name, ptr)
        shape = tuple(context.get_tensor_shape("logits"))  # concrete once every input shape is set
        if len(shape) != 3 or shape[:2] != (1, seq) or shape[2] < 1:
            raise RunnerError(f"tensorrt: logits have shape {list(shape)} for {seq} input tokens; expected [1, {seq}, vocab]")
        logits_dtype = self.dtypes["logits"]
        nbytes = seq * shape[2] * np.dtype(logits_dtype).itemsize
        logits_ptr = self._device_buffer("logits", nbytes)
        context.set_tensor_address("logits", logits_ptr)

        self._versions[out_slot] += 1  # from here the slot's previous cache is gone, whatever happens next
        self._last_written = out_slot
        self.cuda.event_record(self.event_start, stream)
        if not context.execute_async_v3(stream):
            raise RunnerError(f"TensorRT failed to run the model: {self._last_error()}")
        self.cuda.event_record(self.event_end, stream)
        host = self._host_buffer("logits", nbytes)[:nbytes]
        self.cuda.copy_to_host_async(host, logits_ptr, stream)
        self.cuda.stream_synchronize(stream)
        self.device_compute_ms.append(self.cuda.event_elapsed_ms(self.event_start, self.event_end))
        # A copy the caller owns: the page-locked buffer is rewritten by the next step.
        logits = host.view(logits_dtype).reshape(shape).copy()
        return logits, HeldPast(out_slot, total, self._versions[out_slot])

    def _check_current(self, past: HeldPast) -> HeldPast:
        if past.slot is not None and past.version != self._versions[past.slot]:
            raise RunnerError("tensorrt: this past was overwritten on the GPU by a later step: the backend keeps "
                              "two caches, and a past stays valid until a step that started from another past "
                              "writes over it; keep the latest past, or pass past_arrays(past) to start again")
        return past

    def _upload(self, arrays) -> HeldPast:
        """numpy arrays as a past: copied into the slot not written last (once; the steps after stay on the GPU)."""
        if len(arrays) != len(self.past_names):
            raise RunnerError(f"tensorrt: past has {len(arrays)} tensors, the model takes {len(self.past_names)}")
        arrays = [np.ascontiguousarray(a, dtype=self.dtypes[name]) for a, name in zip(arrays, self.past_names)]
        length = arrays[0].shape[2]
        for array, (heads, dim), name in zip(arrays, self._kv_dims, self.past_names):
            if array.shape != (1, heads, length, dim) or length >= self.max_context:
                raise RunnerError(f"tensorrt: past {name} has shape {list(array.shape)}; expected "
                                  f"[1, {heads}, n, {dim}] with n < max_context {self.max_context}")
        if length == 0:
            return HeldPast(None, 0)
        slot = 1 - self._last_written
        for array, ptr in zip(arrays, self._slots[slot]):
            self.cuda.copy_to_device_async(ptr, array, self.stream)
        self.cuda.stream_synchronize(self.stream)
        self._versions[slot] += 1
        self._last_written = slot
        return HeldPast(slot, length, self._versions[slot])

    def _set_shape(self, name: str, shape: tuple) -> None:
        if self._shapes_set.get(name) == shape:
            return
        if not self.context.set_input_shape(name, shape):
            raise RunnerError(f"tensorrt: {name} shape {list(shape)} is outside the engine's profile "
                              f"{self._profile_text(name)}; raise max_tokens / max_context in the bundle")
        self._shapes_set[name] = shape

    def _device_buffer(self, name: str, nbytes: int) -> int:
        """The tensor's device buffer, grown to the next power of two when too small (ids and logits grow
        with the prompt; the KV cache has its fixed slots)."""
        ptr, capacity = self._buffers.get(name, (0, 0))
        if nbytes > capacity:
            if ptr:
                self.cuda.free(ptr)  # safe: every forward ends with a stream synchronize
            capacity = max(MIN_DEVICE_BUFFER_BYTES, 1 << (nbytes - 1).bit_length())
            ptr = self.cuda.malloc(capacity)
            self._buffers[name] = (ptr, capacity)
        return ptr

    def _host_buffer(self, name: str, nbytes: int) -> np.ndarray:
        """A page-locked host buffer (uint8) of at least nbytes, grown like _device_buffer."""
        buffer = self._host.get(name)
        if buffer is None or buffer.nbytes < nbytes:
            if buffer is not None:
                self.cuda.free_host(buffer.ctypes.data)
            buffer = self._host[name] = self.cuda.host_alloc(max(MIN_DEVICE_BUFFER_BYTES, 1 << (nbytes - 1).bit_length()))
        return buffer

    def _profile_text(self, name: str) -> str:
        try:
            low, _, high = self.engine.get_tensor_profile_shape(name, 0)
            return f"{list(low)}..{list(high)}"
        except Exception:  # older bindings: the message is still useful without the range
            return "(range unavailable)"

    def _last_error(self) -> str:
        return _first_line(self.logger.errors[-1]) if self.logger.errors else "no details from TensorRT"

    def close(self) -> None:
        """Free device and page-locked memory, the stream and events (the process exiting does this too)."""
        for ptr, _ in self._buffers.values():
            self.cuda.free(ptr)
        self._buffers.clear()
        for ptr in [p for slot in self._slots for p in slot] + ([self._empty] if self._slots else []):
            self.cuda.free(ptr)
        self._slots = []
        for buffer in self._host.values():
            self.cuda.free_host(buffer.ctypes.data)
        self._host.clear()
        if getattr(self, "stream", None):
            self.cuda.event_destroy(self.event_start)
            self.cuda.event_destroy(self.event_end)
            self.cuda.stream_destroy(self.stream)
            self.stream = None


def _error_logger(trt):
    """A TensorRT logger that keeps errors for our one-line messages instead of printing them."""

    class ErrorLogger(trt.ILogger):
        def __init__(self):
            trt.ILogger.__init__(self)
            self.errors: list[str] = []

        def log(self, severity, msg):
            if severity in (trt.ILogger.Severity.INTERNAL_ERROR, trt.ILogger.Severity.ERROR):
                self.errors.append(str(msg))

    return ErrorLogger()


def _build_engine(trt, logger, model_path, shapes: dict, precision: str, workspace_mb: int,
                  strongly_typed: bool, builder_flags: tuple[str, ...]):
    builder = trt.Builder(logger)
    # TensorRT 10 networks are always explicit batch (the flag is deprecated, gone in 11); 8.x must ask for it.
    if int(trt.__version__.split(".")[0]) >= 10:
        network_flags = 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED) if strongly_typed else 0
    else:
        network_flags = 1 << int(trt.NetworkDefinitionCreationFlag.EXPLICIT_BATCH)
    network = builder.create_network(network_flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(model_path)):  # from the file, so external weight files resolve
        detail = parser.get_error(0).desc() if parser.num_errors else (logger.errors or ["unknown error"])[-1]
        raise RunnerError(f"TensorRT cannot parse {Path(model_path).name}: {_first_line(detail)}")

    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace_mb << 20)
    for flag in builder_flags:  # none when strongly typed: the network's own types decide (network_plan)
        if not hasattr(trt.BuilderFlag, flag):
            raise RunnerError(f"TensorRT {trt.__version__} has no BuilderFlag.{flag} for precision {precision} "
                              "and no strongly typed network mode: use TensorRT 8.5 or later")
        config.set_flag(getattr(trt.BuilderFlag, flag))

    network_inputs = {network.get_input(i).name for i in range(network.num_inputs)}
    if missing := sorted(network_inputs - shapes.keys()):
        raise RunnerError(f"no shape profile for model inputs {missing}")
    profile = builder.create_optimization_profile()
    for name in sorted(network_inputs):  # graph inputs that are initializers are not network inputs
        profile.set_shape(name, *shapes[name])
    config.add_optimization_profile(profile)

    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise RunnerError(f"TensorRT could not build an engine for {Path(model_path).name} ({precision}): "
                          f"{_first_line((logger.errors or ['no details from TensorRT'])[-1])}")
    return serialized


def _check_writable(cache_dir: Path) -> None:
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
        probe = cache_dir / f".probe.{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise RunnerError(f"engine cache {cache_dir} is not writable ({exc.strerror or exc}): "
                          "set EDGEFT_ENGINE_CACHE or the bundle's cache_dir") from exc


def _write_atomic(path: Path, data) -> None:
    """tmp + rename: a run killed mid-write leaves no truncated engine under the real name."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(data)  # IHostMemory exposes the buffer protocol: no extra copy of a large engine
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise RunnerError(f"cannot write engine {path}: {exc.strerror or exc}") from exc


def create_backend() -> TensorRTBackend:
    return TensorRTBackend()
