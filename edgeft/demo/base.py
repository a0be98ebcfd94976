"""The built-in demo base model: a tiny Llama-style LM that edgeft pretrains itself, offline.

A BPE tokenizer (digits split one per token, byte-level so text round-trips) is trained on the shipped
corpus, then the model is pretrained briefly on it with a fixed seed. The result is an ordinary Hugging
Face model directory, cached by a hash of this recipe so it is built once per machine.
"""

from __future__ import annotations

import math
from pathlib import Path

from filelock import FileLock

from ..artifact import atomic_dir, cache_root, digest_of, sha256_file
from . import generate

RECIPE = {
    "version": 2,  # 2: BOS...EOS documents (see documents()), fixed-width readings (generate.telemetry_line)
    "vocab_size": 384,
    "hidden_size": 128,
    "intermediate_size": 256,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "max_position_embeddings": 256,
    "seq_len": 128,
    "batch_size": 32,
    "steps": 500,
    "lr": 3e-3,
    "seed": 0,
}


def recipe_key() -> str:
    return digest_of({"recipe": RECIPE, "corpus": sha256_file(generate.CORPUS_FILE), "code": sha256_file(Path(__file__))})[:16]


def _final() -> Path:
    return cache_root() / "demo" / f"base-{recipe_key()}"


def is_built() -> bool:
    return (_final() / "config.json").exists()


def demo_base_dir(progress=None) -> Path:
    """Path of the demo base model, building it first if this machine has not yet. Two builds that both
    need it: one pretrains it, the other waits for it (a file lock; the OS drops it if its holder dies)."""
    final = _final()
    if is_built():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(final.parent / f".{final.name}.lock")):
        if not is_built():
            with atomic_dir(final) as tmp:
                build(tmp, progress)
    return final


def train_tokenizer(corpus: str):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=RECIPE["vocab_size"],
        special_tokens=["<pad>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(corpus.splitlines(keepends=True), trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, pad_token="<pad>", bos_token="<s>", eos_token="</s>", model_max_length=RECIPE["max_position_embeddings"]
    )


def documents(corpus: str) -> list[str]:
    """The pretraining documents, each framed BOS ... EOS as a real base model's are: a corpus line, or a
    reading and the status record that follows it (`reading\n{json}`, the shape of a task example).

    Ending documents with EOS matters: a base that never saw EOS makes fine-tuning spend most of its loss
    on teaching it to stop (~3.4 nats a completion), which left the actual task a weak signal; on some
    CPUs and seeds the fine-tune then never learned one of the four alerts (exact match 0.70)."""
    out: list[str] = []
    for line in corpus.splitlines():
        if line.startswith('{"device"') and '"status"' in line and out and not out[-1].startswith("{"):
            out[-1] += "\n" + line  # the status record of the reading just before it
        else:
            out.append(line)
    return out


def build(out: Path, progress=None, seed: int | None = None) -> None:
    """Pretrain the demo base into `out` (seed: the recipe's unless given; other seeds are for bench/)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    corpus = generate.CORPUS_FILE.read_text()
    tokenizer = train_tokenizer(corpus)
    seed = RECIPE["seed"] if seed is None else seed
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=RECIPE["hidden_size"],
        intermediate_size=RECIPE["intermediate_size"],
        num_hidden_layers=RECIPE["num_hidden_layers"],
        num_attention_heads=RECIPE["num_attention_heads"],
        num_key_value_heads=RECIPE["num_attention_heads"],
        max_position_embeddings=RECIPE["max_position_embeddings"],
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(config)
    ids: list[int] = []
    for document in documents(corpus):
        ids += [tokenizer.bos_token_id] + tokenizer(document, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    data = torch.tensor(ids, dtype=torch.long)
    seq_len, batch_size, steps = RECIPE["seq_len"], RECIPE["batch_size"], RECIPE["steps"]
    optimizer = torch.optim.AdamW(model.parameters(), lr=RECIPE["lr"], weight_decay=0.01)
    warmup = steps // 10
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: (s + 1) / warmup if s < warmup else 0.5 * (1 + math.cos(math.pi * (s - warmup) / (steps - warmup)))
    )
    generator = torch.Generator().manual_seed(seed)
    task = progress.add_task("pretrain demo base", total=steps) if progress else None
    model.train()
    for step in range(steps):
        starts = torch.randint(0, len(data) - seq_len - 1, (batch_size,), generator=generator)
        batch = torch.stack([data[s : s + seq_len] for s in starts])
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        if progress:
            progress.update(task, advance=1, description=f"pretrain demo base (loss {loss.item():.3f})")
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
