"""Local generation with transformers + PEFT: streaming, batched, and per-request adapters.

One base model per process. Adapters are loaded into it once (PEFT keeps them side by side) and
chosen per request with PEFT's `adapter_names`, so no request changes global adapter state, and the
base route runs as "__base__" with every adapter bypassed. A lock serialises calls into the model:
on a CPU, concurrent forwards only contend for the same cores.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from assistant.errors import ModelError

logger = logging.getLogger(__name__)

BASE_ROUTE = "__base__"
# A shorter shared start is not worth copying keys and values for.
MIN_REUSED_PROMPT_TOKENS = 16


@dataclass
class GenerationSettings:
    """Decoding settings recorded with every answer. Greedy by default so answers are reproducible."""

    max_new_tokens: int = 200
    # SmolLM2-135M loops on greedy decoding without a mild penalty
    repetition_penalty: float = 1.1
    do_sample: bool = False
    temperature: float = 1.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def generate_kwargs(self, tokenizer: Any) -> dict[str, Any]:
        kwargs: dict[str, Any] = {
            "max_new_tokens": self.max_new_tokens,
            "repetition_penalty": self.repetition_penalty,
            "do_sample": self.do_sample,
            "pad_token_id": tokenizer.pad_token_id,
            "eos_token_id": tokenizer.eos_token_id,
        }
        if self.do_sample:
            kwargs["temperature"] = self.temperature
        else:
            # the model's generation_config may carry sampling defaults that greedy decoding ignores noisily
            kwargs.update(temperature=None, top_p=None, top_k=None)
        return kwargs


@dataclass
class _PromptCache:
    """Keys and values of the last single-conversation prompt on one route, one entry per prompt token."""

    token_ids: list[int]
    cache: Any


class LocalGenerator:
    """Generate with one in-process base model and any number of loaded PEFT adapters.

    A single conversation reuses the keys and values of the prompt start it shares with the previous
    single conversation on the same route (adapter or base): the system prompt and the opening of
    the sources (about 110 tokens of an `ask` prompt), or a whole earlier turn of a chat. Only
    positions computed while reading a prompt are reused, never those computed while generating,
    and greedy outputs were checked to equal those of a full prompt pass. Batches of several
    conversations skip the reuse.
    """

    backend = "local"

    def __init__(self, model: Any, tokenizer: Any, model_name: str, model_fingerprint: str) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.model_name = model_name
        self.model_fingerprint = model_fingerprint
        self.lock = threading.RLock()
        self.adapters: dict[str, str] = {}
        self.reuse_prompt_prefix = True
        # prompt tokens whose keys and values the last call took from the previous prompt
        self.last_reused_tokens = 0
        # one entry per route, each about 45 MB for a 1,000-token prompt of SmolLM2-135M in fp32
        self._prompt_caches: dict[str | None, _PromptCache] = {}
        # PEFT's adapter layers inside `model`, collected once per load or unload for the per-request toggle
        self._adapter_layers: list[Any] = []

    @property
    def dtype(self) -> str:
        return str(next(self.model.parameters()).dtype).removeprefix("torch.")

    # adapters

    def load_adapter(self, name: str, path: Path) -> None:
        """Load a PEFT adapter folder under `name`; the caller has verified its base fingerprint.

        Rejects folders with pickled weights and adapters whose target modules match nothing in this
        model, which PEFT would otherwise load as a no-op.
        """
        from peft import PeftModel

        from assistant.tuning.loading import check_adapter_files, check_target_modules

        if name == BASE_ROUTE:
            raise ModelError(f"{BASE_ROUTE!r} is reserved for the base route; load the adapter under another name")
        with self.lock:
            if name in self.adapters:
                return
            start = time.perf_counter()
            check_adapter_files(Path(path))
            check_target_modules(self.model, Path(path))
            try:
                if isinstance(self.model, PeftModel):
                    self.model.load_adapter(str(path), adapter_name=name, is_trainable=False)
                else:
                    self.model = PeftModel.from_pretrained(self.model, str(path), adapter_name=name,
                                                           is_trainable=False)
            except (OSError, ValueError, RuntimeError) as err:
                # RuntimeError: tensor shapes that differ from this model's layers. PEFT may have
                # injected layers before failing, and those must stay off like the others.
                self._collect_adapter_layers()
                self._set_adapter_layers(False)
                raise ModelError(f"could not load adapter {name!r} from {str(path)!r}: {err}") from err
            self.model.eval()
            self._collect_adapter_layers()
            self._set_adapter_layers(False)
            self.adapters[name] = str(path)
            self._prompt_caches.clear()
            logger.info("adapter %s loaded in %.0f ms", name, (time.perf_counter() - start) * 1e3)

    def unload_adapter(self, name: str) -> None:
        """Remove a loaded adapter; removing the last one restores the bare base model's own layers."""
        with self.lock:
            if name not in self.adapters:
                return
            if len(self.adapters) == 1:
                # a PeftModel left with no adapter fails on every call, so take the wrapping off entirely
                self.model = self.model.unload()
            else:
                self.model.delete_adapter(name)
            del self.adapters[name]
            self._prompt_caches.clear()
            self._collect_adapter_layers()

    def _collect_adapter_layers(self) -> None:
        from peft import PeftModel
        from peft.tuners.tuners_utils import BaseTunerLayer
        from peft.utils.other import AuxiliaryTrainingWrapper

        kinds = (BaseTunerLayer, AuxiliaryTrainingWrapper)
        self._adapter_layers = [m for m in self.model.modules() if isinstance(m, kinds)] \
            if isinstance(self.model, PeftModel) else []

    def _set_adapter_layers(self, enabled: bool) -> None:
        """Switch every LoRA layer on or off.

        PEFT injects adapter layers into the base model object in place, and that object is shared
        with anything else that loaded the same base in this process. Outside a generation call the
        layers stay off, so a forward pass through the bare base object computes the base model.
        Inside one, rows choose their adapter (or "__base__") through `adapter_names`.
        NOTE: a forward pass through the bare base object from another thread, while a generation
        call holds the lock, runs with the layers on and so applies the first loaded adapter.
        """
        # Each layer's forward reads only this flag (PEFT 0.21, `BaseTunerLayer.disable_adapters`).
        # PEFT's own enable_adapter_layers() also walks the whole module tree and resets requires_grad.
        # That took about 10 ms per call with the four demo adapters loaded, twice per request, while
        # flipping the flags of the collected layers takes well under a millisecond.
        for layer in self._adapter_layers:
            layer._disable_adapters = not enabled

    @contextlib.contextmanager
    def adapters_active(self) -> Iterator[None]:
        """Hold the model with its adapter layers on, so forward calls may pass `adapter_names`."""
        with self.lock:
            self._set_adapter_layers(True)
            try:
                yield
            finally:
                self._set_adapter_layers(False)

    def _adapter_kwargs(self, adapters: list[str | None]) -> dict[str, Any]:
        unknown = sorted({a for a in adapters if a and a not in self.adapters})
        if unknown:
            raise ModelError(f"adapter(s) {unknown} are not loaded; loaded: {sorted(self.adapters) or 'none'}")
        if not self.adapters:
            return {}
        return {"adapter_names": [a or BASE_ROUTE for a in adapters]}

    # encoding

    def encode(self, messages_list: list[list[dict[str, str]]]) -> dict[str, Any]:
        """Render each conversation with the chat template and left-pad them into one batch.

        Token ids come straight from the template (tokenize=True), so special tokens appear once:
        re-tokenizing rendered text with add_special_tokens=True would add a second BOS.
        """
        import torch

        rows = []
        for messages in messages_list:
            ids = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
            if hasattr(ids, "keys"):
                ids = ids["input_ids"]
            rows.append(list(ids))
        width = max(len(r) for r in rows)
        pad = self.tokenizer.pad_token_id
        input_ids = torch.tensor([[pad] * (width - len(r)) + r for r in rows], dtype=torch.long)
        attention = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows], dtype=torch.long)
        device = next(self.model.parameters()).device
        return {"input_ids": input_ids.to(device), "attention_mask": attention.to(device)}

    # prompt prefix reuse

    def _prefix_cache(self, token_ids: list[int], route: str | None) -> Any:
        """Build a cache of the longest start this prompt shares with the previous one (or an empty one)."""
        from transformers import DynamicCache

        entry = self._prompt_caches.get(route)
        shared = 0
        if entry is not None:
            # the last prompt token always runs, since its logits give the first new token
            limit = min(len(entry.token_ids), len(token_ids) - 1)
            while shared < limit and entry.token_ids[shared] == token_ids[shared]:
                shared += 1
        if shared < MIN_REUSED_PROMPT_TOKENS:
            return DynamicCache(config=self.model.config)
        self.last_reused_tokens = shared
        layers = [(layer.keys[..., :shared, :], layer.values[..., :shared, :])
                  for layer in entry.cache.layers]
        return DynamicCache(layers, config=self.model.config)

    def _keep_prompt_cache(self, cache: Any, token_ids: list[int], route: str | None) -> None:
        """Keep the prompt's positions of `cache` for the next call; drop those written while generating."""
        # layers of other kinds (sliding windows, recurrent state) do not crop to a plain prefix
        if not all(type(layer).__name__ == "DynamicLayer" for layer in cache.layers):
            self._prompt_caches.pop(route, None)
            return
        cache.crop(len(token_ids) - cache.get_seq_length())
        self._prompt_caches[route] = _PromptCache(token_ids, cache)

    def _run_generate(self, inputs: dict[str, Any], adapter_kwargs: dict[str, Any], route: str | None,
                      settings: GenerationSettings, streamer: Any = None) -> Any:
        """Call `model.generate`; a single conversation starts from the prefix it shares with the last one."""
        import torch

        kwargs = {**settings.generate_kwargs(self.tokenizer), **adapter_kwargs}
        if streamer is not None:
            kwargs["streamer"] = streamer
        reuse = self.reuse_prompt_prefix and inputs["input_ids"].shape[0] == 1
        self.last_reused_tokens = 0
        if reuse:
            token_ids = inputs["input_ids"][0].tolist()
            kwargs["cache"] = self._prefix_cache(token_ids, route)
        with torch.inference_mode():
            output = self.model.generate(**inputs, **kwargs)
        if reuse:
            self._keep_prompt_cache(kwargs["cache"], token_ids, route)
        return output

    # generation

    def generate_batch(self, messages_list: list[list[dict[str, str]]], adapters: list[str | None] | None = None,
                       settings: GenerationSettings | None = None) -> list[str]:
        """Generate for several conversations in one call; each row may use its own adapter."""
        settings = settings or GenerationSettings()
        adapters = adapters or [None] * len(messages_list)
        if len(adapters) != len(messages_list):
            raise ValueError("adapters must list one entry (or None) per conversation")
        inputs = self.encode(messages_list)
        with self.adapters_active():
            output = self._run_generate(inputs, self._adapter_kwargs(adapters), adapters[0], settings)
        width = inputs["input_ids"].shape[1]
        return [self.tokenizer.decode(row[width:], skip_special_tokens=True).strip() for row in output]

    def generate(self, messages: list[dict[str, str]], adapter: str | None = None,
                 settings: GenerationSettings | None = None) -> str:
        return self.generate_batch([messages], [adapter], settings)[0]

    def stream(self, messages: list[dict[str, str]], adapter: str | None = None,
               settings: GenerationSettings | None = None) -> Iterator[str]:
        """Yield decoded text pieces as they are generated; the lock is held until generation ends."""
        from transformers import TextIteratorStreamer

        settings = settings or GenerationSettings()
        inputs = self.encode([messages])
        adapter_kwargs = self._adapter_kwargs([adapter])
        streamer = TextIteratorStreamer(self.tokenizer, skip_prompt=True, skip_special_tokens=True, timeout=600)
        failure: list[BaseException] = []

        def run() -> None:
            try:
                self._run_generate(inputs, adapter_kwargs, adapter, settings, streamer=streamer)
            except BaseException as err:  # reported to the consumer below
                failure.append(err)
                streamer.end()

        with self.adapters_active():
            worker = threading.Thread(target=run, name="bedside-generate", daemon=True)
            worker.start()
            try:
                yield from streamer
            finally:
                worker.join()
        if failure:
            raise ModelError(f"generation failed: {failure[0]}") from failure[0]
