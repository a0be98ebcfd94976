"""merge: fold the adapter into a full-precision reload of the base.

Merging into the 4-bit training model would leave 4-bit layers, so the base is reloaded in fp32.
Validated: the merged model's logits must match base+adapter (unmerged) within `atol` on fixed inputs.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from ..artifact import Artifact, hash_dir
from ..context import BuildContext
from ..data import encode
from ..errors import ModelError, QualityCheckFailed
from ..evaluate import on_compute_device, stage_eval
from .finetune import load_tokenizer


class MergeConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    # fp32 merge error is ~1e-6 on these logits; 1e-3 leaves room for bigger models, not for a wrong merge.
    atol: float = Field(1e-3, gt=0)
    validation_examples: int = Field(8, ge=1)


def run(model: Artifact, config: MergeConfig, ctx: BuildContext) -> Artifact:
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    if model.kind != "adapter":
        raise ModelError(f"merge needs an adapter from the finetune stage, got a {model.kind!r} artifact; list finetune before merge in the profile")
    if model.info.get("base_sha256") != ctx.base.sha256:
        raise ModelError(
            f"{model.path}: this adapter was trained on another base (sha256 {str(model.info.get('base_sha256'))[:12]}…, "
            f"given {ctx.base.sha256[:12]}…); merge it into the base it was trained on"
        )
    actual = hash_dir(model.path)
    changed = sorted(name for name in set(actual) | set(model.files) if actual.get(name) != model.files.get(name))
    if changed:
        raise ModelError(f"{model.path}: adapter files differ from the sha256 recorded when it was trained "
                         f"({', '.join(changed[:3])}): tampered or corrupted; re-run finetune with --force")
    tokenizer = load_tokenizer(ctx.base.path)
    base = AutoModelForCausalLM.from_pretrained(ctx.base.path, dtype=torch.float32)
    try:
        with_adapter = PeftModel.from_pretrained(base, model.path / "adapter")
    except (OSError, ValueError, RuntimeError) as exc:
        raise ModelError(f"{model.path / 'adapter'}: cannot load the adapter onto the base: {str(exc).splitlines()[0]}") from exc
    with_adapter.eval()

    rows = [sum(encode(tokenizer, e), []) for e in ctx.splits.test[: config.validation_examples]]
    with torch.no_grad():
        reference = [with_adapter(input_ids=torch.tensor([r])).logits for r in rows]
        merged = with_adapter.merge_and_unload()
        merged.eval()
        max_abs_diff = max(float((merged(input_ids=torch.tensor([r])).logits - ref).abs().max()) for r, ref in zip(rows, reference))
    if not max_abs_diff <= config.atol:
        raise QualityCheckFailed(
            f"merge check max_abs_diff failed: the merged model differs from base+adapter by {max_abs_diff:.3g}, above "
            f"merge.atol {config.atol:g}; the adapter at {model.path / 'adapter'} may be corrupt: re-run finetune with --force",
            check="merge.max_abs_diff", value=max_abs_diff, limit=config.atol, setting="merge.atol")
    # Shards of 1 GB: safetensors serialises a shard in memory, so a 4 GB single shard would double the peak.
    merged.save_pretrained(ctx.out, max_shard_size="1GB")
    tokenizer.save_pretrained(ctx.out)
    evaluation = stage_eval(on_compute_device(merged), tokenizer, ctx, label="evaluate merged")  # saved fp32; evaluated on a GPU if any
    return Artifact(
        path=ctx.out,
        kind="hf-model",
        stage="merge",
        key="",
        metrics={"accuracy": evaluation["exact_match"], "eval": evaluation, "merge_max_abs_diff": max_abs_diff, "merge_atol": config.atol},
        info={"adapter_sha256": model.sha256, "adapter": model.info.get("adapter", "default"), "base_sha256": ctx.base.sha256},
    )
