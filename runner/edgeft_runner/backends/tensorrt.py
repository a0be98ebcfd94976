"""TensorRT backend (Jetson and other NVIDIA GPUs) for the edgeft KV-cache model contract.

The bundle ships the ONNX graph, not an engine: an engine only runs on the TensorRT version and GPU
it was built for, so it is built here, on the device, and cached under a key of everything that
makes it valid (model, TensorRT version, GPU, precision, shape profile). Later runs deserialize it.
Uses the name-based tensor API of TensorRT >= 8.5 (set_input_shape / set_tensor_address /
execute_async_v3); device memory, copies and timing go through the ctypes CUDA wrapper in cuda.py.
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
from . import Backend
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


def _import_trt():
    try:
        import tensorrt
    except ImportError:
        raise RunnerError(INSTALL_HINT) from None
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
        raise RunnerError(f"{model_path}: cannot read the ONNX graph inputs ({exc})") from None
    return inputs


# --- pure helpers: the shape profile and the engine cache key ------------------------------------------

def optimization_shapes(inputs, options: dict | None, num_kv_heads: int | None = None,
                        head_dim: int | None = None) -> dict[str, tuple[tuple[int, ...], ...]]:
    """{input name: (min, opt, max) shape} for the one optimization profile of the engine.

    input_ids spans min..max_tokens new tokens, each past 0..max_context-1 cached tokens (0 is the
    prefill's empty cache), attention_mask min_tokens..max_context. The opt point is one consistent
    call (mask = past + seq): TensorRT tunes kernels there and rejects an opt that violates the
    graph's shape checks. Dims fixed in the ONNX graph are kept as they are; kv heads and head_dim
    come from the graph when fixed, else from the arguments (the manifest). options["static"]: every
    input fixed at its opt shape (min = opt = max).
    """
    options = options or {}
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
    if options.get("static"):
        shapes = {name: (opt, opt, opt) for name, (_, opt, _) in shapes.items()}
    return shapes


def engine_cache_key(onnx_sha256: str, trt_version: str, gpu_name: str, compute_capability, precision: str,
                     shapes: dict, workspace_mb: int | None = None) -> str:
    """sha256 of everything an engine depends on: a different value for any of them needs a new engine."""
    payload = {
        "onnx_sha256": onnx_sha256, "tensorrt": trt_version, "gpu": gpu_name,
        "compute_capability": list(compute_capability), "precision": precision, "workspace_mb": workspace_mb,
        "shapes": {name: [list(point) for point in points] for name, points in sorted(shapes.items())},
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


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

class TensorRTBackend(Backend):
    name = "tensorrt"

    def __init__(self):
        self.engine_cached: bool = False
        self.engine_build_s: float | None = None
        self.engine_path: Path | None = None
        self.device_compute_ms: list[float] = []  # GPU time of each execute_async_v3, from CUDA events
        self._buffers: dict[str, tuple[int, int]] = {}  # tensor name -> (device pointer, capacity bytes)

    def load(self, model_path, threads: int, num_kv_heads: int | None = None, head_dim: int | None = None,
             options: dict | None = None) -> None:
        trt = _import_trt()  # threads: TensorRT runs on the GPU, the CPU thread count does not apply
        options = dict(options or {})
        precision = options.get("precision") or "fp32"
        if precision not in PRECISIONS:
            raise RunnerError(f"tensorrt precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
        workspace_mb = int(options.get("workspace_mb") or DEFAULT_WORKSPACE_MB)
        self.version = trt.__version__
        self.cuda = CudaRuntime()
        gpu, cc = self.cuda.device_name(), self.cuda.compute_capability()
        self.providers = [f"TensorRT {self.version} on {gpu} (sm_{cc[0]}{cc[1]}), {precision}"]

        self.shapes = optimization_shapes(onnx_graph_inputs(model_path), options, num_kv_heads, head_dim)
        # verify_bundle has just checked the file against the manifest's sha256: reuse it when given.
        onnx_sha256 = options.get("model_sha256") or sha256_file(Path(model_path))
        key = engine_cache_key(onnx_sha256, self.version, gpu, cc, precision, self.shapes, workspace_mb)
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
            serialized = _build_engine(trt, self.logger, model_path, self.shapes, precision, workspace_mb)
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
        if len(self.past_names) != len(presents):
            raise RunnerError(f"{model_path}: {len(self.past_names)} past inputs but {len(presents)} present outputs")
        self.output_names = ["logits", *presents]  # presents pair with pasts by order, as in the ORT backend

        self.stream = self.cuda.stream_create()
        self.event_start, self.event_end = self.cuda.event_create(), self.cuda.event_create()

    def empty_past(self) -> list[np.ndarray]:
        # The profile's min past is the empty cache: [1, kv_heads, 0, head_dim] (opt when static).
        return [np.zeros(self.shapes[n][0][:2] + (0,) + self.shapes[n][0][3:], dtype=self.dtypes[n])
                for n in self.past_names]

    def forward(self, input_ids: np.ndarray, past: list[np.ndarray]) -> tuple[np.ndarray, list[np.ndarray]]:
        input_ids = np.asarray(input_ids)
        feed = {"input_ids": input_ids}
        if self.takes_attention_mask:
            past_len = past[0].shape[2] if past else 0
            feed["attention_mask"] = np.ones((1, past_len + input_ids.shape[1]), dtype=np.int64)
        feed.update(zip(self.past_names, past))

        host_inputs = []  # kept alive until the stream is synchronized: the copies read them asynchronously
        for name, array in feed.items():
            # Engine dtypes rule: TensorRT 8.x turns int64 ids into int32 inputs.
            array = np.ascontiguousarray(array, dtype=self.dtypes[name])
            if not self.context.set_input_shape(name, array.shape):
                raise RunnerError(f"tensorrt: {name} shape {list(array.shape)} is outside the engine's profile "
                                  f"{self._profile_text(name)}; raise max_tokens / max_context in the bundle")
            ptr = self._device_buffer(name, array.nbytes)
            self.context.set_tensor_address(name, ptr)
            self.cuda.copy_to_device_async(ptr, array, self.stream)
            host_inputs.append(array)

        outputs = []
        for name in self.output_names:
            shape = tuple(self.context.get_tensor_shape(name))  # concrete once every input shape is set
            if any(d < 0 for d in shape):
                raise RunnerError(f"tensorrt: output {name} has unresolved shape {list(shape)}")
            out = np.empty(shape, dtype=self.dtypes[name])
            ptr = self._device_buffer(name, out.nbytes)
            self.context.set_tensor_address(name, ptr)
            outputs.append((out, ptr))

        self.cuda.event_record(self.event_start, self.stream)
        if not self.context.execute_async_v3(self.stream):
            raise RunnerError(f"TensorRT failed to run the model: {self._last_error()}")
        self.cuda.event_record(self.event_end, self.stream)
        for out, ptr in outputs:
            self.cuda.copy_to_host_async(out, ptr, self.stream)
        self.cuda.stream_synchronize(self.stream)
        self.device_compute_ms.append(self.cuda.event_elapsed_ms(self.event_start, self.event_end))
        logits, *presents = (out for out, _ in outputs)
        return logits, presents

    def _device_buffer(self, name: str, nbytes: int) -> int:
        """The tensor's device buffer, grown to the next power of two when too small: the cache grows by
        one token per decode step, so reallocating exactly would cudaMalloc on every call."""
        ptr, capacity = self._buffers.get(name, (0, 0))
        if nbytes > capacity:
            if ptr:
                self.cuda.free(ptr)  # safe: every forward ends with a stream synchronize
            capacity = max(MIN_DEVICE_BUFFER_BYTES, 1 << (nbytes - 1).bit_length())
            ptr = self.cuda.malloc(capacity)
            self._buffers[name] = (ptr, capacity)
        return ptr

    def _profile_text(self, name: str) -> str:
        try:
            low, _, high = self.engine.get_tensor_profile_shape(name, 0)
            return f"{list(low)}..{list(high)}"
        except Exception:  # older bindings: the message is still useful without the range
            return "(range unavailable)"

    def _last_error(self) -> str:
        return _first_line(self.logger.errors[-1]) if self.logger.errors else "no details from TensorRT"

    def close(self) -> None:
        """Free device memory, the stream and events (the process exiting does this too)."""
        for ptr, _ in self._buffers.values():
            self.cuda.free(ptr)
        self._buffers.clear()
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


def _build_engine(trt, logger, model_path, shapes: dict, precision: str, workspace_mb: int):
    builder = trt.Builder(logger)
    # TensorRT 10 networks are always explicit batch (the flag is deprecated); 8.x must ask for it.
    explicit_batch = 0 if int(trt.__version__.split(".")[0]) >= 10 else \
        1 << int(trt.NetworkDefinitionCreationFlag.EXPLICIT_BATCH)
    network = builder.create_network(explicit_batch)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(model_path)):  # from the file, so external weight files resolve
        detail = parser.get_error(0).desc() if parser.num_errors else (logger.errors or ["unknown error"])[-1]
        raise RunnerError(f"TensorRT cannot parse {Path(model_path).name}: {_first_line(detail)}")

    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace_mb << 20)
    # int8: the ONNX carries explicit Q/DQ nodes, so no calibrator; fp16 is allowed for everything else.
    for flag in {"fp32": (), "fp16": ("FP16",), "int8": ("INT8", "FP16")}[precision]:
        if not hasattr(trt.BuilderFlag, flag):
            raise RunnerError(f"TensorRT {trt.__version__} has no BuilderFlag.{flag}: precision {precision} "
                              "needs a strongly typed model for this version")
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
                          "set EDGEFT_ENGINE_CACHE or the bundle's cache_dir") from None


def _write_atomic(path: Path, data) -> None:
    """tmp + rename: a run killed mid-write leaves no truncated engine under the real name."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(data)  # IHostMemory exposes the buffer protocol: no extra copy of a large engine
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise RunnerError(f"cannot write engine {path}: {exc.strerror or exc}") from None


def create_backend() -> TensorRTBackend:
    return TensorRTBackend()
