"""prune: structured pruning of a merged model: MLP channels, attention heads, whole decoder layers.

Width pruning removes the same number of channels (heads) from every layer, choosing which ones per layer
by importance, so the result is an ordinary, smaller model of the same architecture: it reloads with
`from_pretrained` and exports like the original. With grouped-query attention, whole KV groups (a KV head
and the query heads sharing it) are removed; `head_dim` stays fixed and is written into the config.
Accuracy drops; list distill after prune to recover it. The model pruned is recorded as the teacher.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from ..artifact import Artifact
from ..context import BuildContext
from ..errors import ModelError
from ..evaluate import stage_eval
from .finetune import _Collator, _features, effective_max_length, load_tokenizer

# Decoder-only models laid out like Llama (q/k/v/o_proj, gate/up/down_proj, rotary, no per-head weights
# outside the projections), which this stage knows how to slice.
SUPPORTED = ("llama", "mistral", "qwen2", "qwen3")


class PruneConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    mlp_ratio: float = Field(0.25, ge=0, lt=1)  # share of MLP intermediate channels removed from every layer
    head_ratio: float = Field(0.0, ge=0, lt=1)  # share of attention heads (whole KV groups) removed from every layer
    layers: list[int] = []  # decoder layers removed whole (depth pruning), 0-based
    # l2: squared L2 norm of each channel/head's rows and columns; taylor: sum of |w * dL/dw| over them, with dL/dw
    # accumulated over calibration_examples train examples. l2 measured better on the demo (0.75 vs 0.25 at mlp_ratio 0.75).
    importance: Literal["l2", "taylor"] = "l2"
    calibration_examples: int = Field(64, ge=1)  # train-split examples for taylor importance
    batch_size: int = Field(16, ge=1)  # calibration batch size
    max_length: int = Field(256, ge=8)


def count_params(model) -> int:
    return sum(p.numel() for p in model.parameters())


def _check_supported(model, path) -> None:
    config = model.config
    if config.model_type not in SUPPORTED:
        raise ModelError(
            f"{path}: prune supports {', '.join(SUPPORTED)} models, not {config.model_type!r}; "
            f"remove prune from the profile or use a Llama-family base"
        )
    if config.num_attention_heads % config.num_key_value_heads:
        raise ModelError(f"{path}: {config.num_attention_heads} attention heads don't split into {config.num_key_value_heads} KV groups")


def _taylor_scores(model, tokenizer, config: PruneConfig, ctx: BuildContext) -> dict[str, "torch.Tensor"]:
    """|w * dL/dw| per weight, the task loss's gradient accumulated over the calibration batches (as
    torch-pruning's TaylorImportance does). Taking |.| per batch instead measured worse on the demo."""
    max_length = effective_max_length(config, model.config.max_position_embeddings, ctx.log, "prune")
    rows = _features(tokenizer, ctx.splits.train[: config.calibration_examples], max_length, ctx.splits.config).rows
    collate = _Collator(tokenizer.pad_token_id)
    task = ctx.progress.add_task("prune: taylor importance", total=len(rows)) if ctx.progress else None
    model.train()
    model.zero_grad(set_to_none=True)
    for start in range(0, len(rows), config.batch_size):
        batch = collate(rows[start : start + config.batch_size])
        model(**batch).loss.backward()
        if ctx.progress:
            ctx.progress.update(task, advance=len(batch["input_ids"]))
    if ctx.progress:
        ctx.progress.remove_task(task)
    scores = {name: (p.detach() * p.grad).abs() for name, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    model.eval()
    return scores


def _keep(scores: "torch.Tensor", n_remove: int) -> "torch.Tensor":
    """Indices of the units to keep (highest scores), in their original order."""
    import torch

    keep = torch.topk(scores, scores.numel() - n_remove, largest=True).indices
    return torch.sort(keep).values


def pruned_config(old, mlp_ratio: float, head_ratio: float, layers: list[int]):
    """The config of the pruned model, checked before any weight is touched.

    Returns (config, kept layer indices, MLP channels removed per layer, KV groups removed per layer).
    """
    n_layers, n_heads, n_kv = old.num_hidden_layers, old.num_attention_heads, old.num_key_value_heads
    group = n_heads // n_kv
    bad = [i for i in layers if not 0 <= i < n_layers]
    if bad:
        raise ModelError(f"prune.layers: {bad} out of range; the model has {n_layers} decoder layers (0-{n_layers - 1})")
    kept_layers = [i for i in range(n_layers) if i not in set(layers)]
    if not kept_layers:
        raise ModelError(f"prune.layers removes all {n_layers} decoder layers; keep at least one")
    mlp_remove = round(old.intermediate_size * mlp_ratio)
    kv_remove = round(n_kv * head_ratio)
    if kv_remove >= n_kv:
        raise ModelError(f"prune.head_ratio {head_ratio} removes all {n_kv} KV groups; lower it")
    if mlp_remove >= old.intermediate_size:
        raise ModelError(f"prune.mlp_ratio {mlp_ratio} removes all {old.intermediate_size} MLP channels; lower it")

    config = old.__class__.from_dict(old.to_dict())
    config.num_hidden_layers = len(kept_layers)
    config.num_key_value_heads = n_kv - kv_remove
    config.num_attention_heads = (n_kv - kv_remove) * group
    config.head_dim = getattr(old, "head_dim", None) or old.hidden_size // n_heads  # unchanged, now explicit
    config.intermediate_size = old.intermediate_size - mlp_remove
    if getattr(config, "layer_types", None):
        config.layer_types = [old.layer_types[i] for i in kept_layers]
    try:  # transformers 5's own checks (Llama: hidden_size must be a multiple of the head count, head_dim or not)
        config.validate()
    except Exception as exc:  # a StrictDataclassClassValidationError whose cause holds the readable line
        valid = [round(k / n_kv, 4) for k in range(n_kv) if old.hidden_size % ((n_kv - k) * group) == 0]
        raise ModelError(
            f"prune: keeping {config.num_attention_heads} of {n_heads} heads gives an invalid {config.model_type!r} config "
            f"({str(exc.__cause__ or exc).strip().splitlines()[0]}); use a head_ratio of {', '.join(map(str, valid))}"
        ) from exc
    return config, kept_layers, mlp_remove, kv_remove


def prune_model(model, mlp_ratio: float, head_ratio: float, layers: list[int], weight_scores=None):
    """A new, smaller model of the same class. A unit's importance is the sum of its weights' scores;
    weight_scores (name -> per-weight score) default to w**2 (so: squared L2 norm of its rows and columns).

    Returns (model, removed) where removed counts what went, per layer.
    """
    import torch
    from transformers import AutoModelForCausalLM

    config, kept_layers, mlp_remove, kv_remove = pruned_config(model.config, mlp_ratio, head_ratio, layers)
    n_kv, head_dim = model.config.num_key_value_heads, config.head_dim
    group = model.config.num_attention_heads // n_kv

    state = model.state_dict()
    score = (lambda name: weight_scores[name]) if weight_scores is not None else (lambda name: state[name].pow(2))
    new_state = {k: v for k, v in state.items() if not k.startswith("model.layers.")}
    for new_index, index in enumerate(kept_layers):
        src, dst = f"model.layers.{index}.", f"model.layers.{new_index}."
        layer = {k[len(src) :]: v for k, v in state.items() if k.startswith(src)}

        # MLP channel j: row j of gate_proj and up_proj, column j of down_proj.
        mlp = [f"mlp.{p}_proj.weight" for p in ("gate", "up", "down")]
        channel_scores = score(src + mlp[0]).sum(1) + score(src + mlp[1]).sum(1) + score(src + mlp[2]).sum(0)
        keep = _keep(channel_scores, mlp_remove)
        for name in list(layer):
            if name.startswith(("mlp.gate_proj.", "mlp.up_proj.")):
                layer[name] = layer[name][keep]
            elif name == "mlp.down_proj.weight":
                layer[name] = layer[name][:, keep]

        # KV group g: KV head g (k/v rows), its query heads (q rows, o columns).
        if kv_remove:
            q = score(src + "self_attn.q_proj.weight").sum(1).view(n_kv, group * head_dim).sum(1)
            k = score(src + "self_attn.k_proj.weight").sum(1).view(n_kv, head_dim).sum(1)
            v = score(src + "self_attn.v_proj.weight").sum(1).view(n_kv, head_dim).sum(1)
            o = score(src + "self_attn.o_proj.weight").sum(0).view(n_kv, group * head_dim).sum(1)
            groups = _keep(q + k + v + o, kv_remove)
            kv_rows = (groups[:, None] * head_dim + torch.arange(head_dim)).flatten()
            q_rows = (groups[:, None] * group * head_dim + torch.arange(group * head_dim)).flatten()
            for name in list(layer):
                if name.startswith("self_attn.q_proj."):
                    layer[name] = layer[name][q_rows]
                elif name.startswith(("self_attn.k_proj.", "self_attn.v_proj.")):
                    layer[name] = layer[name][kv_rows]
                elif name == "self_attn.o_proj.weight":
                    layer[name] = layer[name][:, q_rows]
        new_state.update({dst + k: v.contiguous() for k, v in layer.items()})

    pruned = AutoModelForCausalLM.from_config(config, dtype=next(model.parameters()).dtype)
    try:
        pruned.load_state_dict(new_state, strict=True)
    except RuntimeError as exc:
        raise ModelError(f"pruned weights don't fit a {config.model_type!r} model: {str(exc).splitlines()[0]}") from exc
    pruned.generation_config = model.generation_config
    removed = {"mlp_channels_per_layer": mlp_remove, "heads_per_layer": kv_remove * group, "kv_heads_per_layer": kv_remove, "layers": sorted(set(layers))}
    return pruned.eval(), removed


def run(model: Artifact, config: PruneConfig, ctx: BuildContext) -> Artifact:
    import torch
    from transformers import AutoModelForCausalLM

    if model.kind != "hf-model":
        raise ModelError(f"prune needs a PyTorch model (after merge), got a {model.kind!r} artifact; list merge before prune")
    tokenizer = load_tokenizer(model.path)
    try:
        source = AutoModelForCausalLM.from_pretrained(model.path, dtype=torch.float32)
    except (OSError, ValueError) as exc:
        raise ModelError(f"{model.path}: cannot load as a causal LM: {str(exc).splitlines()[0]}") from exc
    _check_supported(source, model.path)
    pruned_config(source.config, config.mlp_ratio, config.head_ratio, config.layers)  # fail before any scoring
    source.eval()
    scores = _taylor_scores(source, tokenizer, config, ctx) if config.importance == "taylor" else None
    pruned, removed = prune_model(source, config.mlp_ratio, config.head_ratio, config.layers, scores)
    params_before, params_after = count_params(source), count_params(pruned)
    del source, scores

    evaluation = stage_eval(pruned, tokenizer, ctx, label="evaluate pruned")
    pruned.save_pretrained(ctx.out)
    tokenizer.save_pretrained(ctx.out)
    return Artifact(
        path=ctx.out,
        kind="hf-model",
        stage="prune",
        key="",
        metrics={
            "params_before": params_before,
            "params_after": params_after,
            "param_ratio": round(params_after / params_before, 4),
            "accuracy": evaluation["exact_match"],
            "eval": evaluation,
        },
        info={
            "pruned": {"mlp_ratio": config.mlp_ratio, "head_ratio": config.head_ratio, "layers": sorted(set(config.layers))},
            "removed": removed,
            "importance": config.importance,
            # distill reloads the unpruned model from here, and checks it is still the same files
            "teacher_path": str(model.path),
            "teacher_sha256": model.sha256,
        },
    )
