"""distill: recover a pruned model's accuracy by knowledge distillation from the model it was pruned from.

The teacher is explicit: the prune stage records the unpruned model's path and content hash, and this
stage reloads it from there (and refuses it if its files changed). Full-parameter fp32 training of the
student on the train split; loss over completion tokens only:
    alpha * KL(softmax(teacher / T) || softmax(student / T)) * T^2 + (1 - alpha) * cross-entropy.
With `student` set, a freshly initialised model (the teacher's config with these overrides) is trained
instead of the pruned one; then the input may also be an unpruned model, which becomes the teacher.
"""

from __future__ import annotations

import json
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from ..artifact import Artifact, digest_of, hash_dir
from ..context import BuildContext
from ..errors import ModelError
from ..evaluate import exact_match, stage_eval
from .finetune import _Collator, _features, effective_max_length, load_tokenizer, max_positions_of
from .prune import count_params


class DistillConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    temperature: float = Field(2.0, gt=0)
    alpha: float = Field(0.5, ge=0, le=1)  # weight of the KL term; 1 - alpha goes to the task cross-entropy
    epochs: float = Field(2.0, gt=0)
    lr: float = Field(1e-3, gt=0)
    batch_size: int = Field(16, ge=1)
    warmup_ratio: float = Field(0.1, ge=0, lt=1)
    max_grad_norm: float = Field(1.0, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    max_length: int = Field(256, ge=8)
    # Config overrides for a fresh, smaller student (e.g. {num_hidden_layers: 2}); None: train the input model
    student: dict[str, Any] | None = None
    seed: int = 0


def _load(path, what: str):
    import torch
    from transformers import AutoModelForCausalLM

    try:
        return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    except (OSError, ValueError) as exc:
        raise ModelError(f"{path}: cannot load the {what} as a causal LM: {str(exc).splitlines()[0]}") from exc


def _teacher_path(model: Artifact, config: DistillConfig, ctx: BuildContext):
    from pathlib import Path

    if "teacher_path" not in model.info:
        if config.student is not None:
            return model.path  # distil the input model itself into a fresh student
        raise ModelError(f"{model.path}: no teacher recorded ({model.stage!r} artifact); list prune before distill, or set distill.student")
    path, sha256 = Path(model.info["teacher_path"]), model.info.get("teacher_sha256")
    if sha256 == ctx.base.sha256:
        return ctx.base.path  # pruned straight from the base, which the pipeline has just hashed
    if not path.is_dir():
        raise ModelError(f"{path}: the teacher recorded by prune is gone; re-run the build with --force to rebuild it")
    if digest_of(hash_dir(path)) != sha256:
        raise ModelError(f"{path}: the teacher's files changed since prune ran; re-run the build with --force")
    return path


def _fresh_student(teacher, overrides: dict[str, Any]):
    from transformers import AutoModelForCausalLM

    settings = teacher.config.to_dict()
    unknown = sorted(set(overrides) - set(settings))
    if unknown:
        raise ModelError(f"distill.student: {', '.join(unknown)} not in the teacher's {teacher.config.model_type!r} config; use its field names")
    settings.update(overrides)
    if "num_hidden_layers" in overrides and settings.get("layer_types"):
        settings["layer_types"] = settings["layer_types"][: settings["num_hidden_layers"]]
    try:
        student_config = teacher.config.__class__.from_dict(settings)
        student = AutoModelForCausalLM.from_config(student_config)
    except (ValueError, TypeError) as exc:
        raise ModelError(f"distill.student: {overrides} is not a valid model config: {str(exc).splitlines()[0]}") from exc
    student.generation_config = teacher.generation_config
    return student


def distill_loss(student_logits, teacher_logits, labels, temperature: float, alpha: float):
    """(loss, kl, ce): means over completion tokens (labels != -100), causal shift as in the HF LM loss."""
    import torch.nn.functional as F

    mask = labels[:, 1:] != -100
    s = student_logits[:, :-1][mask]  # [tokens, vocab]
    t = teacher_logits[:, :-1][mask]
    ce = F.cross_entropy(s, labels[:, 1:][mask])
    kl = F.kl_div(F.log_softmax(s / temperature, -1), F.log_softmax(t / temperature, -1), log_target=True, reduction="batchmean")
    return alpha * kl * temperature**2 + (1 - alpha) * ce, kl, ce


def run(model: Artifact, config: DistillConfig, ctx: BuildContext) -> Artifact:
    import math
    import time

    import torch
    from transformers import get_cosine_schedule_with_warmup, set_seed

    if model.kind != "hf-model":
        raise ModelError(f"distill needs a PyTorch model (after prune), got a {model.kind!r} artifact; list prune before distill")
    set_seed(config.seed)
    teacher_path = _teacher_path(model, config, ctx)
    tokenizer = load_tokenizer(model.path)
    teacher = _load(teacher_path, "teacher").eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    student = _fresh_student(teacher, config.student) if config.student is not None else _load(model.path, "student")
    if student.config.vocab_size != teacher.config.vocab_size:
        raise ModelError(f"student vocab {student.config.vocab_size} != teacher vocab {teacher.config.vocab_size}; distillation needs one tokenizer")

    test = ctx.splits.test
    teacher_accuracy = exact_match(teacher, tokenizer, test, progress=ctx.progress, label="evaluate teacher")

    max_length = effective_max_length(config, max_positions_of(model.path), ctx.log, "distill")
    train = _features(tokenizer, ctx.splits.train, max_length, ctx.splits.config).rows
    loader = torch.utils.data.DataLoader(
        train, batch_size=config.batch_size, shuffle=True, collate_fn=_Collator(tokenizer.pad_token_id),
        generator=torch.Generator().manual_seed(config.seed),
    )
    steps = math.ceil(len(train) / config.batch_size * config.epochs)
    optimizer = torch.optim.AdamW(student.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    schedule = get_cosine_schedule_with_warmup(optimizer, int(steps * config.warmup_ratio), steps)

    task = ctx.progress.add_task("distill", total=steps) if ctx.progress else None
    log, losses, window = [], [], []
    started = time.perf_counter()
    student.train()
    step = 0
    while step < steps:
        for batch in loader:
            with torch.no_grad():
                teacher_logits = teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            student_logits = student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            loss, kl, ce = distill_loss(student_logits, teacher_logits, batch["labels"], config.temperature, config.alpha)
            loss.backward()
            grad_norm = torch.nn.utils.clip_grad_norm_(student.parameters(), config.max_grad_norm)
            optimizer.step()
            schedule.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            losses.append(loss.item())
            window.append((loss.item(), kl.item(), ce.item(), grad_norm.item()))
            if step % 10 == 0 or step == steps:
                mean = [round(sum(col) / len(window), 4) for col in zip(*window)]
                log.append({"step": step, "loss": mean[0], "kl": mean[1], "ce": mean[2], "grad_norm": mean[3], "lr": schedule.get_last_lr()[0]})
                window = []
                if ctx.progress:
                    ctx.progress.update(task, description=f"distill (loss {mean[0]:.3f})")
            if ctx.progress:
                ctx.progress.update(task, completed=step)
            if step == steps:
                break
    train_s = time.perf_counter() - started
    if ctx.progress:
        ctx.progress.remove_task(task)

    student.eval()
    evaluation = stage_eval(student, tokenizer, ctx, label="evaluate distilled")
    student.save_pretrained(ctx.out)
    tokenizer.save_pretrained(ctx.out)
    (ctx.out / "train_log.jsonl").write_text("".join(json.dumps(entry) + "\n" for entry in log))
    return Artifact(
        path=ctx.out,
        kind="hf-model",
        stage="distill",
        key="",
        metrics={
            "accuracy": evaluation["exact_match"],
            "eval": evaluation,
            "teacher_accuracy": teacher_accuracy,
            "params": count_params(student),
            "teacher_params": count_params(teacher),
            "loss": round(sum(losses) / len(losses), 4),  # mean over all steps, like finetune's train_loss
            "train_steps": steps,
            "train_s": round(train_s, 1),
        },
        info={
            "teacher_path": str(teacher_path),
            "teacher_sha256": model.info.get("teacher_sha256", model.sha256),
            "student": "fresh" if config.student is not None else "input",
            "student_overrides": config.student,
            "temperature": config.temperature,
            "alpha": config.alpha,
            "torch_threads": torch.get_num_threads(),
        },
    )
