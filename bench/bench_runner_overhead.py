"""The runner's own overhead on a decode loop: its backend vs bare ONNX Runtime loops, same session options.

Per model, each round runs greedy generations (a prefill of --prompt-tokens, then --decode-tokens
one-token steps, argmax of the last position each time) through every variant below, in a rotating
order so machine drift favours none: one untimed, then --reps timed, whose fastest is the variant's
figure for the round (on a shared machine the fastest is the one least disturbed). Printed: per-step
and prefill µs (median of rounds), and per variant its per-step difference from each bare loop and
its ratio to the bare `session.run` loop, as median (min..max) over the rounds.

Variants:
- runner: the runner's measurement path (measure.first_token_and_decode on its onnxruntime backend, with
  its telemetry sampler running): the KV cache stays in ONNX Runtime's OrtValues from step to step.
- runner (old): the backend before that (numpy feeds through `session.run`, presents back as numpy),
  reproduced here as OldRunBackend, driven the same way.
- runner (public API): the runner's backend on the documented OrtValue API (what it falls back to).
- bare run: a minimal `InferenceSession.run` loop with numpy feeds (one feed dict, updated in place).
- bare ortvalues: a minimal loop of the same session calls the runner makes (pybind
  run_with_ort_values, presents fed back as OrtValues): the goal is the runner within 10 µs of it.
- bare iobinding: a minimal IO-binding loop at the same level, presents bound as the next pasts. Every
  output must be rebound each step (a bound output keeps its first shape and the cache grows), so it
  makes 2 x tensors + 3 calls a step where run_with_ort_values makes one; it measured the same as the
  ortvalues loop here, so the runner takes the simpler one.

A fused graph (export graph: fused; metadata edgeft.kv_cache: in-place) gets the runner, its public-API
form, the bare `session.run` loop (the graph grows its cache by copying when run that way) and:
- bare in-place: a minimal loop of what the runner does for such a graph: one IO binding, the cache
  buffers bound as past and present once, per step the mask bound and one logits buffer reused (the
  runner binds a new logits array each step, since its caller keeps it). Goal: the runner within 10 µs.

Models: --model FILE.onnx (any edgeft KV-cache ONNX, repeatable), --bundle DIR (its model), a synthetic
graph of --synthetic-layers layers that computes next to nothing (concat and gathers: every µs is I/O
overhead, what a many-layer model pays per step), and unless --skip-20m a ~20M random Llama (hidden
512, 4 layers) exported by edgeft's exporter (imports torch: run under flock /tmp/edgeft-heavy.lock
on the shared build machine).

Usage: .venv/bin/python bench/bench_runner_overhead.py --model /tmp/tiny.onnx --synthetic-layers 24 [--skip-20m]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "runner"))

import onnxruntime as ort  # noqa: E402

from edgeft_runner.backends.onnxruntime import OnnxRuntimeBackend  # noqa: E402
from edgeft_runner.measure import first_token_and_decode, greedy_generate, prompt_ids  # noqa: E402
from edgeft_runner.telemetry import TelemetrySampler  # noqa: E402
from edgeft_runner.telemetry.thermal import default_sysfs_root  # noqa: E402


def session_options(threads: int) -> ort.SessionOptions:
    """The runner's options (threads, one inter-op thread, no spinning)."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3
    return options


class OldRunBackend(OnnxRuntimeBackend):
    """The backend's forward before the cache stayed in OrtValues: numpy feeds through session.run."""

    def load(self, *args, **kwargs) -> None:
        super().load(*args, **kwargs)
        self._ones_np = np.ones((1, 256), dtype=np.int64)

    def empty_past(self) -> list[np.ndarray]:
        return [np.zeros(shape, dtype=dtype) for shape, dtype in zip(self.past_shapes, self.past_dtypes)]

    def forward(self, input_ids, past):
        if type(input_ids) is not np.ndarray or input_ids.dtype != np.int64:
            input_ids = np.asarray(input_ids, dtype=np.int64)
        feed = self._feed
        feed["input_ids"] = input_ids
        if self.takes_attention_mask:
            length = (past[0].shape[2] if past else 0) + input_ids.shape[1]
            if length > self._ones_np.shape[1]:
                self._ones_np = np.ones((1, max(length, 2 * self._ones_np.shape[1])), dtype=np.int64)
            feed["attention_mask"] = self._ones_np[:, :length]
        for name, value in zip(self.past_names, past):
            feed[name] = value
        logits, *presents = self.session.run(self.output_names, feed)
        return logits, presents


class BareLoops:
    """Minimal generation loops on one plain session: no checks, no telemetry, preallocated where possible."""

    def __init__(self, model: Path, threads: int, num_kv_heads: int | None, head_dim: int | None):
        self.session = ort.InferenceSession(str(model), session_options(threads), providers=["CPUExecutionProvider"])
        probe = OnnxRuntimeBackend()  # only for the model's names and empty-past shapes
        probe.load(model, threads, num_kv_heads=num_kv_heads, head_dim=head_dim)
        self.past_names, self.output_names = probe.past_names, probe.output_names
        self.in_place_cache, self.past_shapes, self.past_dtypes = probe.in_place_cache, probe.past_shapes, probe.past_dtypes
        self.vocab = next(o for o in self.session.get_outputs() if o.name == "logits").shape[2]
        self.empty = [np.zeros(s, dtype=d) for s, d in zip(probe.past_shapes, probe.past_dtypes)]
        self.ones = np.ones((1, 8192), dtype=np.int64)
        self.token = np.zeros((1, 1), dtype=np.int64)
        self.c_session = self.session._sess
        self.cpu = ort.OrtDevice.make("cpu", 0)._get_c_device()
        self.run_options = ort.RunOptions()

    def run(self, prompt: np.ndarray, steps: int) -> tuple[float, float, list[int]]:
        """(prefill µs, per decode step µs, tokens) of a session.run loop with numpy feeds."""
        run, names, token = self.session.run, self.output_names, self.token
        t0 = time.perf_counter()
        feed = {"input_ids": prompt, "attention_mask": self.ones[:, :prompt.shape[1]], **dict(zip(self.past_names, self.empty))}
        logits, *presents = run(names, feed)
        tokens = [int(np.argmax(logits[0, -1]))]
        t1 = time.perf_counter()
        length = prompt.shape[1]
        feed["input_ids"] = token
        for _ in range(steps):
            token[0, 0] = tokens[-1]
            length += 1
            feed["attention_mask"] = self.ones[:, :length]
            for name, value in zip(self.past_names, presents):
                feed[name] = value
            logits, *presents = run(names, feed)
            tokens.append(int(np.argmax(logits[0, -1])))
        t2 = time.perf_counter()
        return (t1 - t0) * 1e6, (t2 - t1) * 1e6 / max(steps, 1), tokens

    def _wrap(self, array):
        return ort.OrtValue.ortvalue_from_numpy(array)._ortvalue

    def ortvalues(self, prompt: np.ndarray, steps: int) -> tuple[float, float, list[int]]:
        """The same, with the session calls the runner makes: OrtValues in, OrtValues out."""
        run, names, options, token = self.c_session.run_with_ort_values, self.output_names, self.run_options, self.token
        present_indices = range(1, len(names))
        t0 = time.perf_counter()
        feed = {"input_ids": self._wrap(prompt), "attention_mask": self._wrap(self.ones[:, :prompt.shape[1]]),
                **{name: self._wrap(array) for name, array in zip(self.past_names, self.empty)}}
        outputs = run(feed, names, options)
        tokens = [int(np.argmax(outputs[0].numpy()[0, -1]))]
        t1 = time.perf_counter()
        length = prompt.shape[1]
        feed["input_ids"] = self._wrap(token)
        masks = {}
        for _ in range(steps):
            token[0, 0] = tokens[-1]
            length += 1
            mask = masks.get(length)
            if mask is None:
                mask = masks[length] = self._wrap(self.ones[:, :length])
            feed["attention_mask"] = mask
            for name, index in zip(self.past_names, present_indices):
                feed[name] = outputs[index]
            outputs = run(feed, names, options)
            tokens.append(int(np.argmax(outputs[0].numpy()[0, -1])))
        t2 = time.perf_counter()
        return (t1 - t0) * 1e6, (t2 - t1) * 1e6 / max(steps, 1), tokens

    def iobinding(self, prompt: np.ndarray, steps: int) -> tuple[float, float, list[int]]:
        """An IO-binding loop at the same level: presents bound as the next pasts, every output rebound."""
        binding, names, cpu, token = self.session.io_binding()._iobinding, self.output_names, self.cpu, self.token
        run, options = self.c_session.run_with_iobinding, self.run_options
        present_indices = range(1, len(names))
        t0 = time.perf_counter()
        binding.bind_input("input_ids", prompt)
        binding.bind_input("attention_mask", self.ones[:, :prompt.shape[1]])
        for name, array in zip(self.past_names, self.empty):
            binding.bind_input(name, array)
        for name in names:
            binding.bind_output(name, cpu)
        run(binding, options)
        outputs = binding.get_outputs()
        tokens = [int(np.argmax(outputs[0].numpy()[0, -1]))]
        t1 = time.perf_counter()
        length = prompt.shape[1]
        binding.bind_input("input_ids", token)
        for _ in range(steps):
            token[0, 0] = tokens[-1]
            length += 1
            binding.bind_input("attention_mask", self.ones[:, :length])
            for name, index in zip(self.past_names, present_indices):
                binding.bind_ortvalue_input(name, outputs[index])
            for name in names:
                binding.bind_output(name, cpu)
            run(binding, options)
            outputs = binding.get_outputs()
            tokens.append(int(np.argmax(outputs[0].numpy()[0, -1])))
        t2 = time.perf_counter()
        return (t1 - t0) * 1e6, (t2 - t1) * 1e6 / max(steps, 1), tokens


    def in_place(self, prompt: np.ndarray, steps: int) -> tuple[float, float, list[int]]:
        """A fused graph's loop: the cache buffers bound once as past and present (GroupQueryAttention writes
        the new tokens in place), per step the mask, and one logits buffer for every decode step."""
        binding = self.session.io_binding()._iobinding
        run, options, token, wrap = self.c_session.run_with_iobinding, self.run_options, self.token, self._wrap
        capacity = prompt.shape[1] + steps
        caches = [np.zeros((1, shape[1], capacity, shape[3]), dtype=dtype) for shape, dtype in zip(self.past_shapes, self.past_dtypes)]
        for name, present, cache in zip(self.past_names, self.output_names[1:], caches):
            value = wrap(cache)
            binding.bind_ortvalue_input(name, value)
            binding.bind_ortvalue_output(present, value)
        masks = [wrap(self.ones[:, :length]) for length in range(capacity + 1)]
        logits_prefill = np.empty((1, prompt.shape[1], self.vocab), dtype=np.float32)
        logits_step = np.empty((1, 1, self.vocab), dtype=np.float32)
        t0 = time.perf_counter()
        binding.bind_ortvalue_input("input_ids", wrap(prompt))
        binding.bind_ortvalue_input("attention_mask", masks[prompt.shape[1]])
        binding.bind_ortvalue_output("logits", wrap(logits_prefill))
        run(binding, options)
        tokens = [int(np.argmax(logits_prefill[0, -1]))]
        t1 = time.perf_counter()
        length = prompt.shape[1]
        binding.bind_ortvalue_input("input_ids", wrap(token))
        binding.bind_ortvalue_output("logits", wrap(logits_step))
        for _ in range(steps):
            token[0, 0] = tokens[-1]
            length += 1
            binding.bind_ortvalue_input("attention_mask", masks[length])
            run(binding, options)
            tokens.append(int(np.argmax(logits_step[0, -1])))
        t2 = time.perf_counter()
        return (t1 - t0) * 1e6, (t2 - t1) * 1e6 / max(steps, 1), tokens


def runner_loop(backend: OnnxRuntimeBackend):
    def generate(prompt: np.ndarray, steps: int) -> tuple[float, float, None]:
        result = first_token_and_decode(backend, prompt, steps, runs=1)
        return result["first_token_ms"] * 1e3, result["decode_ms_per_token"] * 1e3, None
    return generate


def timed(generate, prompt: np.ndarray, steps: int, reps: int, telemetry: bool) -> tuple[float, float]:
    """(prefill µs, per-step µs), each the fastest of reps generations after an untimed one. telemetry:
    with the runner's sampler running all through, as in a real run (started before the untimed one)."""
    with TelemetrySampler(default_sysfs_root()) if telemetry else contextlib.nullcontext():
        generate(prompt, steps)
        results = [generate(prompt, steps) for _ in range(reps)]
    return min(r[0] for r in results), min(r[1] for r in results)


def spread(values) -> str:
    return f"{np.median(values):+8.1f} ({min(values):+.1f}..{max(values):+.1f})"


def compare(label: str, model: Path, vocab_size: int, prompt_tokens: int, decode_tokens: int, threads: int,
            rounds: int, reps: int, num_kv_heads: int | None = None, head_dim: int | None = None) -> dict:
    bare = BareLoops(model, threads, num_kv_heads, head_dim)
    backends = {}
    kinds = [("runner", OnnxRuntimeBackend()), ("runner (public API)", OnnxRuntimeBackend(public_api_only=True))]
    if not bare.in_place_cache:
        kinds.insert(1, ("runner (old)", OldRunBackend()))
    for name, backend in kinds:
        backend.load(model, threads, num_kv_heads=num_kv_heads, head_dim=head_dim)
        backends[name] = backend
    variants = {name: runner_loop(backend) for name, backend in backends.items()}
    if bare.in_place_cache:
        variants.update({"bare run": bare.run, "bare in-place": bare.in_place})
        closest = "bare in-place"  # what the runner does for this graph, at its bare minimum
    else:
        variants.update({"bare run": bare.run, "bare ortvalues": bare.ortvalues, "bare iobinding": bare.iobinding})
        closest = "bare ortvalues"
    prompt = prompt_ids(prompt_tokens, vocab_size)

    tokens = bare.run(prompt, decode_tokens)[2]
    for name in [n for n in variants if n.startswith("bare") and n != "bare run"]:  # every loop computes the same thing
        assert variants[name](prompt, decode_tokens)[2] == tokens, name
    for name, backend in backends.items():
        assert greedy_generate(backend, list(prompt[0]), decode_tokens + 1, None) == tokens, name

    names = list(variants)
    prefill = {name: [] for name in names}
    step = {name: [] for name in names}
    for index in range(rounds):
        order = names[index % len(names):] + names[:index % len(names)]
        for name in (order if index % 2 else order[::-1]):
            first, per_step = timed(variants[name], prompt, decode_tokens, reps, telemetry=name in backends)
            prefill[name].append(first)
            step[name].append(per_step)

    print(f"\n{label}: {prompt_tokens}-token prefill + {decode_tokens} decode steps, {threads} thread(s), "
          f"{rounds} rounds x {reps} generations (fastest); µs, median (min..max) over rounds")
    print(f"  {'variant':22s} {'step':>8s} {'prefill':>9s}   {'step - bare run':>24s} {'step - ' + closest:>24s}"
          f" {'step / bare run':>22s}")
    summary = {}
    for name in names:
        minus_run = [a - b for a, b in zip(step[name], step["bare run"])]
        minus_ov = [a - b for a, b in zip(step[name], step[closest])]
        ratio = [a / b for a, b in zip(step[name], step["bare run"])]
        print(f"  {name:22s} {np.median(step[name]):8.1f} {np.median(prefill[name]):9.1f}   {spread(minus_run):>24s} "
              f"{spread(minus_ov):>24s} {np.median(ratio):8.3f} ({min(ratio):.3f}..{max(ratio):.3f})")
        summary[name] = {"step_us": float(np.median(step[name])), "prefill_us": float(np.median(prefill[name])),
                         "step_minus_bare_run_us": float(np.median(minus_run)),
                         f"step_minus_{closest.replace(' ', '_').replace('-', '_')}_us": float(np.median(minus_ov))}
    return summary


def synthetic_model(path: Path, layers: int, heads: int = 4, head_dim: int = 16, vocab: int = 512) -> Path:
    """A KV-cache graph with the edgeft contract and next to no compute (gathers and one concat per cache
    tensor): its per-step time is what the session and the loop pay for moving 2 x layers tensors."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.standard_normal((vocab, heads * head_dim)).astype(np.float32), "kv_table"),
             numpy_helper.from_array(rng.standard_normal((vocab, vocab)).astype(np.float32), "lm_table"),
             numpy_helper.from_array(np.array([1, -1, heads, head_dim], dtype=np.int64), "kv_shape")]
    nodes = [helper.make_node("Gather", ["kv_table", "input_ids"], ["rows"]),
             helper.make_node("Reshape", ["rows", "kv_shape"], ["rows4"]),
             helper.make_node("Transpose", ["rows4"], ["new"], perm=[0, 2, 1, 3]),
             helper.make_node("Gather", ["lm_table", "input_ids"], ["table_logits"]),
             helper.make_node("Cast", ["attention_mask"], ["mask_f"], to=TensorProto.FLOAT),
             helper.make_node("ReduceSum", ["mask_f"], ["mask_sum"], keepdims=0),
             helper.make_node("Mul", ["table_logits", "mask_sum"], ["logits"])]
    inputs = [helper.make_tensor_value_info("input_ids", TensorProto.INT64, [1, "seq"]),
              helper.make_tensor_value_info("attention_mask", TensorProto.INT64, [1, "total"])]
    outputs = [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, "seq", vocab])]
    for layer in range(layers):
        for kind in ("key", "value"):
            inputs.append(helper.make_tensor_value_info(f"past_key_values.{layer}.{kind}", TensorProto.FLOAT,
                                                        [1, heads, "past", head_dim]))
            outputs.append(helper.make_tensor_value_info(f"present.{layer}.{kind}", TensorProto.FLOAT,
                                                         [1, heads, "total", head_dim]))
            nodes.append(helper.make_node("Concat", [f"past_key_values.{layer}.{kind}", "new"],
                                          [f"present.{layer}.{kind}"], axis=2))
    model = helper.make_model(helper.make_graph(nodes, "synthetic_kv", inputs, outputs, inits),
                              opset_imports=[helper.make_opsetid("", 18)])
    onnx.save(model, str(path))
    return path


def twenty_m_model(tmp: Path) -> tuple[Path, int, int]:
    """A random Llama of ~20M parameters (hidden 512, 4 layers), exported like every edgeft bundle."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from edgeft import quiet_libraries
    from edgeft.stages.export import export_onnx

    quiet_libraries()
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=8192, hidden_size=512, intermediate_size=1408, num_hidden_layers=4, num_attention_heads=8,
                         num_key_value_heads=8, max_position_embeddings=512, tie_word_embeddings=False)
    model = LlamaForCausalLM(config).eval()
    params = sum(p.numel() for p in model.parameters())
    path = tmp / "llama-20m.onnx"
    export_onnx(model, path, opset=18)
    return path, config.vocab_size, params


def onnx_vocab(path: Path) -> int:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    vocab = next(o for o in session.get_outputs() if o.name == "logits").shape[-1]
    if not isinstance(vocab, int):
        sys.exit(f"error: {path}: the logits' vocab dim is symbolic; give a bundle instead")
    return vocab


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bundle", type=Path, help="a bundle dir (edgeft build --out): its model")
    parser.add_argument("--model", type=Path, action="append", default=[], help="an edgeft KV-cache .onnx (repeatable)")
    parser.add_argument("--synthetic-layers", type=int, default=24, help="layers of the no-compute graph (0: none)")
    parser.add_argument("--skip-20m", action="store_true", help="no ~20M Llama (no torch export)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--reps", type=int, default=3, help="generations per variant and round (their median counts)")
    parser.add_argument("--prompt-tokens", type=int, default=32)
    parser.add_argument("--decode-tokens", type=int, default=64)
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()
    print(f"onnxruntime {ort.__version__}; load average {os.getloadavg()[0]:.2f} on {os.cpu_count()} cores "
          "(figures are only meaningful on an idle machine)")
    common = dict(prompt_tokens=args.prompt_tokens, decode_tokens=args.decode_tokens, threads=args.threads,
                  rounds=args.rounds, reps=args.reps)
    results = {}
    if args.bundle:
        manifest_path = args.bundle / "manifest.json"
        if not manifest_path.is_file():
            sys.exit(f"error: {args.bundle}: no manifest.json; build a bundle first: edgeft build -t rpi5 --out {args.bundle}")
        model = json.loads(manifest_path.read_text())["model"]
        results["bundle"] = compare(f"bundle model ({args.bundle / model['file']})", args.bundle / model["file"],
                                    model["vocab_size"], num_kv_heads=model.get("num_kv_heads"),
                                    head_dim=model.get("head_dim"), **common)
    for path in args.model:
        results[str(path)] = compare(str(path), path, onnx_vocab(path), **common)
    with tempfile.TemporaryDirectory(prefix="edgeft-bench-") as tmp:
        if args.synthetic_layers:
            path = synthetic_model(Path(tmp) / "synthetic.onnx", args.synthetic_layers)
            results["synthetic"] = compare(f"synthetic {args.synthetic_layers}-layer graph (I/O only)", path, 512, **common)
        if not args.skip_20m:
            path, vocab_size, params = twenty_m_model(Path(tmp))
            results["llama-20m"] = compare(f"random Llama {params / 1e6:.1f}M", path, vocab_size, **common)
    if args.json:
        args.json.write_text(json.dumps({"onnxruntime": ort.__version__, "results": results}, indent=1))


if __name__ == "__main__":
    main()
