"""Generation speed: decode tokens/s against llama.cpp and the memory-bandwidth bound, and time to
first token in `ask`.

    python -m benchmarks.generation [--quick] [--threads-lever] [--no-write] [--report-only]

Everything runs in one process, so each figure sits beside its reference measured minutes apart:

- Decode tokens/s at batch 1, 4, 8 and 16: bedside's base model (the embedded SmolLM2-135M-Instruct
  in fp32, through `model.generate` with the product's settings) against llama.cpp
  (llama-cpp-python, the optional `bench` extra) on the same GGUF file and the same prompt token
  ids, with the same number of threads. Decode rate = (N - 1) x batch / (time for N new tokens -
  time for 1 new token), so the prompt pass cancels out; end of sequence is suppressed so every row
  makes N tokens. Both engines decode greedily; bedside also applies its repetition penalty.
- The memory-bandwidth bound: a large tensor copy and a large sum measure bandwidth, and the bound
  is that bandwidth divided by the bytes of weights one decode step reads (fp32, bf16, and the Q4_1
  GGUF file llama.cpp reads).
- Levers at batch 1 and 8 (the linear kernel, a static KV cache, bf16, in full runs `torch.compile`,
  and with `--threads-lever` one thread against all cores), each checked for greedy tokens equal to
  the fp32 path with PyTorch's default kernel.
- Time to first token in `ask`: the whole answer path (router, retrieval, prompt, prefill, first
  streamed text) on distinct demo questions, with and without prompt prefix reuse, and a profile of
  where the time goes.

The figures replace the "generation" section of docs/benchmarks.md unless `--no-write` is given;
`--report-only` rewrites it from the figures the last run saved.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import logging
import math
import os
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from benchmarks.common import (
    REPO,
    git_revision,
    load_average,
    machine,
    median_time,
    record_figure,
    today,
    write_section,
)

logger = logging.getLogger(__name__)

RESULTS = REPO / ".cache" / "benchmarks" / "generation" / "results.json"
QUESTIONS = REPO / "corpora" / "questions" / "demo_questions.jsonl"
INDEX = REPO / "index"
SECTION = "generation"
# the targets: ratios to llama.cpp measured in the same run, and seconds
TARGET_BATCH1 = 0.6
TARGET_BATCH8 = 1.0
TARGET_TTFT_S = 1.5
# Full adds the torch.compile lever and a larger bandwidth tensor to quick. The 2-core machines
# this suite runs on differ in speed: llama.cpp decoded 114 to 211 tokens/s at batch 1 on them. On
# the slowest, a full run with 64 new tokens, 8 questions and a thread-count lever took 10.2 of
# `make bench`'s 30 minutes. So full decodes 32 tokens, as quick does, uses 5 questions, and times
# bf16 prefill on 2 prompts (5.3 minutes there). `--threads-lever` adds the one-thread lever.
QUICK = {"new_tokens": 32, "repeats": 3, "batch_sizes": [1, 4, 8, 16], "lever_batches": [1, 8],
         "ask_questions": 5, "ask_new_tokens": 16, "extra_levers": False, "thread_lever": False,
         "bf16_prefill_questions": 2, "bandwidth_mib": 256}
FULL = {**QUICK, "extra_levers": True, "bandwidth_mib": 512}
SYSTEM = "You are a clinical decision-support assistant. Answer briefly and factually."
# the time-to-first-token variants
TTFT_BEFORE = "before: default kernel, no prefix reuse"
TTFT_NOW = "bedside"
TTFT_FRESH = "bedside, no previous prompt (a fresh process)"
TTFT_TOP3 = "bedside, top_k 3, no previous prompt"


# inputs

def demo_questions(in_corpus: bool = True) -> list[str]:
    rows = [json.loads(line) for line in QUESTIONS.read_text(encoding="utf-8").splitlines() if line.strip()]
    return [row["question"] for row in rows if row["in_corpus"] == in_corpus]


def chat_prompts(tokenizer: Any, count: int) -> list[list[int]]:
    """Token ids of `count` short chat prompts (system + one demo question), the same for both engines."""
    questions = demo_questions()
    prompts = []
    for number in range(count):
        messages = [{"role": "system", "content": SYSTEM},
                    {"role": "user", "content": questions[number % len(questions)]}]
        ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        prompts.append(list(ids["input_ids"] if hasattr(ids, "keys") else ids))
    return prompts


# memory bandwidth and bytes per token

def measure_bandwidth(mib: int, repeats: int = 5) -> dict[str, float]:
    """GB/s of a tensor copy (bytes read + written) and of a sum (bytes read), best of `repeats`."""
    import torch

    source = torch.ones(mib * 2**20 // 4)
    target = torch.empty_like(source)
    nbytes = source.numel() * 4

    copy_s = median_time(lambda: target.copy_(source), repeats, summary=min)
    read_s = median_time(lambda: source.sum(), repeats, summary=min)
    return {"copy_gb_s": 2 * nbytes / copy_s / 1e9, "read_gb_s": nbytes / read_s / 1e9, "mib": mib}


def weight_bytes(model: Any, gguf_path: Path) -> dict[str, float]:
    """Bytes of weights one decode step reads: every parameter once (the tied embedding is the LM head)."""
    from gguf import GGUFReader

    params = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
    q4 = sum(int(t.n_bytes) for t in GGUFReader(str(gguf_path)).tensors)
    return {"parameters": params, "float32": params * 4, "bfloat16": params * 2, "gguf": q4}


# llama.cpp reference

class LlamaCppDecoder:
    """Greedy batched decoding with llama.cpp's C API: one sequence per prompt, all in one batch."""

    def __init__(self, gguf_path: Path, sequences: int, context_per_sequence: int, threads: int) -> None:
        import ctypes

        import llama_cpp

        self.api = llama_cpp
        self._quiet = llama_cpp.llama_log_callback(lambda level, text, data: None)
        llama_cpp.llama_log_set(self._quiet, ctypes.c_void_p())
        llama_cpp.llama_backend_init()
        model_params = llama_cpp.llama_model_default_params()
        model_params.n_gpu_layers = 0
        self.model = llama_cpp.llama_model_load_from_file(str(gguf_path).encode(), model_params)
        if not self.model:
            raise RuntimeError(f"llama.cpp could not load {gguf_path}")
        params = llama_cpp.llama_context_default_params()
        params.n_ctx = sequences * context_per_sequence
        params.n_batch = params.n_ctx
        params.n_ubatch = min(512, params.n_ctx)
        params.n_seq_max = sequences
        params.n_threads = threads
        params.n_threads_batch = threads
        self.context = llama_cpp.llama_init_from_model(self.model, params)
        if not self.context:
            raise RuntimeError("llama.cpp could not create a context")
        self.vocab_size = llama_cpp.llama_vocab_n_tokens(llama_cpp.llama_model_get_vocab(self.model))
        self.batch = llama_cpp.llama_batch_init(params.n_ctx, 0, 1)

    def close(self) -> None:
        self.api.llama_batch_free(self.batch)
        self.api.llama_free(self.context)
        self.api.llama_model_free(self.model)

    def _decode(self, items: list[tuple[int, int, int, bool]]) -> None:
        batch = self.batch
        for index, (token, position, sequence, wants_logits) in enumerate(items):
            batch.token[index] = token
            batch.pos[index] = position
            batch.n_seq_id[index] = 1
            batch.seq_id[index][0] = sequence
            batch.logits[index] = wants_logits
        batch.n_tokens = len(items)
        status = self.api.llama_decode(self.context, batch)
        if status != 0:
            raise RuntimeError(f"llama_decode returned {status}")

    def generate(self, prompts: list[list[int]], new_tokens: int) -> list[list[int]]:
        import numpy as np

        self.api.llama_memory_clear(self.api.llama_get_memory(self.context), True)
        items, last = [], []
        for sequence, ids in enumerate(prompts):
            items += [(token, position, sequence, position == len(ids) - 1)
                      for position, token in enumerate(ids)]
            last.append(len(items) - 1)
        self._decode(items)
        outputs: list[list[int]] = [[] for _ in prompts]
        positions = [len(ids) for ids in prompts]
        rows = last  # llama_get_logits_ith takes a token's index in the last batch
        for step in range(new_tokens):
            for sequence in range(len(prompts)):
                logits = np.ctypeslib.as_array(self.api.llama_get_logits_ith(self.context, rows[sequence]),
                                               shape=(self.vocab_size,))
                outputs[sequence].append(int(logits.argmax()))
            if step == new_tokens - 1:
                break
            self._decode([(outputs[s][-1], positions[s], s, True) for s in range(len(prompts))])
            rows = list(range(len(prompts)))
            positions = [p + 1 for p in positions]
        return outputs


def llama_cpp_version() -> str | None:
    try:
        import llama_cpp
    except ImportError:
        return None
    return llama_cpp.__version__


# decode timing

def timed_pair(run: Callable[[int], Any], new_tokens: int, batch: int) -> tuple[float, Any]:
    """Decode tokens/s from one run of 1 and one of N new tokens; also returns the N-token output."""
    start = time.perf_counter()
    run(1)
    one = time.perf_counter() - start
    start = time.perf_counter()
    output = run(new_tokens)
    many = time.perf_counter() - start
    # a burst of load during the 1-token run can make it the slower one; such a round says nothing
    rate = (new_tokens - 1) * batch / (many - one) if many > one else float("nan")
    return rate, output


def finite_median(values: list[float]) -> float:
    finite = [value for value in values if math.isfinite(value)]
    return statistics.median(finite) if finite else float("nan")


def interleaved_rates(runs: dict[str, tuple[Any, Callable[[int], Any]]], new_tokens: int, batch: int,
                      repeats: int) -> dict[str, tuple[list[float], Any]]:
    """Time every run once per round, `repeats` rounds, so load from other processes hits them alike.

    `runs` maps a name to (context manager factory, runner). Returns each name's rates and its last
    N-token output. A warm-up call per run comes first, because first calls allocate.
    """
    results: dict[str, tuple[list[float], Any]] = {name: ([], None) for name in runs}
    for context, runner in runs.values():
        with context():
            runner(2)
    for _ in range(repeats):
        for name, (context, runner) in runs.items():
            with context():
                rate, output = timed_pair(runner, new_tokens, batch)
            results[name] = (results[name][0] + [rate], output)
    return results


def hf_runner(generator: Any, model: Any, prompts: list[list[int]], **extra: Any) -> Callable[[int], Any]:
    """Decode `prompts` (left-padded) with `model.generate` and the product's settings, N tokens per row."""
    import torch

    from assistant.answer.generation import GenerationSettings

    tokenizer = generator.tokenizer
    width = max(len(p) for p in prompts)
    pad = tokenizer.pad_token_id
    input_ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts])
    attention = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    base = GenerationSettings().generate_kwargs(tokenizer)

    def run(new_tokens: int) -> Any:
        kwargs = {**base, "max_new_tokens": new_tokens, "min_new_tokens": new_tokens, **extra}
        with torch.inference_mode():
            output = model.generate(input_ids=input_ids, attention_mask=attention, **kwargs)
        return output[:, width:].tolist()

    return run


@contextlib.contextmanager
def linear_kernel(model: Any, onednn: bool) -> Iterator[None]:
    """Run with the fp32 linear layers on oneDNN or on PyTorch's default kernel, then restore."""
    from assistant import cpu_linear

    before = cpu_linear.uses_onednn(model)
    cpu_linear.use_onednn(model, onednn)
    try:
        yield
    finally:
        cpu_linear.use_onednn(model, before)


@contextlib.contextmanager
def torch_threads(count: int) -> Iterator[None]:
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)


# where a decode step's time goes

PROFILE_BUCKETS = (
    ("linear layers", ("linear", "aten::mm", "aten::addmm", "aten::matmul")),
    ("attention", ("scaled_dot_product", "flash_attention", "aten::bmm", "aten::_softmax")),
    ("KV cache append", ("aten::cat",)),
)


def profile_decode(generator: Any, model: Any, prompts: list[list[int]],
                   new_tokens: int = 16) -> dict[str, float]:
    """Split a short generation's wall time into operator groups with the PyTorch profiler.

    Each operator's self time counts once; the time outside any operator is Python and the
    generation loop. The prompts are short, so the decode steps dominate. The profiler adds a few
    microseconds per operator, so the shares of small operators are estimates.
    """
    from torch.profiler import ProfilerActivity, profile

    runner = hf_runner(generator, model, prompts)
    runner(2)
    with profile(activities=[ProfilerActivity.CPU]) as profiler:
        start = time.perf_counter()
        runner(new_tokens)
        wall = time.perf_counter() - start
    groups = {name: 0.0 for name, _ in PROFILE_BUCKETS}
    groups["other operators"] = 0.0
    for event in profiler.key_averages():
        seconds = event.self_cpu_time_total / 1e6
        group = next((name for name, keys in PROFILE_BUCKETS if any(key in event.key for key in keys)),
                     "other operators")
        groups[group] += seconds
    groups["outside operators (Python, generate loop)"] = max(wall - sum(groups.values()), 0.0)
    shares = {name: seconds / wall for name, seconds in groups.items()}
    return {"ms_per_token_step": wall / new_tokens * 1e3, **shares}


# time to first token

def ask_series(assistant: Any, questions: list[str], top_k: int | None = None) -> list[dict[str, Any]]:
    """Ask each question once through the streaming answer path; record its timings and output."""
    rows = []
    for question in questions:
        answer = assistant.ask(question, user="benchmark", top_k=top_k)
        rows.append({
            "question": question,
            "ttft_s": answer.timings.get("time_to_first_token_s"),
            "retrieval_s": answer.timings.get("retrieval_s"),
            "prompt_tokens": answer.generation.get("prompt_tokens"),
            "reused_tokens": assistant.generator.last_reused_tokens,
            "output": answer.generation.get("raw_output", answer.answer),
            "adapter": answer.adapter.get("name"),
        })
    return rows


def profile_ask(assistant: Any, questions: list[str]) -> dict[str, float]:
    """Median milliseconds of each step before the first token, run step by step outside `ask`."""
    import torch

    from assistant.answer.prompt import context_limit, fit_prompt

    generator = assistant.generator
    names = ("router (question embedding)", "retrieval", "prompt building", "tokenization",
             "prefill, full prompt")
    steps: dict[str, list[float]] = {name: [] for name in names}
    for question in questions:
        start = time.perf_counter()
        choice = assistant.router.choose(question, None) if assistant.router else None
        steps["router (question embedding)"].append(time.perf_counter() - start)
        start = time.perf_counter()
        hits = assistant.retriever.search(question, top_k=assistant.settings.top_k)
        steps["retrieval"].append(time.perf_counter() - start)
        start = time.perf_counter()
        limit = context_limit(generator.model, generator.tokenizer)
        prompt = fit_prompt(question, hits, generator.tokenizer, limit, assistant.generation.max_new_tokens)
        steps["prompt building"].append(time.perf_counter() - start)
        start = time.perf_counter()
        inputs = generator.encode([prompt.messages])
        steps["tokenization"].append(time.perf_counter() - start)
        adapter = getattr(choice, "name", None)
        with generator.adapters_active(), torch.inference_mode():
            start = time.perf_counter()
            generator.model(**inputs, **generator.adapter_kwargs([adapter]), logits_to_keep=1)
            steps["prefill, full prompt"].append(time.perf_counter() - start)
    return {name: statistics.median(values) * 1e3 for name, values in steps.items()}


def median_of(rows: list[dict[str, Any]], key: str) -> float:
    values = [row[key] for row in rows if row.get(key) is not None]
    return statistics.median(values) if values else float("nan")


def ensure_index() -> None:
    if (INDEX / "CURRENT").is_file():
        return
    from assistant.cli import main as cli_main

    logger.info("building the demo index in %s for the time-to-first-token runs", INDEX)
    status = cli_main(["index", "rebuild", "--index", str(INDEX), "--corpus", str(REPO / "corpora" / "demo"),
                       "--no-progress"])
    if status != 0:
        raise RuntimeError(f"`bedside index rebuild` exited with {status}; build the index with `make index`")


# the measurement

def measure(preset: dict[str, Any]) -> dict[str, Any]:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import torch

    from assistant import cpu_linear, models
    from assistant.answer.generation import LocalGenerator

    figures: dict[str, Any] = {"date": today(), "machine": machine(), "revision": git_revision(),
                               "load_average_start": load_average(), "threads": torch.get_num_threads(),
                               "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
                               "preset": preset, "llama_cpp": llama_cpp_version()}
    started = time.perf_counter()

    # the bare base model, fp32 as `--dtype float32` and the tests load it; adapters come later
    spec = models.resolve_model("")
    model, tokenizer = models.load_base_model(spec, "float32", "cpu")
    generator = LocalGenerator(model, tokenizer, spec.display_name, models.model_fingerprint(spec))
    gguf_path = Path(spec.path) / spec.gguf_file
    figures["kernel"] = "oneDNN" if cpu_linear.uses_onednn(model) else "default"
    figures["auto_dtype"] = str(models.choose_dtype("auto", "cpu")).removeprefix("torch.")

    bandwidth = measure_bandwidth(preset["bandwidth_mib"])
    sizes = weight_bytes(model, gguf_path)
    best_gb_s = max(bandwidth["copy_gb_s"], bandwidth["read_gb_s"])
    figures["bandwidth"], figures["weight_bytes"] = bandwidth, sizes
    figures["bound"] = {name: best_gb_s * 1e9 / sizes[name] for name in ("float32", "bfloat16", "gguf")}
    logger.info("bandwidth %s; bound %s", bandwidth, figures["bound"])

    prompts = chat_prompts(tokenizer, max(preset["batch_sizes"]))
    bf16_model = copy.deepcopy(model).to(torch.bfloat16)
    figures["decode"] = measure_decode(generator, model, prompts, gguf_path, preset)
    figures["levers"] = measure_levers(generator, model, bf16_model, prompts, preset)
    figures["decode_profile"] = {str(batch): profile_decode(generator, model, prompts[:batch])
                                 for batch in preset["lever_batches"]}
    figures.update(measure_ttft(model, bf16_model, preset))
    figures["load_average_end"] = load_average()
    figures["seconds"] = round(time.perf_counter() - started, 1)
    return figures


def measure_decode(generator: Any, model: Any, prompts: list[list[int]], gguf_path: Path,
                   preset: dict[str, Any]) -> dict[str, dict[str, float]]:
    """Decode tokens/s of bedside and llama.cpp at each batch size, on the same prompt ids, interleaved."""
    import torch

    new_tokens, repeats = preset["new_tokens"], preset["repeats"]
    has_reference = llama_cpp_version() is not None
    decode = {}
    for batch in preset["batch_sizes"]:
        rows = prompts[:batch]
        runs: dict[str, tuple[Any, Callable[[int], Any]]] = {
            "bedside": (contextlib.nullcontext, hf_runner(generator, model, rows))}
        reference = None
        if has_reference:
            context = max(len(p) for p in rows) + new_tokens + 8
            reference = LlamaCppDecoder(gguf_path, batch, context, torch.get_num_threads())
            runs["llama_cpp"] = (contextlib.nullcontext, lambda n, r=reference, p=rows: r.generate(p, n))
        try:
            results = interleaved_rates(runs, new_tokens, batch, repeats)
        finally:
            if reference is not None:
                reference.close()
        row = {name: finite_median(rates) for name, (rates, _) in results.items()}
        if has_reference:
            # the ratio of each round, so a slow round slows both engines' figures alike
            row["ratio_per_round_median"] = finite_median(
                [b / r for b, r in zip(results["bedside"][0], results["llama_cpp"][0], strict=True)])
        decode[str(batch)] = row
        logger.info("decode, batch %d: %s", batch, row)
    return decode


def measure_levers(generator: Any, model: Any, bf16_model: Any, prompts: list[list[int]],
                   preset: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Decode tokens/s of each lever; "identical" = the same greedy tokens as fp32 on the default kernel."""
    import torch

    from assistant import cpu_linear

    new_tokens, repeats = preset["new_tokens"], preset["repeats"]
    threads = torch.get_num_threads()
    other_threads = 1 if threads > 1 else (os.cpu_count() or 1)
    levers: dict[str, dict[str, Any]] = {}
    for batch in preset["lever_batches"]:
        rows = prompts[:batch]
        plain = hf_runner(generator, model, rows)
        # The first run is the baseline and the reference for equal tokens: fp32 on PyTorch's default
        # kernel. Each other run changes one thing from it.
        runs: dict[str, tuple[Any, Callable[[int], Any]]] = {
            "fp32, default kernel": (lambda: linear_kernel(model, False), plain)}
        if cpu_linear.onednn_available():
            runs["fp32, oneDNN kernel"] = (lambda: linear_kernel(model, True), plain)
        runs["fp32, static KV cache"] = (lambda: linear_kernel(model, False),
                                         hf_runner(generator, model, rows, cache_implementation="static"))
        runs["bf16"] = (contextlib.nullcontext, hf_runner(generator, bf16_model, rows))
        if preset.get("thread_lever", preset["extra_levers"]) and other_threads != threads:
            label = f"fp32, {other_threads} thread{'s' if other_threads > 1 else ''}"
            runs[label] = (lambda: _both(linear_kernel(model, False), torch_threads(other_threads)), plain)
        results = interleaved_rates(runs, new_tokens, batch, repeats)
        reference = results["fp32, default kernel"][1]
        for name, (rates, tokens) in results.items():
            rate = finite_median(rates)
            levers.setdefault(name, {})[str(batch)] = {"rate": rate, "rates": rates,
                                                       "identical": tokens == reference}
            logger.info("lever %s, batch %d: %.1f tokens/s, equal %s", name, batch, rate, tokens == reference)
    if preset["extra_levers"]:
        with linear_kernel(model, False):
            levers.update(compile_lever(generator, model, prompts[:1], new_tokens, repeats))
    return levers


@contextlib.contextmanager
def _both(first: Any, second: Any) -> Iterator[None]:
    with first, second:
        yield


def measure_ttft(model: Any, bf16_model: Any, preset: dict[str, Any]) -> dict[str, Any]:
    """Time to first token through the whole `ask` path, by variant, and where that time goes."""
    from assistant import cpu_linear
    from assistant.answer.pipeline import build_assistant
    from assistant.config import load_settings

    ensure_index()
    settings = load_settings(overrides={"dtype": "float32", "device": "cpu", "index_dir": str(INDEX),
                                        "max_new_tokens": preset["ask_new_tokens"]})
    # the same base model object: load_base_model returns the cached one, and the router loads adapters
    assistant = build_assistant(settings, with_audit=False)
    generator = assistant.generator
    product_onednn = cpu_linear.uses_onednn(model)
    questions = demo_questions()
    warmup, series = questions[-1], questions[:preset["ask_questions"]]
    # name: (oneDNN kernel, prompt prefix reuse, top_k); the first is the reference for equal answers
    variants = {TTFT_BEFORE: (False, False, None), TTFT_NOW: (product_onednn, True, None),
                TTFT_FRESH: (product_onednn, False, None), TTFT_TOP3: (product_onednn, False, 3)}
    rows: dict[str, list[dict[str, Any]]] = {name: [] for name in variants}
    generator._prompt_caches.clear()
    # each question runs under every variant in turn, so load from other processes hits them alike
    for index, question in enumerate([warmup, *series]):
        for name, (onednn, reuse, top_k) in variants.items():
            generator.reuse_prompt_prefix = reuse
            with linear_kernel(model, onednn):
                row = ask_series(assistant, [question], top_k)[0]
            if index > 0:
                rows[name].append(row)
    ttft: dict[str, Any] = {}
    for name, measured in rows.items():
        ttft[name] = {"ttft_s": median_of(measured, "ttft_s"),
                      "prompt_tokens": median_of(measured, "prompt_tokens"),
                      "reused_tokens": median_of(measured, "reused_tokens"), "rows": measured}
        logger.info("time to first token, %s: %.2f s", name, ttft[name]["ttft_s"])
    generator.reuse_prompt_prefix = True
    reference = [row["output"] for row in ttft[TTFT_BEFORE]["rows"]]
    for name, entry in ttft.items():
        entry["identical"] = None if name == TTFT_TOP3 else sum(
            row["output"] == ref for row, ref in zip(entry["rows"], reference, strict=True))
    return {"ttft": ttft, "ask_questions": len(series), "profile_ms": profile_ask(assistant, series),
            "prefill_bf16_ms": prefill_bf16(assistant, model, bf16_model, series[:preset["bf16_prefill_questions"]]),
            "prefill_bf16_questions": min(len(series), preset["bf16_prefill_questions"])}


def compile_lever(generator: Any, model: Any, prompts: list[list[int]], new_tokens: int,
                  repeats: int) -> dict[str, dict[str, Any]]:
    """`torch.compile` of the decode step with a static cache, at batch 1; compile time is reported."""
    from transformers import CompileConfig

    config = CompileConfig(fullgraph=False, dynamic=False)
    # transformers compiles on accelerators only unless told otherwise
    config._compile_all_devices = True
    plain = hf_runner(generator, model, prompts)
    compiled = hf_runner(generator, model, prompts, cache_implementation="static", compile_config=config)
    start = time.perf_counter()
    try:
        # a static cache's length is prompt + new tokens, so each of the two lengths compiles once
        compiled(1)
        first = compiled(new_tokens)
    except Exception as err:  # a failing compiler is a result to report, not a reason to stop
        logger.warning("torch.compile failed: %s", err)
        return {"fp32, torch.compile + static cache": {"1": {"rate": float("nan"), "identical": None,
                                                             "error": str(err)[:200]}}}
    compile_s = time.perf_counter() - start
    rates: dict[str, list[float]] = {"plain": [], "compiled": []}
    outputs: dict[str, Any] = {}
    for _ in range(repeats):
        for name, runner in (("plain", plain), ("compiled", compiled)):
            rate, outputs[name] = timed_pair(runner, new_tokens, len(prompts))
            rates[name].append(rate)
    speedup = finite_median([c / p for c, p in zip(rates["compiled"], rates["plain"], strict=True)])
    equal = outputs["compiled"] == outputs["plain"] and first == outputs["plain"]
    return {"fp32, torch.compile + static cache": {"1": {
        "rate": finite_median(rates["compiled"]), "identical": equal, "compile_s": compile_s,
        "speedup": speedup}}}


def prefill_bf16(assistant: Any, model: Any, bf16_model: Any, questions: list[str]) -> dict[str, float]:
    """Median prefill ms of the `ask` prompts in fp32 (product kernel) and in bf16, base route."""
    import torch

    from assistant.answer.prompt import context_limit, fit_prompt

    generator = assistant.generator
    timings: dict[str, list[float]] = {"float32": [], "bfloat16": []}
    limit = context_limit(generator.model, generator.tokenizer)
    for question in questions:
        hits = assistant.retriever.search(question, top_k=assistant.settings.top_k)
        prompt = fit_prompt(question, hits, generator.tokenizer, limit, assistant.generation.max_new_tokens)
        inputs = generator.encode([prompt.messages])
        for name, candidate in (("float32", model), ("bfloat16", bf16_model)):
            with torch.inference_mode():
                start = time.perf_counter()
                candidate(**inputs, logits_to_keep=1)
                timings[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) * 1e3 for name, values in timings.items()}


# the report

def _fmt(value: float | None, digits: int = 1) -> str:
    if value is None or value != value:  # NaN
        return "—"
    return f"{value:,.{digits}f}"


def _ratio(value: float | None, reference: float | None) -> float | None:
    if value is None or not reference or value != value or reference != reference:
        return None
    return value / reference


def report(figures: dict[str, Any]) -> str:
    decode, bound, sizes = figures["decode"], figures["bound"], figures["weight_bytes"]
    bandwidth, levers, ttft = figures["bandwidth"], figures["levers"], figures["ttft"]
    preset = figures["preset"]
    if figures.get("llama_cpp"):
        reference = (f"llama-cpp-python {figures['llama_cpp']} on the same GGUF file (Q4_1), same thread "
                     "count, greedy argmax over its logits.")
    else:
        reference = ("llama-cpp-python is not installed (`pip install -e '.[bench]'`), so the llama.cpp "
                     "columns are empty.")
    lines = [
        "## Generation speed",
        "",
        f"`{figures['command']}` on {figures['date']}, revision {figures['revision']}. Machine: "
        f"{figures['machine']}; {figures['threads']} torch thread(s){_omp_note(figures)}; load average "
        f"{figures['load_average_start']} at the start and {figures['load_average_end']} at the end; "
        f"{figures['seconds'] / 60:.1f} min. Reference: {reference}",
        "",
        f"bedside decodes with the embedded SmolLM2-135M-Instruct in fp32 through `model.generate` with "
        f"the product's settings (greedy, repetition penalty 1.1), on the {figures['kernel']} linear kernel "
        f"that the load-time probe chose; `--dtype auto` picks {figures['auto_dtype']} on this machine. "
        f"Decode rate = (N - 1) × batch ÷ (time for N = {preset['new_tokens']} new tokens - time for 1), "
        f"median of {preset['repeats']} pairs, end of sequence suppressed. Prompts: a short system message "
        f"and one demo question per row, as token ids from bedside's chat template, fed to both engines.",
        "",
        "### Decode tokens/s by batch size",
        "",
        "| batch | bedside fp32 | llama.cpp Q4_1 | bedside ÷ llama.cpp | target |",
        "|---|---|---|---|---|",
    ]
    targets = {"1": f"≥ {TARGET_BATCH1:g}×", "8": f"≥ {TARGET_BATCH8:g}×"}
    for batch, row in decode.items():
        ratio = _ratio(row["bedside"], row.get("llama_cpp"))
        lines.append(f"| {batch} | {_fmt(row['bedside'])} | {_fmt(row.get('llama_cpp'))} | "
                     f"{_fmt(ratio, 2) + '×' if ratio else '—'} | {targets.get(batch, '—')} |")
    one = decode.get("1", {})
    lines += [
        "",
        "### Memory-bandwidth bound at batch 1",
        "",
        f"Bandwidth: {_fmt(bandwidth['copy_gb_s'])} GB/s copying {bandwidth['mib']} MiB (bytes read + "
        f"written) and {_fmt(bandwidth['read_gb_s'])} GB/s summing it (bytes read); the bound uses the "
        f"higher. One decode step reads every weight once: {sizes['parameters'] / 1e6:.1f} M parameters, "
        f"the LM head being the tied embedding matrix.",
        "",
        "| weights | bytes per token | bound, tokens/s | measured at batch 1 | share of the bound |",
        "|---|---|---|---|---|",
    ]
    bf16_rate = levers.get("bf16", {}).get("1", {}).get("rate")
    for name, label, measured in (("float32", "fp32 (bedside)", one.get("bedside")),
                                  ("bfloat16", "bf16", bf16_rate),
                                  ("gguf", "Q4_1 GGUF (llama.cpp)", one.get("llama_cpp"))):
        share = _ratio(measured, bound[name])
        lines.append(f"| {label} | {sizes[name] / 1e6:,.0f} MB | {_fmt(bound[name])} | {_fmt(measured)} | "
                     f"{_fmt(share * 100, 0) + '%' if share else '—'} |")
    lines += [
        "",
        "### Levers: decode tokens/s, and whether the greedy tokens equal fp32 on the default kernel",
        "",
        "Median [lowest–highest] of the rounds; each round runs every lever once, so a burst of load "
        "from other processes hits them alike.",
        "",
        "| lever | " + " | ".join(f"batch {b}" for b in preset["lever_batches"]) + " |",
        "|---|" + "---|" * len(preset["lever_batches"]),
    ]
    for name, by_batch in levers.items():
        cells = []
        for batch in preset["lever_batches"]:
            entry = by_batch.get(str(batch))
            if not entry:
                cells.append("—")
                continue
            same = {True: "equal", False: "differ", None: "—"}[entry.get("identical")]
            extra = f", compiled in {entry['compile_s']:.0f} s" if entry.get("compile_s") else ""
            extra += f", failed: {entry['error']}" if entry.get("error") else ""
            finite = [rate for rate in entry.get("rates", []) if math.isfinite(rate)]
            spread = f" [{_fmt(min(finite))}–{_fmt(max(finite))}]" if len(finite) > 1 else ""
            cells.append(f"{_fmt(entry['rate'])}{spread} ({same}{extra})")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    if not preset["extra_levers"]:
        lines += ["", "Quick runs leave out the `torch.compile` lever; the full run "
                      "(`python -m benchmarks.generation`) measures it."]
    if not preset.get("thread_lever", preset["extra_levers"]):
        lines += ["", "This run left out the one-thread lever; `python -m benchmarks.generation --threads-lever` "
                      "measures it."]
    profiles = figures.get("decode_profile", {})
    if profiles:
        groups = [name for name in next(iter(profiles.values())) if name != "ms_per_token_step"]
        lines += ["", f"Where a decode step's time goes (PyTorch profiler, 16 new tokens after a short "
                      f"prompt, fp32 on the {figures['kernel']} kernel; shares of wall time):", "",
                  "| batch | ms per step | " + " | ".join(groups) + " |",
                  "|---|---|" + "---|" * len(groups)]
        for batch, profile in profiles.items():
            lines.append(f"| {batch} | {_fmt(profile['ms_per_token_step'])} | "
                         + " | ".join(f"{profile[name] * 100:.0f}%" for name in groups) + " |")
    lines += [
        "",
        "### Time to first token in `ask`",
        "",
        f"The answer path as `bedside ask` runs it: router over the demo adapters, hybrid retrieval over "
        f"the demo index, a prompt of top_k = 5 chunks of 200 tokens, prefill, first streamed text. "
        f"{figures['ask_questions']} distinct in-corpus demo questions after one warm-up question, "
        f"median; each question runs under every variant in turn, and model and index loading are not "
        f"included. Reused tokens: the prompt start whose keys "
        f"and values came from the previous prompt on the same route (adapter). Equal answers: "
        f"{preset['ask_new_tokens']}-token answers equal to the first row's.",
        "",
        "| variant | time to first token | prompt tokens | reused tokens | equal answers | target |",
        "|---|---|---|---|---|---|",
    ]
    for name, entry in ttft.items():
        same = "—" if entry.get("identical") is None else f"{entry['identical']} of {len(entry['rows'])}"
        lines.append(f"| {name} | {_fmt(entry['ttft_s'], 2)} s | {_fmt(entry['prompt_tokens'], 0)} | "
                     f"{_fmt(entry['reused_tokens'], 0)} | {same} | ≤ {TARGET_TTFT_S:g} s |")
    profile = figures["profile_ms"]
    total = sum(profile.values())
    lines += ["", "Where the time goes before the first token (each step run alone on the same questions, "
                  "median ms):", "", "| step | ms | share |", "|---|---|---|"]
    for name, ms in profile.items():
        lines.append(f"| {name} | {_fmt(ms, 0)} | {ms / total * 100:.0f}% |")
    prefill = figures.get("prefill_bf16_ms", {})
    if prefill:
        count = figures.get("prefill_bf16_questions", figures["ask_questions"])
        lines += ["", f"The prefills of the first {count} questions took {_fmt(prefill['bfloat16'], 0)} ms in bf16 "
                      f"against {_fmt(prefill['float32'], 0)} ms in fp32 on the {figures['kernel']} kernel (median)."]
    lines += ["", "### Targets: what is met, what is not, and why", "", *findings(figures)]
    return "\n".join(lines)


def _omp_note(figures: dict[str, Any]) -> str:
    value = figures.get("omp_num_threads")
    return f" (OMP_NUM_THREADS={value})" if value else ""


def _miss(value: float, target: float, higher_is_better: bool) -> str:
    """'meets the target' or how far off it is, in the target's terms."""
    if (value >= target) if higher_is_better else (value <= target):
        return "meets the target"
    if higher_is_better:
        return f"misses the {target:g}× target (reaches {value / target * 100:.0f}% of it)"
    return f"misses the {target:g} s target by {value - target:.2f} s ({value / target:.1f}× the target)"


def _gains(lever: dict[str, Any], base: dict[str, Any]) -> str:
    return ", ".join(f"batch {b} {lever[b]['rate'] / base[b]['rate']:.2f}×" for b in lever
                     if b in base and lever[b]["rate"] == lever[b]["rate"])


def findings(figures: dict[str, Any]) -> list[str]:
    """Sentences on each target and lever, computed from this run's figures."""
    decode, bound, sizes = figures["decode"], figures["bound"], figures["weight_bytes"]
    levers, ttft = figures["levers"], figures["ttft"]
    out = []
    one, eight = decode.get("1", {}), decode.get("8", {})
    ratio1 = _ratio(one.get("bedside"), one.get("llama_cpp"))
    if ratio1 is not None:
        needed = TARGET_BATCH1 * one["llama_cpp"]
        text = (f"- **Batch 1: {ratio1:.2f}× llama.cpp, {_miss(ratio1, TARGET_BATCH1, True)}.** One row "
                f"reads every weight once per token: {sizes['float32'] / 1e6:,.0f} MB in fp32 against "
                f"{sizes['gguf'] / 1e6:,.0f} MB of Q4_1 ({sizes['float32'] / sizes['gguf']:.1f}× more). ")
        if bound["float32"] < needed:
            text += (f"{TARGET_BATCH1:g}× llama.cpp is {needed:.0f} tokens/s, above the fp32 bandwidth "
                     f"bound of {bound['float32']:.0f} tokens/s, so no change that keeps fp32 weights "
                     f"(and so the fp32 outputs) can meet it. ")
        else:
            text += (f"{TARGET_BATCH1:g}× llama.cpp is {needed:.0f} tokens/s, under the fp32 bandwidth bound "
                     f"of {bound['float32']:.0f} tokens/s, so it is not ruled out by bytes alone. ")
        text += (f"bedside reaches {one['bedside'] / bound['float32'] * 100:.0f}% of its fp32 bound and "
                 f"llama.cpp {one['llama_cpp'] / bound['gguf'] * 100:.0f}% of its Q4_1 bound. bf16 halves "
                 f"the bytes and 8-bit or 4-bit weights would cut them further, but each changes the "
                 f"greedy outputs.")
        out.append(text)
    ratio8 = _ratio(eight.get("bedside"), eight.get("llama_cpp"))
    if ratio8 is not None:
        out.append(
            f"- **Batch 8: {ratio8:.2f}× llama.cpp, {_miss(ratio8, TARGET_BATCH8, True)}.** The weights "
            f"are read once for 8 rows, so the step moves towards compute: from batch 1 to batch 8, "
            f"llama.cpp's rate grows {eight['llama_cpp'] / one['llama_cpp']:.1f}× and bedside's "
            f"{eight['bedside'] / one['bedside']:.1f}×.")
    base = levers.get("fp32, default kernel", {})
    onednn = levers.get("fp32, oneDNN kernel", {})
    if onednn and base:
        equal = all(entry["identical"] for entry in onednn.values())
        out.append(f"- **Kept: oneDNN for fp32 linear layers**, where the load-time probe finds it faster "
                   f"(here it chose the {figures['kernel']} kernel). Against PyTorch's default kernel: "
                   f"{_gains(onednn, base)}; greedy tokens {'equal' if equal else 'NOT equal'}.")
    static = levers.get("fp32, static KV cache", {})
    if static and base:
        out.append(f"- **Not kept: transformers' static KV cache** ({_gains(static, base)} of the default "
                   f"kernel's rate). Without compiling, it attends over the whole preallocated length every "
                   f"step, and batched drafting, where long prompts make appending to the cache costly, "
                   f"already writes its cache into a preallocated buffer (assistant/answer/prefix_cache.py).")
    compiled = levers.get("fp32, torch.compile + static cache", {}).get("1")
    if compiled and compiled.get("compile_s") and base.get("1"):
        out.append(f"- **Not kept: `torch.compile`** with a static cache: "
                   f"{compiled['speedup']:.2f}× the default kernel's rate at batch 1 after "
                   f"{compiled['compile_s']:.0f} s of compiling, which every `bedside ask` process would pay "
                   f"again.")
    for name, entry in levers.items():
        if name.endswith(("thread", "threads")) and base:
            out.append(f"- **Threads:** {name.split(', ')[1]} instead of {figures['threads']}: "
                       f"{_gains(entry, base)} of the default. On a shared, loaded machine one thread is "
                       f"often faster, because each parallel step waits for a descheduled thread; set "
                       f"OMP_NUM_THREADS=1 there.")
    bf16 = levers.get("bf16", {})
    if bf16 and base:
        equal = all(entry["identical"] for entry in bf16.values())
        out.append(f"- **Not the default: bf16** ({_gains(bf16, base)} of fp32 on the default kernel); "
                   f"greedy tokens {'equal here' if equal else 'differ'}, and batched bf16 rows can differ "
                   f"from the same rows alone (see Discharge drafting), so `--dtype float32` stays the "
                   f"reference and bf16 stays a choice.")
    now, fresh, before = ttft.get(TTFT_NOW), ttft.get(TTFT_FRESH), ttft.get(TTFT_BEFORE)
    if now and fresh and before:
        profile = figures["profile_ms"]
        share = profile["prefill, full prompt"] / sum(profile.values()) * 100
        top3 = ttft.get(TTFT_TOP3, {}).get("ttft_s", float("nan"))
        out.append(
            f"- **Time to first token: {now['ttft_s']:.2f} s in a running process, "
            f"{_miss(now['ttft_s'], TARGET_TTFT_S, False)}; {fresh['ttft_s']:.2f} s with no previous "
            f"prompt to reuse, as in a one-question `bedside ask` process; {before['ttft_s']:.2f} s "
            f"before this work.** Prefilling the {now['prompt_tokens']:.0f}-token prompt is {share:.0f}% "
            f"of the time before the first token; router, retrieval and prompt building take tens of "
            f"milliseconds. Reuse skips the {now['reused_tokens']:.0f} tokens (median) a prompt shares "
            f"with the previous one on its route, mostly the system prompt. The five 200-token chunks are "
            f"most of the prompt: top_k 3 gives {top3:.2f} s with no previous prompt, but two fewer "
            f"sources per answer, a retrieval-quality trade that this page does not make, so the default "
            f"stays 5.")
    return out


# entry points

def _save_and_write(figures: dict[str, Any], write: bool) -> None:
    from assistant.fileio import atomic_write_json

    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(RESULTS, figures)
    markdown = report(figures)
    if write:
        write_section(SECTION, markdown)
        print("wrote the generation section of docs/benchmarks.md")
    else:
        print(markdown)


def _record(figures: dict[str, Any]) -> None:
    decode, bound, ttft = figures["decode"], figures["bound"], figures["ttft"]
    reference_name = "llama.cpp, same GGUF"
    for batch, target in (("1", TARGET_BATCH1), ("8", TARGET_BATCH8)):
        row = decode.get(batch)
        if row:
            record_figure(SECTION, f"decode tokens/s, batch {batch}", row["bedside"], "tokens/s",
                          reference=row.get("llama_cpp"), reference_name=reference_name,
                          target=f"ratio >= {target:g}", note=f"fp32, {figures['kernel']} kernel")
    if "1" in decode:
        record_figure(SECTION, "decode tokens/s, batch 1, against the fp32 bandwidth bound",
                      decode["1"]["bedside"], "tokens/s", reference=bound["float32"],
                      reference_name="bandwidth ÷ fp32 weight bytes")
    record_figure(SECTION, "time to first token, ask", ttft[TTFT_NOW]["ttft_s"], "s",
                  target=f"value <= {TARGET_TTFT_S:g}", note="running process, prefix reuse")
    record_figure(SECTION, "time to first token, ask, first question of a process",
                  ttft[TTFT_FRESH]["ttft_s"], "s", target=f"value <= {TARGET_TTFT_S:g}",
                  reference=ttft[TTFT_BEFORE]["ttft_s"], reference_name=TTFT_BEFORE)


def run(quick: bool) -> None:
    """Measure and write the "generation" section of docs/benchmarks.md (`benchmarks.run` calls this)."""
    figures = measure(QUICK if quick else FULL)
    figures["command"] = "python -m benchmarks.generation" + (" --quick" if quick else "")
    _save_and_write(figures, write=True)
    _record(figures)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.generation", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="the quick preset (about 3.5 minutes when idle)")
    parser.add_argument("--threads-lever", action="store_true",
                        help="also time decoding with one thread against all cores")
    parser.add_argument("--no-write", action="store_true", help="print the section instead of writing it")
    parser.add_argument("--report-only", action="store_true",
                        help="rewrite the section from the figures the last run saved, measuring nothing")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    for noisy in ("transformers", "peft", "sentence_transformers", "httpx"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    if args.report_only:
        _save_and_write(json.loads(RESULTS.read_text(encoding="utf-8")), write=not args.no_write)
        return 0
    figures = measure({**(QUICK if args.quick else FULL), "thread_lever": args.threads_lever})
    arguments = argv if argv is not None else sys.argv[1:]
    figures["command"] = " ".join(["python -m benchmarks.generation", *arguments])
    _save_and_write(figures, write=not args.no_write)
    if not args.no_write:
        _record(figures)
    return 0


if __name__ == "__main__":
    sys.exit(main())
