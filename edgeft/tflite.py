"""Host side of the LiteRT (TFLite) target: convert with litert-torch, quantize with ai-edge-quantizer.

The `.tflite` file carries a static KV cache with `prefill_<n>` and `decode` signatures (the layout
LiteRT-LM uses); the runner's tflite backend drives it. Both libraries come with the `tflite` extra.
"""

from __future__ import annotations

import contextlib
import importlib.machinery
import os
import shutil
import sys
import tempfile
import types
from pathlib import Path

from .errors import ConfigError, ModelError

INSTALL_HINT = "TFLite export needs the tflite extra: pip install -e '.[tflite]' (litert-torch, ai-edge-litert)"

# edgeft mode -> ai_edge_quantizer recipe (int8-static: see _static_recipe).
RECIPES = {"int8-dynamic": "dynamic_wi8_afp32", "int8-weight": "weight_only_wi8_afp32"}


@contextlib.contextmanager
def captured_output():
    """Silence C++ and Python chatter (absl logs, XNNPACK notes, converter progress) at the file
    descriptor level; edgeft reports failures itself, in one line."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    with tempfile.TemporaryFile() as sink:
        os.dup2(sink.fileno(), 1)
        os.dup2(sink.fileno(), 2)
        try:
            yield
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            os.close(saved[0])
            os.close(saved[1])


def _litert_export():
    """litert_torch's HF exporter. litert-torch 0.10 imports tensorflow.lite's flatbuffer schema
    though tensorflow is not among its dependencies; ai_edge_litert ships the same generated module,
    so it is aliased under that name while the exporter imports, then the aliases are removed."""
    try:
        import torch._dynamo  # noqa: F401  (litert-torch expects it imported first)
        from ai_edge_litert import schema_py_generated
    except ImportError:
        raise ConfigError(INSTALL_HINT)
    aliases = {}
    if "tensorflow" not in sys.modules:
        for name in ("tensorflow", "tensorflow.lite", "tensorflow.lite.python"):
            module = types.ModuleType(name)
            module.__spec__, module.__path__ = importlib.machinery.ModuleSpec(name, None), []
            aliases[name] = module
        aliases["tensorflow.lite.python"].schema_py_generated = schema_py_generated
        aliases["tensorflow.lite.python.schema_py_generated"] = schema_py_generated
        sys.modules.update(aliases)
    try:
        with captured_output():  # its import prints transformers docstring-check [ERROR] lines
            from litert_torch.generative.export_hf import export
    except ImportError:
        raise ConfigError(INSTALL_HINT)
    finally:
        for name in aliases:
            sys.modules.pop(name, None)
    return export


def convert(model_dir: Path, dest: Path, prefill_tokens: list[int], cache_tokens: int) -> None:
    """A local HF model dir (weights + tokenizer) -> fp32 `.tflite` with a KV cache of cache_tokens."""
    export = _litert_export()
    with tempfile.TemporaryDirectory(prefix="edgeft-tflite-") as tmp, captured_output():
        export.export(model=str(model_dir), output_dir=tmp, prefill_lengths=list(prefill_tokens),
                      cache_length=cache_tokens, quantization_recipe="none", prefill_logits=True,
                      bundle_litert_lm=False)
        found = sorted(Path(tmp).rglob("*.tflite"))
        if len(found) != 1:
            raise ModelError(f"{model_dir}: litert-torch wrote {len(found)} .tflite files, expected one")
        shutil.move(str(found[0]), dest)


def _fp16_recipe():
    from ai_edge_quantizer import algorithm_manager, qtyping, recipe_manager

    manager = recipe_manager.RecipeManager()
    manager.add_weight_only_config(
        regex=".*", operation_name=qtyping.TFLOperationName.ALL_SUPPORTED, num_bits=16,
        algorithm_key=algorithm_manager.AlgorithmName.FLOAT_CASTING)
    return manager.get_quantization_recipe()


def _static_recipe():
    """int8 weights and int8 activations at the fully connected layers (where the compute is), with
    ranges calibrated on the task data. Quantizing every op would put the additive attention mask
    (-3.4e38 at masked positions) into one int8 range with the scores: top-1 agreement fell to 75%."""
    from ai_edge_quantizer import qtyping, recipe_manager

    manager = recipe_manager.RecipeManager()
    manager.add_static_config(regex=".*", operation_name=qtyping.TFLOperationName.FULLY_CONNECTED,
                              activation_num_bits=8, weight_num_bits=8)
    return manager.get_quantization_recipe()


def calibration_data(model_path: Path, examples: list[tuple[list[int], list[int]]]) -> dict[str, list[dict]]:
    """Signature inputs seen while running each task row (prefill, then decode steps with the real
    cache): the representative dataset for full-integer quantization."""
    from . import lm

    backend = lm.load(model_path)
    recorded: dict[str, list[dict]] = {}
    step = backend._step

    def recording_step(runner, length, tokens, pos, cache):
        name = backend.signature_names[id(runner)]
        recorded.setdefault(name, []).append(backend.signature_inputs(length, tokens, pos, cache))
        return step(runner, length, tokens, pos, cache)

    backend._step = recording_step
    for prompt_ids, completion_ids in examples:
        lm.completion_logits(backend, prompt_ids, completion_ids)
    return recorded


def quantize(source: Path, dest: Path, mode: str, calibration_examples: list[tuple[list[int], list[int]]]) -> None:
    """fp32 `.tflite` -> `mode` (fp32 copy, fp16, int8-dynamic, int8-weight, int8-static)."""
    if mode == "fp32":
        shutil.copyfile(source, dest)
        return
    try:
        from ai_edge_quantizer import quantizer, recipe
    except ImportError:
        raise ConfigError(INSTALL_HINT)
    engine = quantizer.Quantizer(str(source))
    special = {"fp16": _fp16_recipe, "int8-static": _static_recipe}
    engine.load_quantization_recipe(special[mode]() if mode in special else getattr(recipe, RECIPES[mode])())
    calibration = None
    if engine.need_calibration:
        examples = calibration_data(source, calibration_examples)
        with captured_output():
            calibration = engine.calibrate(examples, num_threads=1)
    with captured_output():
        engine.quantize(calibration, enable_progress_bar=False, enable_progress_report=False).export_model(str(dest), overwrite=True)
