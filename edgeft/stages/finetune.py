"""finetune: QLoRA (4-bit NF4 base + LoRA adapters via peft), or plain LoRA on a full-precision base.

Saves the adapter alone (small) with its config; the merge stage folds it into the base later.
Reports task accuracy of the base and of base+adapter on the test split.
"""

from __future__ import annotations

import json
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from ..artifact import Artifact
from ..context import BuildContext
from ..data import encode
from ..errors import ModelError
from ..evaluate import exact_match


class FinetuneConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    method: Literal["qlora", "lora"] = "qlora"
    r: int = Field(16, ge=1)
    alpha: int = Field(32, ge=1)
    dropout: float = Field(0.05, ge=0, lt=1)
    target_modules: list[str] | Literal["all-linear"] = "all-linear"
    epochs: float = Field(2.0, gt=0)
    batch_size: int = Field(16, ge=1)
    lr: float = Field(2e-3, gt=0)
    warmup_ratio: float = Field(0.1, ge=0, lt=1)
    scheduler: Literal["cosine", "linear", "constant_with_warmup"] = "cosine"
    max_grad_norm: float = Field(1.0, gt=0)
    # auto: bf16 on CUDA (the QLoRA paper's choice; fp16 compute is unstable for QLoRA), fp32 on CPU,
    # where bitsandbytes' 4-bit layers under bf16 autocast measured ~8x slower per step than fp32.
    compute_dtype: Literal["auto", "bfloat16", "float32"] = "auto"

    def resolved_dtype(self) -> str:
        import torch

        if self.compute_dtype != "auto":
            return self.compute_dtype
        return "bfloat16" if torch.cuda.is_available() else "float32"
    quant_type: Literal["nf4", "fp4"] = "nf4"
    double_quant: bool = True
    max_length: int = Field(256, ge=8)
    seed: int = 0


def load_base(path, config: FinetuneConfig):
    import torch
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    dtype = getattr(torch, config.resolved_dtype())
    try:
        if config.method == "qlora":
            quant = BitsAndBytesConfig(
                load_in_4bit=True,
                bnb_4bit_quant_type=config.quant_type,
                bnb_4bit_use_double_quant=config.double_quant,
                bnb_4bit_compute_dtype=dtype,
                bnb_4bit_quant_storage=torch.uint8,
            )
            model = AutoModelForCausalLM.from_pretrained(path, quantization_config=quant, dtype=torch.float32)
        else:
            model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    except (OSError, ValueError) as exc:
        raise ModelError(f"{path}: cannot load as a causal LM: {str(exc).splitlines()[0]}") from None
    _avoid_bnb_cpu_repack(model)
    return model


def _avoid_bnb_cpu_repack(model) -> None:
    """bitsandbytes 0.50 on AVX512-BF16 CPUs repacks 4-bit weights in place on the first no-grad forward;
    training afterwards silently zeroes earlier layers' LoRA gradients. Opting out keeps training correct."""
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False


def load_tokenizer(path):
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as exc:
        raise ModelError(f"{path}: no usable tokenizer ({str(exc).splitlines()[0]}); the model dir must hold tokenizer files") from None
    if tokenizer.eos_token_id is None:
        raise ModelError(f"{path}: the tokenizer has no EOS token; set eos_token in tokenizer_config.json")
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


class _Collator:
    """Right padding; labels -100 on the prompt and the padding, so loss is on the completion only."""

    def __init__(self, pad_id: int):
        self.pad_id = pad_id

    def __call__(self, rows):
        import torch

        width = max(len(r["input_ids"]) for r in rows)
        pad = lambda seq, value: seq + [value] * (width - len(seq))  # noqa: E731
        return {
            "input_ids": torch.tensor([pad(r["input_ids"], self.pad_id) for r in rows]),
            "attention_mask": torch.tensor([pad([1] * len(r["input_ids"]), 0) for r in rows]),
            "labels": torch.tensor([pad(r["labels"], -100) for r in rows]),
        }


def _features(tokenizer, examples, max_length: int, where: str):
    rows = []
    for index, example in enumerate(examples):
        prompt_ids, completion_ids = encode(tokenizer, example)
        ids = prompt_ids + completion_ids
        if len(ids) > max_length:
            raise ModelError(f"{where}: example {index} is {len(ids)} tokens, over max_length {max_length}; raise finetune.max_length or shorten it")
        rows.append({"input_ids": ids, "labels": [-100] * len(prompt_ids) + completion_ids})
    return rows


def _progress_callback(progress, total_steps: int):
    from transformers import TrainerCallback

    class RichProgress(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            self.task = progress.add_task("finetune", total=total_steps) if progress else None

        def on_log(self, args, state, control, logs=None, **kwargs):
            if progress and logs and "loss" in logs:
                progress.update(self.task, description=f"finetune (loss {logs['loss']:.3f})")

        def on_step_end(self, args, state, control, **kwargs):
            if progress:
                progress.update(self.task, completed=state.global_step)

        def on_train_end(self, args, state, control, **kwargs):
            if progress:
                progress.remove_task(self.task)

    return RichProgress()


def run(model: Artifact, config: FinetuneConfig, ctx: BuildContext) -> Artifact:
    import math

    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import Trainer, TrainingArguments, set_seed

    set_seed(config.seed)
    tokenizer = load_tokenizer(model.path)
    test = ctx.splits.test

    base_fp32 = load_base(model.path, config.model_copy(update={"method": "lora"}))
    accuracy_base = exact_match(base_fp32, tokenizer, test, progress=ctx.progress, label="evaluate base")
    del base_fp32

    base = load_base(model.path, config)
    lora = LoraConfig(
        r=config.r,
        lora_alpha=config.alpha,
        lora_dropout=config.dropout,
        target_modules=config.target_modules,
        task_type="CAUSAL_LM",
    )
    peft_model = get_peft_model(base, lora)
    trainable = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)

    train = _features(tokenizer, ctx.splits.train, config.max_length, f"{ctx.splits.source} (train split)")
    steps = math.ceil(len(train) / config.batch_size * config.epochs)
    args = TrainingArguments(
        output_dir=str(ctx.out / "checkpoints"),
        per_device_train_batch_size=config.batch_size,
        num_train_epochs=config.epochs,
        learning_rate=config.lr,
        lr_scheduler_type=config.scheduler,
        warmup_steps=int(steps * config.warmup_ratio),
        max_grad_norm=config.max_grad_norm,
        bf16=config.resolved_dtype() == "bfloat16",
        use_cpu=not torch.cuda.is_available(),
        logging_steps=10,
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
        seed=config.seed,
        data_seed=config.seed,
        dataloader_num_workers=0,
        remove_unused_columns=False,
    )
    trainer = Trainer(
        model=peft_model,
        args=args,
        train_dataset=train,
        data_collator=_Collator(tokenizer.pad_token_id),
        callbacks=[_progress_callback(ctx.progress, steps)],
    )
    from transformers.trainer_callback import PrinterCallback

    trainer.remove_callback(PrinterCallback)  # the rich bar shows progress; the log goes to train_log.jsonl
    result = trainer.train()
    log = [entry for entry in trainer.state.log_history if "loss" in entry]

    accuracy = exact_match(peft_model, tokenizer, test, progress=ctx.progress, label="evaluate finetuned")
    adapter_dir = ctx.out / "adapter"
    peft_model.save_pretrained(adapter_dir)
    tokenizer.save_pretrained(adapter_dir)
    (ctx.out / "train_log.jsonl").write_text("".join(json.dumps(entry) + "\n" for entry in log))
    import shutil

    shutil.rmtree(ctx.out / "checkpoints", ignore_errors=True)
    return Artifact(
        path=ctx.out,
        kind="adapter",
        stage="finetune",
        key="",
        metrics={
            "accuracy_base": accuracy_base,
            "accuracy": accuracy,
            "train_loss": round(result.training_loss, 4),
            "train_steps": result.global_step,
            "train_s": round(result.metrics.get("train_runtime", 0.0), 1),
            "trainable_params": trainable,
        },
        info={"method": config.method, "base_sha256": ctx.base.sha256, "torch_threads": torch.get_num_threads()},
    )
