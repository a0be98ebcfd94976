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
"""

from __future__ import annotations

import numpy as np

from .. import RunnerError
from . import Backend

INSTALL_HINT = "onnxruntime is not installed on this device (python3 -m pip install onnxruntime)"
PAST_PREFIX = "past_key_values."
PRESENT_PREFIX = "present."
ORT_FLOAT_TYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16}
MASK_BUFFER_TOKENS = 256  # the all-ones mask buffer's first size; it doubles when a longer mask is needed


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
        options = ort.SessionOptions()
        options.intra_op_num_threads = int(threads)
        options.inter_op_num_threads = 1
        # Spinning threads burn cores while idle and hurt badly when the device is shared.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.log_severity_level = 3  # errors only: ORT warnings would break the one-line error output
        try:
            self.session = ort.InferenceSession(str(model_path), sess_options=options,
                                                providers=["CPUExecutionProvider"])
        except Exception as exc:  # ORT raises its own pybind exception types
            raise RunnerError(f"onnxruntime cannot load {model_path}: {_first_line(exc)}") from exc
        self.providers = list(self.session.get_providers())

        inputs = self.session.get_inputs()
        input_names = {i.name for i in inputs}
        if "input_ids" not in input_names:
            raise RunnerError(f"{model_path}: model has no 'input_ids' input")
        self.takes_attention_mask = "attention_mask" in input_names
        past_inputs = [i for i in inputs if i.name.startswith(PAST_PREFIX)]
        present_outputs = [o.name for o in self.session.get_outputs() if o.name.startswith(PRESENT_PREFIX)]
        if len(past_inputs) != len(present_outputs):
            raise RunnerError(f"{model_path}: {len(past_inputs)} past inputs but "
                              f"{len(present_outputs)} present outputs")
        if not past_inputs:
            raise RunnerError(f"{model_path}: model has no {PAST_PREFIX}* inputs (not an edgeft KV-cache model)")
        self.past_names = [i.name for i in past_inputs]
        self.output_names = ["logits", *present_outputs]  # presents pair with pasts by order

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
        # Arrays the OrtValues below point into: kept here for as long as those OrtValues are used.
        self._empty_arrays = [np.zeros(shape, dtype=dtype) for shape, dtype in zip(self.past_shapes, self.past_dtypes)]
        self._empty_past = [self._wrap(array) for array in self._empty_arrays]
        self._token = np.zeros((1, 1), dtype=np.int64)  # a decode step's input_ids, written in place
        self._token_value = self._wrap(self._token)
        self._ones = np.ones((1, MASK_BUFFER_TOKENS), dtype=np.int64)
        self._masks: dict = {}  # mask length -> OrtValue over self._ones[:, :length]
        self._feed: dict = {}  # reused by every call, every key rewritten before each run

    def empty_past(self) -> list:
        return list(self._empty_past)

    def past_arrays(self, past: list) -> list[np.ndarray]:
        """numpy arrays of a past (views of ONNX Runtime's memory where it allows, else copies)."""
        return [value if isinstance(value, np.ndarray) else value.numpy() for value in past]

    def forward(self, input_ids: np.ndarray, past: list) -> tuple[np.ndarray, list]:
        # The hot path of every timed loop: bench/bench_runner_overhead.py holds it to a few µs per call
        # over a bare loop of the same session calls.
        if type(input_ids) is not np.ndarray or input_ids.dtype != np.int64:
            input_ids = np.asarray(input_ids, dtype=np.int64)
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
