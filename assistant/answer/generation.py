"""Local generation with transformers + PEFT: streaming, batched, and per-request adapters.

One base model per process. Adapters are loaded into it once (PEFT keeps them side by side) and
chosen per request with PEFT's `adapter_names`, so no request changes global adapter state, and the
base route runs as "__base__" with every adapter bypassed. A lock serialises calls into the model:
on a CPU, concurrent forwards only contend for the same cores.

Inside the model, PEFT knows each adapter by a slot name ("slot-0", "slot-1", ...), not by its
public name. Unloading an adapter while others stay loaded keeps its LoRA layers as a free slot,
and a later adapter with the same LoRA shape is copied into that slot's parameters. That copy skips
PEFT's injection, which walks the whole module tree several times in Python: 150-250 ms per load
beside four loaded adapters of SmolLM2-135M on a two-core CPU (benchmarks/adapters.py).
"""

from __future__ import annotations

import contextlib
import json
import logging
import threading
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from assistant.errors import ModelError

logger = logging.getLogger(__name__)

BASE_ROUTE = "__base__"
# A shorter shared start is not worth copying keys and values for.
MIN_REUSED_PROMPT_TOKENS = 16
# Free LoRA slots kept after unloading, so the next adapter of the same shape is copied in instead of
# injected. Each slot contains one adapter's LoRA weights: 3.7 MB in fp32 for r=8 on the four attention
# projections of SmolLM2-135M, and by arithmetic about 1.7 GB for r=64 on all seven projections of
# Llama-3-70B in fp16.
DEFAULT_MAX_FREE_ADAPTER_SLOTS = 2
SLOT_NAME_PREFIX = "slot-"
# adapter_config.json fields that change neither the LoRA layers' shapes nor their inference math.
# Besides provenance, these are the dropout probability, because dropout is the identity in the eval
# mode that served models stay in, and the initialisation, because copying overwrites every LoRA weight.
SLOT_IGNORED_CONFIG_FIELDS = frozenset({
    "base_model_name_or_path", "revision", "peft_version", "auto_mapping", "inference_mode", "lora_dropout",
    "init_lora_weights",
})
# Initialisations that only draw the LoRA weights. Others (PiSSA, OLoRA, LoftQ, CorDA, EVA ...) derive
# them from the base weights or from data, and several also rewrite the base weights, so an adapter
# saved with one of them never shares a slot.
PLAIN_LORA_INITS = (True, False, "gaussian")


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
class _AdapterSlot:
    """One set of LoRA layers injected by PEFT under `name`, reusable for any adapter of the same shape."""

    name: str
    # the adapter config's shape fields as JSON; None when adapters are never copied into this slot
    shape_key: str | None
    # adapter_model.safetensors key -> the parameter of this slot that PEFT loads it into
    parameters: dict[str, Any] = field(default_factory=dict)


def slot_shape_key(config: Any) -> str | None:
    """Serialise the fields of a PEFT adapter config that decide its LoRA layers' shapes and math.

    Two adapters with equal keys get identical layers from PEFT, so one can be copied into the
    other's slot. Returns None for adapters whose state is more than the LoRA weights (DoRA
    magnitudes, biases, modules_to_save copies, trainable tokens, aLoRA, layer replication, an
    initialisation that rewrites base weights): those always go through PEFT's own loading.
    """
    from peft import LoraConfig

    if not isinstance(config, LoraConfig):
        return None
    extra_state = (config.use_dora, config.lora_bias, config.bias != "none", config.modules_to_save,
                   config.trainable_token_indices, config.target_parameters, config.alora_invocation_tokens,
                   config.layer_replication)
    if any(extra_state) or config.init_lora_weights not in PLAIN_LORA_INITS:
        return None
    fields = {k: v for k, v in asdict(config).items() if k not in SLOT_IGNORED_CONFIG_FIELDS}
    return json.dumps(fields, sort_keys=True, default=_json_value)


def _json_value(value: Any) -> Any:
    # target_modules is a set when the config lists names, so equal lists in any order compare equal
    if isinstance(value, (set, frozenset)):
        return sorted(value)
    return repr(value)


def _state_mismatch(state: dict[str, Any], parameters: dict[str, Any]) -> str:
    """Describe how an adapter's tensors differ from a slot's parameters; empty when every key and shape matches."""
    missing = sorted(set(parameters) - set(state))
    unexpected = sorted(set(state) - set(parameters))
    if missing or unexpected:
        return (f"{len(missing)} missing keys (first: {missing[:1]}), "
                f"{len(unexpected)} unexpected keys (first: {unexpected[:1]})")
    for key, tensor in state.items():
        if tuple(tensor.shape) != tuple(parameters[key].shape):
            return f"{key} has shape {tuple(tensor.shape)}, the slot {tuple(parameters[key].shape)}"
        if not tensor.is_floating_point():
            return f"{key} has dtype {tensor.dtype}, not a floating point type"
    return ""


def _copy_state(state: dict[str, Any], parameters: dict[str, Any]) -> None:
    """Copy each tensor of an adapter's state dict into the parameter of the same key, in place."""
    import torch

    with torch.no_grad():
        for key, tensor in state.items():
            parameters[key].copy_(tensor)


def _remove_injected_layers(model: Any) -> None:
    """Put back each layer PEFT wrapped inside `model`, without merging any adapter weights into it."""
    from peft.tuners.tuners_utils import BaseTunerLayer
    from peft.utils.other import AuxiliaryTrainingWrapper, ModulesToSaveWrapper

    def original(module: Any) -> Any:
        while isinstance(module, (BaseTunerLayer, AuxiliaryTrainingWrapper)):
            if isinstance(module, ModulesToSaveWrapper):
                module = module.original_module
            elif hasattr(module, "unload_and_optionally_merge_module"):
                # layers that need more than their base layer put back (multi-head attention, token wrappers)
                module = module.unload_and_optionally_merge_module(merge=False, safe_merge=False, adapter_names=None)
            else:
                module = module.get_base_layer()
        return module

    for parent in list(model.modules()):
        for child_name, child in list(parent.named_children()):
            replacement = original(child)
            if replacement is not child:
                setattr(parent, child_name, replacement)
    # PEFT copies its adapter configs onto the wrapped model, and a later PeftModel would pick them up
    if hasattr(model, "peft_config"):
        del model.peft_config


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

    def __init__(self, model: Any, tokenizer: Any, model_name: str, model_fingerprint: str,
                 max_free_adapter_slots: int = DEFAULT_MAX_FREE_ADAPTER_SLOTS) -> None:
        """`max_free_adapter_slots` bounds the LoRA slots kept after unloading; 0 deletes each unloaded adapter."""
        if max_free_adapter_slots < 0:
            raise ValueError(f"max_free_adapter_slots must be 0 or more, not {max_free_adapter_slots}")
        self.model = model
        self.tokenizer = tokenizer
        self.model_name = model_name
        self.model_fingerprint = model_fingerprint
        self.lock = threading.RLock()
        # public adapter name -> adapter folder
        self.adapters: dict[str, str] = {}
        self.max_free_adapter_slots = max_free_adapter_slots
        # whether the last load_adapter copied the adapter into a free slot instead of injecting layers
        self.last_load_reused_slot = False
        # public adapter name -> its slot, and slots whose adapter was unloaded, oldest first
        self._slots: dict[str, _AdapterSlot] = {}
        self._free_slots: list[_AdapterSlot] = []
        self._next_slot_number = 0
        # names of the base model's layers an adapter could target, collected on the first load
        self._candidate_modules: list[str] | None = None
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
        model, which PEFT would otherwise load as a no-op. An adapter with the shape of a free slot is
        copied into it; any other is injected by PEFT as a new slot.
        """
        from assistant.tuning.loading import check_adapter_files, check_target_modules, read_adapter_config

        if name == BASE_ROUTE:
            raise ModelError(f"{BASE_ROUTE!r} is reserved for the base route; load the adapter under another name")
        with self.lock:
            if name in self.adapters:
                return
            start = time.perf_counter()
            path = Path(path)
            check_adapter_files(path)
            config = read_adapter_config(path)
            if self._candidate_modules is None:
                from assistant.tuning.loading import candidate_module_names

                self._candidate_modules = candidate_module_names(self.model)
            check_target_modules(self.model, path, config=config, candidates=self._candidate_modules)

            slot = self._copy_into_free_slot(name, path, config)
            self.last_load_reused_slot = slot is not None
            if slot is None:
                slot = self._inject_slot(name, path, config)
                self._prompt_caches.clear()
            self._slots[name] = slot
            self.adapters[name] = str(path)
            # a route's cached prompt keys and values were computed with the weights it had then
            self._prompt_caches.pop(name, None)
            method = f"copied into free slot {slot.name}" if self.last_load_reused_slot else f"injected as {slot.name}"
            logger.info("adapter %s loaded (%s) in %.0f ms", name, method, (time.perf_counter() - start) * 1e3)

    def unload_adapter(self, name: str) -> None:
        """Remove a loaded adapter; removing the last one restores the bare base model's own layers.

        While other adapters stay loaded, the adapter's LoRA layers are kept as a free slot if the slot
        can be reused and fewer than `max_free_adapter_slots` are free. Otherwise PEFT deletes them.
        """
        with self.lock:
            if name not in self.adapters:
                return
            slot = self._slots.pop(name)
            del self.adapters[name]
            if not self.adapters:
                # a PeftModel left with no adapter fails on every call, so take the wrapping off entirely
                self.model = self.model.unload()
                self._free_slots.clear()
                self._prompt_caches.clear()
                self._collect_adapter_layers()
            elif slot.shape_key is not None and len(self._free_slots) < self.max_free_adapter_slots:
                # No request can reach a free slot, so the other routes' cached prompts stay valid.
                self._free_slots.append(slot)
                self._prompt_caches.pop(name, None)
            else:
                self.model.delete_adapter(slot.name)
                self._prompt_caches.clear()
                self._collect_adapter_layers()

    def peft_adapter_names(self, adapters: list[str | None]) -> list[str]:
        """Map each request's adapter (None or "__base__" for the base route) to its PEFT adapter name."""
        unknown = sorted({a for a in adapters if a and a != BASE_ROUTE and a not in self.adapters})
        if unknown:
            raise ModelError(f"adapter(s) {unknown} are not loaded; loaded: {sorted(self.adapters) or 'none'}")
        return [self._slots[a].name if a and a != BASE_ROUTE else BASE_ROUTE for a in adapters]

    # adapter slots

    def _new_slot_name(self) -> str:
        used_names = set(getattr(self.model, "peft_config", {}))
        while f"{SLOT_NAME_PREFIX}{self._next_slot_number}" in used_names:
            self._next_slot_number += 1
        name = f"{SLOT_NAME_PREFIX}{self._next_slot_number}"
        self._next_slot_number += 1
        return name

    def _inject_slot(self, name: str, path: Path, config: Any) -> _AdapterSlot:
        """Load the adapter with PEFT into new LoRA layers and return them as a slot."""
        from peft import PeftModel

        slot_name = self._new_slot_name()
        try:
            if isinstance(self.model, PeftModel):
                self.model.load_adapter(str(path), adapter_name=slot_name, is_trainable=False)
            else:
                self.model = PeftModel.from_pretrained(self.model, str(path), adapter_name=slot_name,
                                                       is_trainable=False)
        except (OSError, ValueError, RuntimeError) as err:
            # RuntimeError: tensor shapes that differ from this model's layers, found after PEFT has
            # injected the layers and copied the tensors that did fit.
            self._discard_failed_slot(slot_name)
            raise ModelError(f"could not load adapter {name!r} from {str(path)!r}: {err}") from err
        self.model.eval()
        self._collect_adapter_layers()
        self._set_adapter_layers(False)
        return self._describe_slot(slot_name, path, config)

    def _discard_failed_slot(self, slot_name: str) -> None:
        """Remove what a failed PEFT load left of `slot_name`, so no request or later load meets it."""
        from peft import PeftModel

        if not isinstance(self.model, PeftModel):
            # The first adapter failed inside PeftModel.from_pretrained, which injected its layers
            # into the bare base object in place and returned no PeftModel to unload them with.
            _remove_injected_layers(self.model)
        elif slot_name in self.model.peft_config:
            try:
                self.model.delete_adapter(slot_name)
            except (ValueError, KeyError, AttributeError) as err:
                logger.warning("could not delete the partly loaded adapter slot %s: %s", slot_name, err)
        self._collect_adapter_layers()
        self._set_adapter_layers(False)

    def _describe_slot(self, slot_name: str, path: Path, config: Any) -> _AdapterSlot:
        """Map the adapter file's keys to the slot's parameters, or mark the slot as not reusable."""
        from safetensors import safe_open

        from assistant.tuning.registry import ADAPTER_WEIGHTS

        shape_key = slot_shape_key(config)
        if shape_key is None:
            logger.info("adapter slot %s is not reusable: the adapter has state beyond plain LoRA weights", slot_name)
            return _AdapterSlot(slot_name, None)
        # PEFT names a slot's parameter "<module>.lora_A.<slot>.weight" ("<module>.lora_embedding_A.<slot>"
        # in embeddings), and the file stores it without the slot name.
        marker, ending = f".{slot_name}.", f".{slot_name}"
        parameters = {}
        for param_name, param in self.model.named_parameters():
            if marker in param_name:
                parameters[param_name.replace(marker, ".", 1)] = param
            elif param_name.endswith(ending):
                parameters[param_name.removesuffix(ending)] = param
        with safe_open(str(path / ADAPTER_WEIGHTS), framework="pt") as weights:
            file_keys = set(weights.keys())
        if file_keys != set(parameters):
            # PEFT renamed keys on load or filled missing ones with initial values: copying would differ
            logger.info("adapter slot %s is not reusable: %d file keys, %d slot parameters, %d in common",
                        slot_name, len(file_keys), len(parameters), len(file_keys & set(parameters)))
            return _AdapterSlot(slot_name, None)
        return _AdapterSlot(slot_name, shape_key, parameters)

    def _copy_into_free_slot(self, name: str, path: Path, config: Any) -> _AdapterSlot | None:
        """Copy the adapter's weights into a free slot of its shape and return the slot.

        Returns None, so the caller loads the adapter with PEFT, when no free slot has its shape or
        its tensors do not fit one. Every key and shape is checked before the first copy. A slot
        stays free until the copy succeeds, and no request can select a free slot, so a copy that
        fails halfway never reaches the other adapters.
        """
        from safetensors.torch import load_file

        from assistant.tuning.registry import ADAPTER_WEIGHTS

        shape_key = slot_shape_key(config)
        slot = next((s for s in self._free_slots if shape_key is not None and s.shape_key == shape_key), None)
        if slot is None:
            if self._free_slots:
                logger.info("adapter %s does not have the LoRA shape of any free slot; injecting new layers", name)
            return None

        weights_file = path / ADAPTER_WEIGHTS
        try:
            state = load_file(str(weights_file))
        except (OSError, ValueError, RuntimeError) as err:
            raise ModelError(f"could not read the weights of adapter {name!r} from {str(weights_file)!r}: {err}") \
                from err
        problem = _state_mismatch(state, slot.parameters)
        if problem:
            logger.info("adapter %s does not fit free slot %s (%s); loading it with PEFT", name, slot.name, problem)
            return None

        try:
            _copy_state(state, slot.parameters)
        except RuntimeError as err:
            raise ModelError(f"could not copy adapter {name!r} into slot {slot.name}: {err}") from err
        self._free_slots.remove(slot)
        # Each layer's `scaling` stays as PEFT set it for the slot: r, lora_alpha, use_rslora and the
        # rank and alpha patterns are part of the shape key, so the new adapter's scaling is the same.
        config.inference_mode = True
        self.model.peft_config[slot.name] = config
        return slot

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

    def adapter_kwargs(self, adapters: list[str | None]) -> dict[str, Any]:
        """Build the keyword arguments that route each row to its adapter's slot; empty when none is loaded."""
        peft_names = self.peft_adapter_names(adapters)
        if not self.adapters:
            return {}
        return {"adapter_names": peft_names}

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
            output = self._run_generate(inputs, self.adapter_kwargs(adapters), adapters[0], settings)
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
        adapter_kwargs = self.adapter_kwargs([adapter])
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
