"""quantize: the fp32 exported model -> a smaller precision.

ONNX: fp16 (weights; inputs/outputs stay fp32: TensorRT builds an fp16 engine from it), int8 dynamic,
int8 static (Q/DQ, symmetric, calibrated on the task data: what TensorRT's explicit-quantization path
reads), int8 or int4 weight-only (MatMulNBits, 8 or 4 bits) or fp32 (a copy). int8-dynamic computes in
int8 (the fastest prefill on CPU); int8-weight reads int8 weights and computes like int4 (a faster decode).
int8-dynamic and the weight-only modes can give the output projection (lm_head, a large share of a small
model) its own precision, weight-only in 8 or 4 bits or fp32: mixed precision.
TFLite (ai-edge-quantizer): fp16 weights, int8-dynamic (dynamic-range), int8-weight (weight-only),
int8-static (int8 weights and activations at the fully connected layers, calibrated on the task data), fp32.

Validated against the fp32 model of the same format (itself validated against PyTorch) on test rows:
the next-token choice must agree on at least `min_top1_agreement` of completion positions, a tolerance
set per precision. Task accuracy of the result is measured on the host through ONNX Runtime.
"""

from __future__ import annotations

import shutil
from contextlib import contextmanager
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from .. import lm, onnx_io
from ..artifact import Artifact
from ..context import BuildContext
from ..data import encode
from ..errors import ConfigError, ModelError, QualityCheckFailed

# Share of completion positions whose argmax must match the fp32 model, per precision.
DEFAULT_TOP1_AGREEMENT = {"fp32": 1.0, "fp16": 0.98, "int8-dynamic": 0.95, "int8-weight": 0.95, "int8-static": 0.9,
                          "int4-weight": 0.85}
PRECISION = {"fp32": "fp32", "fp16": "fp16", "int8-dynamic": "int8", "int8-weight": "int8-weight", "int8-static": "int8-static",
             "int4-weight": "int4"}
MODES = {"onnx": ("fp32", "fp16", "int8-dynamic", "int8-static", "int8-weight", "int4-weight"),
         "tflite": ("fp32", "fp16", "int8-dynamic", "int8-weight", "int8-static")}


class QuantizeConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    mode: Literal["fp32", "fp16", "int8-dynamic", "int8-static", "int4-weight", "int8-weight"] = "int8-dynamic"
    per_channel: bool = False  # int8: one scale per output channel (slower to quantize, often more accurate)
    calibration_samples: int = Field(32, ge=1)  # int8-static: training examples whose activations set the ranges
    calibration_method: Literal["minmax", "entropy", "percentile"] = "minmax"  # int8-static
    block_size: int = Field(32, ge=16)  # int4, ONNX int8-weight: weights per scale
    accuracy_level: int = Field(4, ge=0, le=4)  # int4, ONNX int8-weight: 4 = int8 activations in MatMulNBits, ~2x faster on CPU
    # int4: the token embedding (a Gather) in 4 bits too (GatherBlockQuantized); it stays fp32 otherwise and is
    # a large share of a small model (TinyLlama: 262 MB of 912 MB). int8-dynamic always quantizes it.
    embeddings: bool = False
    # int8-dynamic, int4-weight, int8-weight: the output projection's precision ("same": the mode's; int8 and int4
    # are weight-only MatMulNBits). Mixed precision: int4 blocks with an int8 lm_head keep the next-token scores
    # closer to fp32; int8 blocks with an int4 one decode faster.
    lm_head: Literal["same", "int8", "int4", "fp32"] = "same"
    min_top1_agreement: float | None = Field(None, ge=0, le=1)  # None: the per-precision default above
    validation_examples: int = Field(16, ge=1)

    @model_validator(mode="after")
    def _embeddings_with_int4(self) -> "QuantizeConfig":
        if self.embeddings and self.mode != "int4-weight":
            raise ValueError(f"embeddings: true applies to mode int4-weight (mode {self.mode} keeps or always quantizes the embedding)")
        if self.lm_head != "same" and self.mode not in ("int8-dynamic", "int4-weight", "int8-weight"):
            raise ValueError(f"lm_head: {self.lm_head} applies to modes int8-dynamic, int4-weight and int8-weight, not {self.mode}")
        return self

    @property
    def bits(self) -> int:
        """Weight-only modes: bits of the blocks' MatMulNBits."""
        return 8 if self.mode == "int8-weight" else 4

    @property
    def lm_head_bits(self) -> int | None:
        """lm_head int8 or int4: bits of the output projection's MatMulNBits; None otherwise."""
        return {"int8": 8, "int4": 4}.get(self.lm_head)


def calibration_feeds(model_path, rows: list[list[int]]) -> list[dict]:
    """ONNX inputs that exercise both graph paths per row: a prefill from an empty cache, then one
    decode step with the real cache it produced, so activation ranges cover how the model is run."""
    import numpy as np

    backend = lm.load(model_path)
    feeds = []
    for row in rows:
        prefill = np.asarray([row[:-1]], dtype=np.int64)
        empty = backend.empty_past()
        feeds.append({"input_ids": prefill, "attention_mask": np.ones_like(prefill), **dict(zip(backend.past_names, backend.past_arrays(empty)))})
        _, past = backend.forward(prefill, empty)
        feeds.append({"input_ids": np.asarray([row[-1:]], dtype=np.int64), "attention_mask": np.ones((1, len(row)), dtype=np.int64), **dict(zip(backend.past_names, backend.past_arrays(past)))})
    return feeds


@contextmanager
def _root_logging_kept():
    """ONNX Runtime's quantizers configure the root logger (the int4 module calls logging.basicConfig(INFO) on
    import; quantize_dynamic's logging.warning() installs a stderr handler) and then print every INFO line
    and a "consider pre-processing" warning: library noise. Whatever they change is put back after."""
    import logging

    root = logging.getLogger()
    level, handlers = root.level, list(root.handlers)
    if not handlers:
        root.addHandler(logging.NullHandler())  # so logging.warning() finds a handler and configures nothing
    try:
        yield
    finally:
        root.setLevel(level)
        root.handlers[:] = handlers


# Initializers above this many bytes are left out of the copy that shape inference reads: weights. Smaller
# ones (shape, axes and index constants that inference reads the values of) stay in it.
SHAPE_INFERENCE_KEEPS_BYTES = 1 << 16


def infer_value_types(model):
    """`model` itself with value_info from ONNX shape inference run on a copy without its weights.

    ONNX Runtime's dynamic quantizer re-runs shape inference on a deep copy that it saves and loads back
    (onnx_quantizer: save_and_reload_model_with_shape_infer): three copies of the weights at once, 3.2x the
    fp32 weights measured on a 1.1B model. Inference needs only the weights' types and shapes."""
    import onnx

    graph = model.graph
    bare = onnx.GraphProto(name=graph.name, node=graph.node, input=graph.input, output=graph.output,
                           value_info=graph.value_info, sparse_initializer=graph.sparse_initializer)
    for tensor in graph.initializer:
        if tensor.ByteSize() > SHAPE_INFERENCE_KEEPS_BYTES:
            bare.initializer.add(name=tensor.name, data_type=tensor.data_type, dims=tensor.dims)
        else:
            bare.initializer.append(tensor)
    skeleton = onnx.ModelProto(ir_version=model.ir_version, opset_import=model.opset_import, functions=model.functions,
                               graph=bare)
    inferred = onnx.shape_inference.infer_shapes(skeleton).graph
    graph.ClearField("value_info")
    graph.value_info.extend(inferred.value_info)
    return model


@contextmanager
def _lean_dynamic_quantizer():
    """Point ONNX Runtime's dynamic quantizer at infer_value_types while it runs (see there why)."""
    from onnxruntime.quantization import onnx_quantizer

    original = onnx_quantizer.save_and_reload_model_with_shape_infer
    onnx_quantizer.save_and_reload_model_with_shape_infer = infer_value_types
    try:
        yield
    finally:
        onnx_quantizer.save_and_reload_model_with_shape_infer = original


def quantize(source, dest, config: QuantizeConfig, calibration_rows: list[list[int]] | None = None) -> None:
    """`source` -> `dest` in `config.mode`; either may carry external data (edgeft.onnx_io)."""
    # ORT's quantizers write one protobuf unless told: a source past edgeft's external-data rule gets external
    # data out (and for their temp models), whatever the mode shrinks it to.
    with _root_logging_kept():
        _quantize(source, dest, config, calibration_rows, onnx_io.model_bytes(source))


def _quantize(source, dest, config: QuantizeConfig, calibration_rows: list[list[int]] | None, source_bytes: int) -> None:
    large = onnx_io.needs_external_data(source_bytes)
    if config.mode == "fp32":
        onnx_io.copy(source, dest)
    elif config.mode == "fp16":
        import onnx
        from onnxruntime.transformers.float16 import convert_float_to_float16

        # fp32 inputs/outputs (and KV cache): the runner feeds the same arrays whatever the precision. Its shape
        # inference serialises the model, which fails past 2 GiB: a large export carries its value types already.
        onnx_io.save(convert_float_to_float16(onnx.load(str(source)), keep_io_types=True,
                                              disable_shape_infer=onnx_io.too_big_to_serialise(source_bytes)), dest)
    elif config.mode == "int8-dynamic":
        import onnx
        from onnxruntime.quantization import QuantType, quantize_dynamic

        # the head's name from the graph alone (ORT's quantizer loads the model itself)
        head = None if config.lm_head == "same" else output_projection(onnx.load(str(source), load_external_data=False))
        with _lean_dynamic_quantizer():
            quantize_dynamic(str(source), str(dest), weight_type=QuantType.QInt8, per_channel=config.per_channel,
                             use_external_data_format=large, nodes_to_exclude=[head] if head else None)
        if head and config.lm_head_bits:
            onnx_io.save(_weight_only(onnx.load(str(dest)), config, config.lm_head_bits, nodes_to_include=[head]), dest)
    elif config.mode == "int8-static":
        from onnxruntime.quantization import CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType, quantize_static

        class Reader(CalibrationDataReader):
            def __init__(self, feeds):
                self.feeds = iter(feeds)

            def get_next(self):
                return next(self.feeds, None)

        method = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy, "percentile": CalibrationMethod.Percentile}
        # MatMuls only: quantizing softmax/normalisation inputs costs accuracy and buys little on CPU.
        quantize_static(
            str(source), str(dest), Reader(calibration_feeds(source, calibration_rows or [])),
            quant_format=QuantFormat.QDQ, activation_type=QuantType.QInt8, weight_type=QuantType.QInt8,
            per_channel=config.per_channel, op_types_to_quantize=["MatMul"], calibrate_method=method[config.calibration_method],
            extra_options={"ActivationSymmetric": True}, use_external_data_format=large,
        )
    else:
        import onnx

        # ORT's quantizers have one kind and bit width per call: a mixed model is the blocks, then the head alone.
        model = onnx.load(str(source))
        head = None if config.lm_head == "same" else output_projection(model)
        model = _weight_only(model, config, config.bits, nodes_to_exclude=[head] if head else None)
        if head and config.lm_head_bits:
            model = _weight_only(model, config, config.lm_head_bits, nodes_to_include=[head])
        onnx_io.save(model, dest)


def _weight_only(model, config: QuantizeConfig, bits: int, **nodes):
    """`model` with its MatMuls (and Gathers, with `embeddings`) as MatMulNBits of `bits`; `nodes`: ORT's
    nodes_to_exclude or nodes_to_include."""
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    quantizer = MatMulNBitsQuantizer(
        model, bits=bits, block_size=config.block_size, is_symmetric=True, accuracy_level=config.accuracy_level,
        op_types_to_quantize=("MatMul", "Gather") if config.embeddings else ("MatMul",), **nodes)
    quantizer.process()
    return quantizer.model.model


# Ops between the output projection and the logits output in the graphs edgeft exports.
_PASS_THROUGH = ("Reshape", "Cast", "Identity", "Squeeze", "Unsqueeze")


def output_projection(model) -> str:
    """The name of the MatMul (or MatMulNBits, once quantized) that computes the `logits` output: the lm_head.
    ORT's quantizers pick nodes by name; both of edgeft's exporters name every node."""
    producer = {output: node for node in model.graph.node for output in node.output}
    node = producer.get("logits")
    while node is not None and node.op_type in _PASS_THROUGH:
        node = producer.get(node.input[0])
    if node is None or node.op_type not in ("MatMul", "MatMulNBits") or not node.name:
        raise ModelError("quantize lm_head: no named MatMul computes this model's logits output; set quantize.lm_head: same")
    return node.name


def run(model: Artifact, config: QuantizeConfig, ctx: BuildContext) -> Artifact:
    import gc

    import numpy as np
    from transformers import AutoTokenizer

    if model.kind not in MODES:
        raise ModelError(f"quantize needs an exported model, got a {model.kind!r} artifact; list export before quantize")
    if config.mode not in MODES[model.kind]:
        raise ModelError(f"quantize mode {config.mode!r} does not apply to {model.kind} models; "
                         f"use one of {', '.join(MODES[model.kind])}")
    tokenizer = AutoTokenizer.from_pretrained(model.path / "tokenizer")
    calibration = [encode(tokenizer, e) for e in ctx.splits.train[: config.calibration_samples]]
    name = f"model.{model.kind}"
    task = ctx.progress.add_task(f"quantize ({config.mode})", total=None) if ctx.progress else None  # minutes on a 1B model
    try:
        if model.kind == "tflite":
            from .. import tflite

            tflite.quantize(model.path / name, ctx.out / name, config.mode, calibration)
        else:
            quantize(model.path / name, ctx.out / name, config, [p + c for p, c in calibration])
    except ConfigError:
        raise
    except Exception as exc:  # quantizers raise assorted types; name the mode and the first line
        raise ModelError(f"quantize ({config.mode}) failed on {model.path / name}: {str(exc).strip().splitlines()[0][:300]}") from exc
    finally:
        if ctx.progress:
            ctx.progress.remove_task(task)
    shutil.copytree(model.path / "tokenizer", ctx.out / "tokenizer")

    options = {"pad_token_id": tokenizer.pad_token_id}
    examples = [encode(tokenizer, e) for e in ctx.splits.test[: config.validation_examples]]
    # One model in memory at a time (a 1B fp32 reference is 4 GB): the reference's logits first, then the result's.
    reference = lm.load(model.path / name, threads=ctx.threads, options=options)
    reference_logits = [lm.completion_logits(reference, p, c) for p, c in examples]
    del reference
    gc.collect()
    quantized = lm.load(ctx.out / name, threads=ctx.threads, options=options)
    agree = total = 0
    max_abs_diff = 0.0
    for (prompt_ids, completion_ids), ref in zip(examples, reference_logits):
        out = lm.completion_logits(quantized, prompt_ids, completion_ids)
        agree += int((ref.argmax(-1) == out.argmax(-1)).sum())
        total += len(completion_ids)
        max_abs_diff = max(max_abs_diff, float(np.abs(ref - out).max()))
    agreement = agree / total
    needed = config.min_top1_agreement if config.min_top1_agreement is not None else DEFAULT_TOP1_AGREEMENT[config.mode]
    if agreement < needed:
        setting = "quantize.per_channel: true, a smaller quantize.block_size, " if config.mode == "int4-weight" else "quantize.per_channel: true, "
        raise QualityCheckFailed(
            f"quantize check top1_agreement failed: the {config.mode} model picks the fp32 model's next token at {agreement:.1%} "
            f"of completion positions, below quantize.min_top1_agreement {needed:.0%}; try {setting}a wider precision, "
            "or lower min_top1_agreement if the task accuracy still meets the budget",
            check="quantize.top1_agreement", value=round(agreement, 4), limit=needed, setting="quantize.min_top1_agreement")
    evaluation = lm.stage_eval(quantized, tokenizer, ctx, max_positions=model.info.get("max_positions"))
    return Artifact(
        path=ctx.out,
        kind=model.kind,
        stage="quantize",
        key="",
        metrics={"accuracy": evaluation["exact_match"], "eval": evaluation, "top1_agreement": round(agreement, 4), "max_abs_diff_vs_fp32": round(max_abs_diff, 4)},
        info={**model.info, "precision": PRECISION[config.mode] + ("" if config.lm_head == "same" else f"+{config.lm_head}-head")},
    )
