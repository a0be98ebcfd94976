"""finetune: QLoRA (4-bit NF4 base + LoRA adapters via peft), or LoRA on a full-precision base.

Trained with the transformers Trainer (gradient accumulation and checkpointing, cosine/linear schedule
with warm-up, validation loss + task exact match at every eval, early stopping on validation loss).
Checkpoints every `save_steps` go to a directory keyed by this stage's cache key, so a run killed
mid-way (even with kill -9) resumes from its last complete checkpoint when the same build is run again.
Runs unchanged under `accelerate launch` / torchrun (see `edgeft finetune`).

Saves the adapter alone (small) with its config; the merge stage folds it into the base later.
Reports task accuracy of the base and of base+adapter on the test split.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from ..artifact import Artifact
from ..context import BuildContext
from ..data import DataConfig, training_rows
from ..errors import ConfigError, ModelError
from ..evaluate import on_compute_device, stage_eval


class FinetuneConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    method: Literal["qlora", "lora"] = "qlora"
    # A name for this adapter (one per customer or task on the same base); recorded in the bundle.
    adapter: str = Field("default", pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
    # lora only: the frozen base's dtype. float32 = full-precision LoRA; bfloat16/float16 = plain LoRA in half.
    base_dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    r: int = Field(16, ge=1)
    alpha: int = Field(32, ge=1)
    dropout: float = Field(0.05, ge=0, lt=1)
    target_modules: list[str] | Literal["all-linear"] = "all-linear"
    epochs: float = Field(2.0, gt=0)
    batch_size: int = Field(16, ge=1)  # per device (per process under accelerate)
    gradient_accumulation_steps: int = Field(1, ge=1)  # effective batch = batch_size x this x processes
    gradient_checkpointing: bool = False  # recompute activations: less memory, ~30% slower
    eval_steps: int | None = Field(None, ge=1)  # validation loss + task metric every N steps; None: each epoch
    eval_task_examples: int = Field(64, ge=0)  # validation examples whose exact match is logged per eval
    early_stopping_patience: int | None = Field(None, ge=1)  # stop after N evals without a lower val loss
    save_steps: int = Field(50, ge=1)  # resumable checkpoint every N optimizer steps
    lr: float = Field(2e-3, gt=0)
    warmup_ratio: float = Field(0.1, ge=0, lt=1)
    scheduler: Literal["cosine", "linear", "constant_with_warmup"] = "cosine"
    max_grad_norm: float = Field(1.0, gt=0)
    # auto: bf16 on CUDA (the QLoRA paper's choice; fp16 compute is unstable for QLoRA), fp32 on CPU,
    # where bitsandbytes' 4-bit layers under bf16 autocast measured ~8x slower per step than fp32.
    compute_dtype: Literal["auto", "bfloat16", "float32"] = "auto"

    quant_type: Literal["nf4", "fp4"] = "nf4"
    double_quant: bool = True
    # Tokens per training example. Left unset, it is capped at the model's positions (with a note);
    # set explicitly beyond them, the build is refused before it starts.
    max_length: int = Field(256, ge=8)
    max_steps: int | None = Field(None, ge=1)  # stop after this many optimizer steps (e.g. a smoke run of a big model)
    seed: int = 0

    def resolved_dtype(self) -> str:
        import torch

        if self.compute_dtype != "auto":
            return self.compute_dtype
        return "bfloat16" if torch.cuda.is_available() else "float32"

    def resolved(self, runtime: str | None = None) -> dict[str, str]:
        """What `auto` resolved to on this machine (part of the stage's cache key); any target's the same."""
        return {"compute_dtype": self.resolved_dtype()}


def load_base(path, config: FinetuneConfig):
    import torch
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    dtype = getattr(torch, config.resolved_dtype())
    try:
        if config.method == "qlora":
            if config.resolved_dtype() == "float16":
                raise ModelError("qlora with float16 compute is known to be unstable; use bfloat16 or float32")
            quant = BitsAndBytesConfig(
                load_in_4bit=True,
                bnb_4bit_quant_type=config.quant_type,
                bnb_4bit_use_double_quant=config.double_quant,
                bnb_4bit_compute_dtype=dtype,
                bnb_4bit_quant_storage=torch.uint8,
            )
            model = AutoModelForCausalLM.from_pretrained(path, quantization_config=quant, dtype=torch.float32)
        else:
            model = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, config.base_dtype))
    except (OSError, ValueError) as exc:
        raise ModelError(f"{path}: cannot load as a causal LM: {str(exc).splitlines()[0]}") from exc
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
        raise ModelError(f"{path}: no usable tokenizer ({str(exc).splitlines()[0]}); the model dir must hold tokenizer files") from exc
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


def _features(tokenizer, examples, max_length: int, data_config: DataConfig | None):
    """Training rows (edgeft.data.training_rows): labelled per data.loss_on, truncated to data.max_length
    when the profile sets it, else to this stage's max_length (oldest prompt tokens first; counted)."""
    data_config = data_config or DataConfig()
    return training_rows(tokenizer, examples, data_config.model_copy(update={"max_length": data_config.max_length or max_length}))


def checkpoint_root(stage_key: str):
    """Outside the stage's temp dir, so it survives a crash; keyed so only the same run resumes."""
    from ..artifact import cache_root

    return cache_root() / "checkpoints" / f"finetune-{stage_key[:24]}"


def last_complete_checkpoint(root) -> str | None:
    """The newest complete checkpoint-N. The Trainer writes trainer_state.json last (after weights,
    optimizer, scheduler and RNG state), so a kill mid-save leaves a checkpoint without it: skipped."""
    candidates = sorted(root.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[-1]) if p.name.split("-")[-1].isdigit() else -1)
    for candidate in reversed(candidates):
        if (candidate / "trainer_state.json").is_file() and any(candidate.glob("adapter_model.*")) and any(
                candidate.glob("optimizer.*")):
            return str(candidate)
    return None


def _callbacks(progress, total_steps: int, log_path, tokenizer, val_examples, patience: int | None):
    """Rich progress bar; plot-ready JSON lines (appended live, so a killed run keeps its log);
    validation exact match at each eval; early stopping on validation loss."""
    import json as _json

    from transformers import TrainerCallback

    from ..evaluate import exact_match as _exact_match

    class Callbacks(TrainerCallback):
        best_loss, evals_without_gain = float("inf"), 0

        def on_train_begin(self, args, state, control, **kwargs):
            self.task = progress.add_task("finetune", total=total_steps) if progress and state.is_world_process_zero else None

        def _write(self, entry: dict) -> None:
            with open(log_path, "a", encoding="utf-8") as log:
                log.write(_json.dumps(entry) + "\n")

        def on_log(self, args, state, control, logs=None, **kwargs):
            if not (logs and state.is_world_process_zero):
                return
            entry = {"step": state.global_step, "epoch": state.epoch, **logs}
            if "eval_loss" in logs:  # written by on_evaluate, which follows, with the task metric added
                self.pending_eval = entry
                return
            self._write(entry)
            if self.task is not None and "loss" in logs:
                progress.update(self.task, description=f"finetune (loss {logs['loss']:.3f})")

        def on_evaluate(self, args, state, control, metrics=None, model=None, **kwargs):
            metrics = metrics if metrics is not None else {}
            if state.is_world_process_zero:
                entry = getattr(self, "pending_eval", None) or {"step": state.global_step, "epoch": state.epoch, **metrics}
                self.pending_eval = None
                if val_examples and model is not None:
                    entry["eval_exact_match"] = metrics["eval_exact_match"] = round(_exact_match(model, tokenizer, val_examples), 4)
                    model.train()
                self._write(entry)
                if self.task is not None and "eval_loss" in entry:
                    shown = f"val loss {entry['eval_loss']:.3f}" + (f", val exact match {entry['eval_exact_match']:.2f}" if "eval_exact_match" in entry else "")
                    progress.update(self.task, description=f"finetune ({shown})")
            loss = metrics.get("eval_loss")
            if patience and loss is not None:
                if loss < self.best_loss - 1e-4:
                    self.best_loss, self.evals_without_gain = loss, 0
                else:
                    self.evals_without_gain += 1
                    if self.evals_without_gain >= patience:
                        control.should_training_stop = True

        def on_step_end(self, args, state, control, **kwargs):
            if self.task is not None:
                progress.update(self.task, completed=state.global_step)

        def on_train_end(self, args, state, control, **kwargs):
            if self.task is not None:
                progress.remove_task(self.task)

    return Callbacks()


def _is_out_of_memory(exc: BaseException) -> bool:
    import torch

    return isinstance(exc, torch.OutOfMemoryError) or (isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower())


def run(model: Artifact, config: FinetuneConfig, ctx: BuildContext) -> Artifact:
    import math
    import shutil

    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import Trainer, TrainingArguments, set_seed
    from transformers.trainer_callback import PrinterCallback

    set_seed(config.seed)
    tokenizer = load_tokenizer(model.path)

    max_positions = max_positions_of(model.path)
    check_max_length(config, max_positions, model.path)
    max_length = effective_max_length(config, max_positions, ctx.log, "finetune")
    train, truncated = _features(tokenizer, ctx.splits.train, max_length, ctx.splits.config)
    val, _ = _features(tokenizer, ctx.splits.val, max_length, ctx.splits.config)
    if truncated:
        ctx.log(f"finetune: {truncated} of {len(train)} training examples truncated to max_length")

    accuracy_base, eval_base = None, None  # evaluated by rank 0 alone; the other processes of a multi-process run go on to train
    if int(os.environ.get("RANK", "0")) == 0:
        base_fp32 = load_base(model.path, config.model_copy(update={"method": "lora", "base_dtype": "float32"}))
        eval_base = stage_eval(on_compute_device(base_fp32), tokenizer, ctx, label="evaluate base")
        accuracy_base = eval_base["exact_match"]
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

    # Without a stage key (called outside the pipeline) there is no identity to resume by: train afresh.
    checkpoints = checkpoint_root(ctx.stage_key) if ctx.stage_key else ctx.out / "checkpoints"
    if ctx.force:
        shutil.rmtree(checkpoints, ignore_errors=True)
    checkpoints.mkdir(parents=True, exist_ok=True)
    resume_from = last_complete_checkpoint(checkpoints)
    if resume_from:
        ctx.log(f"finetune: resuming an interrupted run from {resume_from}")
    log_path = checkpoints / "train_log.jsonl"

    world = int(os.environ.get("WORLD_SIZE", "1"))
    steps = math.ceil(len(train) / (config.batch_size * world * config.gradient_accumulation_steps) * config.epochs)
    if config.max_steps is not None:
        steps = min(steps, config.max_steps)
    evaluate_each = {"eval_strategy": "steps", "eval_steps": config.eval_steps} if config.eval_steps else {"eval_strategy": "epoch"}
    args = TrainingArguments(
        output_dir=str(checkpoints),
        per_device_train_batch_size=config.batch_size,
        per_device_eval_batch_size=config.batch_size,
        gradient_accumulation_steps=config.gradient_accumulation_steps,
        gradient_checkpointing=config.gradient_checkpointing,
        gradient_checkpointing_kwargs={"use_reentrant": False} if config.gradient_checkpointing else None,
        num_train_epochs=config.epochs,
        max_steps=config.max_steps or -1,  # -1: epochs decide
        learning_rate=config.lr,
        lr_scheduler_type=config.scheduler,
        warmup_steps=int(steps * config.warmup_ratio),
        max_grad_norm=config.max_grad_norm,
        bf16=config.resolved_dtype() == "bfloat16",
        use_cpu=not torch.cuda.is_available(),
        ddp_backend="gloo" if world > 1 and not torch.cuda.is_available() else None,  # CPU processes under accelerate/torchrun
        ddp_find_unused_parameters=False,  # every LoRA weight gets a gradient; the search would only cost time
        logging_steps=10,
        **(evaluate_each if val else {"eval_strategy": "no"}),
        save_strategy="steps",
        save_steps=config.save_steps,
        save_total_limit=2,
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
        eval_dataset=val or None,
        data_collator=_Collator(tokenizer.pad_token_id),
        callbacks=[_callbacks(ctx.progress, steps, log_path, tokenizer, ctx.splits.val[: config.eval_task_examples],
                              config.early_stopping_patience)],
    )
    trainer.remove_callback(PrinterCallback)  # the rich bar shows progress; the log goes to train_log.jsonl
    try:
        result = trainer.train(resume_from_checkpoint=resume_from)
    except Exception as exc:
        if _is_out_of_memory(exc):
            raise ModelError(
                f"out of memory while fine-tuning (batch_size {config.batch_size}, max_length {max_length}): "
                "lower batch_size (raise gradient_accumulation_steps to keep the effective batch), set "
                "gradient_checkpointing: true, or lower max_length") from exc
        raise
    if not trainer.is_world_process_zero():
        return None  # other processes of a multi-process run: rank 0 writes the artifact

    evaluation = stage_eval(peft_model, tokenizer, ctx, label="evaluate finetuned")
    accuracy = evaluation["exact_match"]
    adapter_dir = ctx.out / "adapter"
    peft_model.save_pretrained(adapter_dir)
    _sort_target_modules(adapter_dir / "adapter_config.json")
    tokenizer.save_pretrained(adapter_dir)
    (adapter_dir / "edgeft_adapter.json").write_text(json.dumps(
        {"name": config.adapter, "base_sha256": ctx.base.sha256, "data_sha256": ctx.splits.sha256, "method": config.method}, indent=2))
    shutil.copyfile(log_path, ctx.out / "train_log.jsonl")
    shutil.rmtree(checkpoints, ignore_errors=True)  # finished: the artifact replaces them
    evals = [entry for entry in trainer.state.log_history if "eval_loss" in entry]
    return Artifact(
        path=ctx.out,
        kind="adapter",
        stage="finetune",
        key="",
        metrics={
            "accuracy_base": accuracy_base,
            "accuracy": accuracy,
            "eval_base": eval_base,
            "eval": evaluation,
            # the last logged training loss: Trainer's own average covers only the steps since a resume
            "train_loss": round(next((e["loss"] for e in reversed(trainer.state.log_history) if "loss" in e), result.training_loss), 4),
            "val_loss": round(evals[-1]["eval_loss"], 4) if evals else None,
            "train_steps": result.global_step,
            "train_s": round(result.metrics.get("train_runtime", 0.0), 1),
            "trainable_params": trainable,
            "truncated_examples": truncated,
            "resumed_from_step": int(resume_from.rsplit("-", 1)[-1]) if resume_from else None,
        },
        info={"method": config.method, "adapter": config.adapter, "base_sha256": ctx.base.sha256,
              "torch_threads": torch.get_num_threads()},
    )


def _sort_target_modules(config_path) -> None:
    """peft writes target_modules from a set, in a different order each run; sorted, equal adapters hash equal."""
    config = json.loads(config_path.read_text())
    if isinstance(config.get("target_modules"), list):
        config["target_modules"] = sorted(config["target_modules"])
        config_path.write_text(json.dumps(config, indent=2, sort_keys=True))


def max_positions_of(model_dir) -> int | None:
    """The model's maximum sequence length from its config.json (None when it does not say)."""
    try:
        config = json.loads((Path(model_dir) / "config.json").read_text())
    except (OSError, ValueError):
        return None
    return config.get("max_position_embeddings") or config.get("n_positions")


def effective_max_length(config, max_positions: int | None, log=None, stage: str = "finetune") -> int:
    """A training stage's max_length (finetune, prune, distill): the default capped at the model's
    positions, saying so; an explicit value is taken as given (check_max_length refuses one too long)."""
    if max_positions is not None and "max_length" not in config.model_fields_set and config.max_length > max_positions:
        if log is not None:
            log(f"{stage}: max_length {max_positions}, the model's positions (the default {config.max_length} is capped; set {stage}.max_length to choose)")
        return max_positions
    return config.max_length


def check_max_length(config, max_positions: int | None, model_dir, where: str = "finetune", stage: str = "finetune") -> None:
    """An explicit max_length beyond the model's positions is a mistake (the default is capped instead)."""
    if max_positions is not None and "max_length" in config.model_fields_set and config.max_length > max_positions:
        raise ConfigError(f"{where}: {stage}.max_length {config.max_length} exceeds the model's {max_positions} positions "
                          f"({Path(model_dir) / 'config.json'}); lower max_length or leave it unset (capped at the model's positions)")
