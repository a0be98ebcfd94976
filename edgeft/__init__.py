"""edgeft: fine-tune, compress and export causal LMs for edge devices, then measure them there."""

import os as _os

__version__ = "0.1.0"

# Labs are often air-gapped: never let a library phone home or reach a model hub.
for _name, _value in {
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "HF_HUB_DISABLE_TELEMETRY": "1",
    "DO_NOT_TRACK": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",  # edgeft draws its own progress bars
}.items():
    _os.environ.setdefault(_name, _value)


def quiet_libraries() -> None:
    """Keep library chatter (deprecation notes, per-file loading bars) out of the user's terminal."""
    import logging
    import warnings

    # torchao (pulled in by transformers/peft, e.g. with the tflite extra) warns on import about optional
    # CUDA kernels it cannot load: set before that import, its logger stays silent.
    for module in ("transformers", "peft", "bitsandbytes", "torch", "torchao", "accelerate", "onnxscript", "onnx_ir"):
        warnings.filterwarnings("ignore", module=module)
        logging.getLogger(module).setLevel(logging.ERROR)
    # torch resets its own loggers when it is first imported; this child of them it leaves alone.
    logging.getLogger("torch.utils._pytree").setLevel(logging.ERROR)
    # ONNX Runtime's int4 quantizer sets the root logger to INFO on import and logs every node it visits.
    logging.getLogger("onnxruntime").setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", category=FutureWarning)
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    except ImportError:
        pass
