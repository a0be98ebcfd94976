"""ONNX Runtime backend (CPUExecutionProvider) for the edgeft KV-cache model contract.

The KV cache stays in ONNX Runtime's memory between steps: `forward` returns each present tensor as
the OrtValue the session produced, and takes it back as the next step's past as it is, never through
numpy (before 1.19 ONNX Runtime copied every output into a new numpy array: the whole cache, each
token). A decode step writes its token into one int64 buffer wrapped once, and attention masks are
views of one all-ones buffer, wrapped once per length: nothing is copied or allocated per step beyond
what the graph itself allocates (its Concat grows the cache into a new tensor).

Steps run through ONNX Runtime's pybind session and OrtValues, the objects its public Python classes
wrap: their per-tensor wrapping and checks cost ~1 µs per tensor per call, 100 µs a token on a
24-layer model (bench/bench_runner_overhead.py). An onnxruntime without them gets the public API.

A fused graph (export `graph: fused`: GroupQueryAttention, which writes the new tokens' keys and values
into the cache it reads) says so in its metadata (`edgeft.kv_cache: in-place`). Its cache is then one
preallocated buffer per past tensor, bound through an IO binding as both the past input and the present
output once, and grown by doubling when a sequence outgrows it: a decode step binds only the mask and a
new logits array. `past` is then a HeldPast (only the latest one continues a sequence).
"""

from __future__ import annotations

import numpy as np

from .. import RunnerError
from . import Backend, HeldPast

INSTALL_HINT = "onnxruntime is not installed on this device (python3 -m pip install onnxruntime)"
PAST_PREFIX = "past_key_values."
PRESENT_PREFIX = "present."
ORT_FLOAT_TYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16}
MASK_BUFFER_TOKENS = 256  # the all-ones mask buffer's first size; it doubles when a longer mask is needed
KV_CACHE_METADATA = "edgeft.kv_cache"  # ONNX metadata: "in-place" for graphs that update their cache in place
IN_PLACE_CACHE_TOKENS = 256  # an in-place cache's first size (runtime option cache_tokens); it doubles as needed


def _cache_order(name: str, prefix: str) -> tuple:
    """past_key_values.{layer}.key|value -> (layer, 0|1): the contract's order k0, v0, k1, v1, ... whatever
    order the graph lists them in (the fused export lists every key first)."""
    layer, _, kind = name[len(prefix):].partition(".")
    return (int(layer), kind != "key") if layer.isdigit() else (1 << 30, name)


def _import_ort():
    try:
        import onnxruntime
    except ImportError:
        raise RunnerError(INSTALL_HINT)
    # Devices in labs are often offline or audited: never send usage events.
    if hasattr(onnxruntime, "disable_telemetry_events"):
        onnxruntime.disable_telemetry_events()
    return onnxruntime


def installed_version() -> str | None:
    try:
        return _import_ort().__version__
    except RunnerError:
        return None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def ortvalue_api(ort, session, output_names: list[str], public_only: bool = False):
    """(wrap, run, kind): wrap(C-contiguous array) -> an OrtValue over the array's memory (the caller
    keeps the array alive); run(feed of OrtValues) -> the outputs as a sequence of OrtValues.

    kind "pybind": ONNX Runtime's own session and OrtValue objects (what its Python classes wrap);
    "public": the documented OrtValue API, for an onnxruntime that lacks them (public_only: always).
    Both kinds of OrtValue have .numpy() and .shape()."""
    run_options = ort.RunOptions()
    if not public_only:
        c_session = getattr(session, "_sess", None)
        probe = ort.OrtValue.ortvalue_from_numpy(np.zeros(1, dtype=np.float32))
        if hasattr(c_session, "run_with_ort_values") and hasattr(probe, "_ortvalue"):
            def wrap(array):
                return ort.OrtValue.ortvalue_from_numpy(array)._ortvalue

            def run(feed):
                return c_session.run_with_ort_values(feed, output_names, run_options)

            return wrap, run, "pybind"

    def run_public(feed):
        return session.run_with_ort_values(output_names, feed, run_options)

    return ort.OrtValue.ortvalue_from_numpy, run_public, "public"


class OnnxRuntimeBackend(Backend):
    """`past` is a list of OrtValues (from empty_past or forward) or of numpy arrays; `past_arrays`
    gives numpy views of it for code that needs arrays (e.g. calibration feeds)."""

    name = "onnxruntime"

    def __init__(self, public_api_only: bool = False):
        self.public_api_only = public_api_only  # tests: the path an onnxruntime without pybind access takes

    def load(self, model_path, threads: int, num_kv_heads: int | None = None, head_dim: int | None = None,
             options: dict | None = None) -> None:
        ort = _import_ort()
        self.version = ort.__version__
        session_options = ort.SessionOptions()
        session_options.intra_op_num_threads = int(threads)
        session_options.inter_op_num_threads = 1
        # Spinning threads burn cores while idle and hurt badly when the device is shared.
        session_options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        session_options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        session_options.log_severity_level = 3  # errors only: ORT warnings would break the one-line error output
        try:
            self.session = ort.InferenceSession(str(model_path), sess_options=session_options,
                                                providers=["CPUExecutionProvider"])
        except Exception as exc:  # ORT raises its own pybind exception types
            raise RunnerError(f"onnxruntime cannot load {model_path}: {_first_line(exc)}") from exc
        self.providers = list(self.session.get_providers())

        inputs = self.session.get_inputs()
        input_names = {i.name for i in inputs}
        if "input_ids" not in input_names:
            raise RunnerError(f"{model_path}: model has no 'input_ids' input")
        self.takes_attention_mask = "attention_mask" in input_names
        past_inputs = sorted((i for i in inputs if i.name.startswith(PAST_PREFIX)), key=lambda i: _cache_order(i.name, PAST_PREFIX))
        present_outputs = [o.name for o in self.session.get_outputs() if o.name.startswith(PRESENT_PREFIX)]
        if len(past_inputs) != len(present_outputs):
            raise RunnerError(f"{model_path}: {len(past_inputs)} past inputs but "
                              f"{len(present_outputs)} present outputs")
        if not past_inputs:
            raise RunnerError(f"{model_path}: model has no {PAST_PREFIX}* inputs (not an edgeft KV-cache model)")
        self.past_names = [i.name for i in past_inputs]
        # present.{i}.key continues past_key_values.{i}.key: paired by name (by order for other names)
        by_name = [PRESENT_PREFIX + name[len(PAST_PREFIX):] for name in self.past_names]
        self.present_names = by_name if set(by_name) == set(present_outputs) else present_outputs
        self.output_names = ["logits", *self.present_names]

        self.past_shapes, self.past_dtypes = [], []
        for inp in past_inputs:
            if inp.type not in ORT_FLOAT_TYPES:
                raise RunnerError(f"{model_path}: {inp.name} has type {inp.type}; expected float or float16")
            self.past_dtypes.append(ORT_FLOAT_TYPES[inp.type])
            # Heads and head_dim are fixed ints in the graph; the manifest values cover symbolic ones.
            heads = inp.shape[1] if isinstance(inp.shape[1], int) else num_kv_heads
            dim = inp.shape[3] if isinstance(inp.shape[3], int) else head_dim
            if not (isinstance(heads, int) and isinstance(dim, int)):
                raise RunnerError(f"{model_path}: {inp.name} has symbolic heads/head_dim and the manifest gives none")
            self.past_shapes.append((1, heads, 0, dim))

        self._wrap, self._run, self.ortvalue_api = ortvalue_api(ort, self.session, self.output_names,
                                                                self.public_api_only)
        self.in_place_cache = self.session.get_modelmeta().custom_metadata_map.get(KV_CACHE_METADATA) == "in-place"
        # Arrays the OrtValues below point into: kept here for as long as those OrtValues are used.
        self._empty_arrays = [np.zeros(shape, dtype=dtype) for shape, dtype in zip(self.past_shapes, self.past_dtypes)]
        self._empty_past = [self._wrap(array) for array in self._empty_arrays]
        self._token = np.zeros((1, 1), dtype=np.int64)  # a decode step's input_ids, written in place
        self._token_value = self._wrap(self._token)
        self._ones = np.ones((1, MASK_BUFFER_TOKENS), dtype=np.int64)
        self._masks: dict = {}  # mask length -> OrtValue over self._ones[:, :length]
        self._feed: dict = {}  # reused by every call, every key rewritten before each run
        if self.in_place_cache:
            self._bind_in_place(ort, int((options or {}).get("cache_tokens") or IN_PLACE_CACHE_TOKENS))

    def empty_past(self) -> list | HeldPast:
        return HeldPast(None, 0) if self.in_place_cache else list(self._empty_past)

    def past_arrays(self, past) -> list[np.ndarray]:
        """numpy arrays of a past (views of ONNX Runtime's memory where it allows, else copies)."""
        if isinstance(past, HeldPast):
            self._check_current(past)
            return [cache[:, :, :past.length].copy() for cache in self._cache]
        return [value if isinstance(value, np.ndarray) else value.numpy() for value in past]

    def forward(self, input_ids: np.ndarray, past) -> tuple[np.ndarray, list | HeldPast]:
        # The hot path of every timed loop: bench/bench_runner_overhead.py holds it to a few µs per call
        # over a bare loop of the same session calls.
        if type(input_ids) is not np.ndarray or input_ids.dtype != np.int64:
            input_ids = np.asarray(input_ids, dtype=np.int64)
        if self.in_place_cache:
            return self._forward_in_place(input_ids, past)
        if len(past) != len(self.past_names):
            raise RunnerError(f"past has {len(past)} tensors, the model takes {len(self.past_names)}")
        feed = self._feed
        if input_ids.shape == (1, 1):
            self._token[0, 0] = input_ids[0, 0]
            feed["input_ids"] = self._token_value
        else:
            input_ids = np.ascontiguousarray(input_ids)  # alive until run returns: the OrtValue points into it
            feed["input_ids"] = self._wrap(input_ids)
        if type(past[0]) is np.ndarray:  # arrays from the caller: `arrays` keeps them alive until run returns
            arrays = [np.ascontiguousarray(array, dtype=dtype) for array, dtype in zip(past, self.past_dtypes)]
            past = [self._wrap(array) for array in arrays]
        if self.takes_attention_mask:
            feed["attention_mask"] = self._mask(past[0].shape()[2] + input_ids.shape[1])
        for name, value in zip(self.past_names, past):
            feed[name] = value
        try:
            outputs = self._run(feed)
        except Exception as exc:  # ORT raises its own pybind exception types
            raise RunnerError(f"onnxruntime failed to run the model: {_first_line(exc)}") from exc
        presents = [outputs[index] for index in range(1, len(self.output_names))]
        return outputs[0].numpy(), presents

    # --- an in-place cache (fused graphs) ------------------------------------------------------------------
    def _bind_in_place(self, ort, tokens: int) -> None:
        """One IO binding for every step, the cache buffers bound as past inputs and present outputs."""
        self._ort = ort
        self._binding = self.session.io_binding()
        self._bind = getattr(self._binding, "_iobinding", None)  # the pybind object: no wrapper per call
        if self._bind is None or self.public_api_only:
            self._bind = self._binding
        logits = next(o for o in self.session.get_outputs() if o.name == "logits")
        fixed = isinstance(logits.shape[2], int) and logits.type in ORT_FLOAT_TYPES
        self._vocab = logits.shape[2] if fixed else None  # symbolic: ONNX Runtime allocates the logits
        self._logits_dtype = ORT_FLOAT_TYPES.get(logits.type, np.float32)
        self._run_options = ort.RunOptions()
        self._version = 0  # writes to the cache so far
        self._length = 0  # tokens in it after the last write
        self._allocate_cache(max(tokens, 1))

    def _allocate_cache(self, tokens: int) -> None:
        """Cache buffers of `tokens` positions, holding the current cache's tokens, bound in and out."""
        old = getattr(self, "_cache", None)
        self._cache = [np.zeros((1, heads, tokens, dim), dtype=dtype)
                       for (_, heads, _, dim), dtype in zip(self.past_shapes, self.past_dtypes)]
        if old is not None and self._length:
            for new, previous in zip(self._cache, old):
                new[:, :, :self._length] = previous[:, :, :self._length]
        values = [self._ort.OrtValue.ortvalue_from_numpy(cache) for cache in self._cache]
        for past_name, present_name, value in zip(self.past_names, self.present_names, values):
            self._binding.bind_ortvalue_input(past_name, value)
            self._binding.bind_ortvalue_output(present_name, value)
        self._cache_values = values  # the bindings point into self._cache: both live as long as they are bound

    def _check_current(self, past: HeldPast) -> HeldPast:
        if past.slot is not None and past.version != self._version:
            raise RunnerError("onnxruntime: this past was overwritten by a later step: a fused graph updates its "
                              "one cache in place, so only the latest past continues; keep the latest past, or "
                              "pass past_arrays(past) to start again")
        return past

    def _forward_in_place(self, input_ids: np.ndarray, past) -> tuple[np.ndarray, HeldPast]:
        if isinstance(past, HeldPast):
            length = self._check_current(past).length
        else:  # numpy arrays (e.g. past_arrays of an earlier past): copied into the cache once
            if len(past) != len(self.past_names):
                raise RunnerError(f"past has {len(past)} tensors, the model takes {len(self.past_names)}")
            length = int(past[0].shape[2])
            if length > self._cache[0].shape[2]:
                self._length = 0
                self._allocate_cache(length)
            for cache, array in zip(self._cache, past):
                cache[:, :, :length] = array
        seq = input_ids.shape[1]
        total = length + seq
        if total > self._cache[0].shape[2]:
            self._length = length
            self._allocate_cache(max(total, 2 * self._cache[0].shape[2]))
        bind = self._bind
        if seq == 1:
            self._token[0, 0] = input_ids[0, 0]
            bind.bind_ortvalue_input("input_ids", self._token_value)
        else:
            input_ids = np.ascontiguousarray(input_ids)  # alive until run returns: the OrtValue points into it
            bind.bind_ortvalue_input("input_ids", self._wrap(input_ids))
        if self.takes_attention_mask:
            bind.bind_ortvalue_input("attention_mask", self._mask(total))
        if self._vocab is not None:  # a new array each step (the caller keeps it), written by ONNX Runtime in place
            logits = np.empty((1, seq, self._vocab), dtype=self._logits_dtype)
            bind.bind_ortvalue_output("logits", self._wrap(logits))
        else:
            self._binding.bind_output("logits")
        self._version += 1  # from here the cache's previous contents are gone, whatever happens next
        try:
            if bind is self._binding:
                self.session.run_with_iobinding(bind)
            else:
                self.session._sess.run_with_iobinding(bind, self._run_options)
        except Exception as exc:  # ORT raises its own pybind exception types
            raise RunnerError(f"onnxruntime failed to run the model: {_first_line(exc)}") from exc
        if self._vocab is None:
            logits = self._binding.get_outputs()[0].numpy()
        self._length = total
        return logits, HeldPast(0, total, self._version)

    def _mask(self, length: int):
        """The all-ones [1, length] mask as an OrtValue: a view of one buffer, wrapped once per length."""
        value = self._masks.get(length)
        if value is None:
            if length > self._ones.shape[1]:
                self._masks.clear()  # their OrtValues point into the buffer replaced here
                self._ones = np.ones((1, max(length, 2 * self._ones.shape[1])), dtype=np.int64)
            value = self._masks[length] = self._wrap(self._ones[:, :length])
        return value


def create_backend() -> OnnxRuntimeBackend:
    return OnnxRuntimeBackend()
