"""Generation through a vLLM server's OpenAI-compatible API, with the interface of `LocalGenerator`.

Only token generation moves to the server: retrieval, prompt fitting, citation checks and the audit
stay in bedside. Each prompt is rendered here with the base model's own chat template and sent as
token ids to `/v1/completions`, so vLLM receives exactly the prompt that was fitted to the context here.
The adapter is chosen per request by `model=<adapter name>` (vLLM's `--lora-modules NAME=PATH`),
and every response must name the model it was asked for: a server that answers with another model
raises an error instead of passing that answer off as the adapter's.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from assistant.answer.generation import GenerationSettings
from assistant.errors import BedsideError

logger = logging.getLogger(__name__)

# Written by `bedside export vllm` next to the base folder; it names the source weights' fingerprint.
EXPORT_MANIFEST = "bedside_export.json"
SOURCE_FILE = "bedside_source.json"
RETRYABLE_STATUS = {408, 429, 500, 502, 503, 504}
ADAPTER_WEIGHTS = "adapter_model.safetensors"


class VLLMError(BedsideError):
    """A vLLM server that cannot be reached, fails, or does not serve the requested model.

    `status` is the HTTP status when the server replied, and `detail` its error message.
    """

    def __init__(self, message: str, status: int | None = None, detail: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.detail = detail


@dataclass(frozen=True)
class ServedModel:
    """One entry of the server's `/v1/models`: the base (parent None) or a LoRA adapter on it."""

    id: str
    root: str
    parent: str | None
    max_model_len: int | None


@dataclass
class ModelConfig:
    """The part of a transformers config the prompt builder reads (`context_limit`)."""

    max_position_embeddings: int


@dataclass
class ServedBase:
    """Replacement for the in-process model object: `config.max_position_embeddings` is the server's limit."""

    config: ModelConfig


# HTTP


class VLLMClient:
    """Calls to one vLLM server with bounded retries on connection failures, timeouts and 5xx replies."""

    def __init__(
        self,
        url: str,
        attempts: int = 3,
        backoff_s: float = 0.5,
        connect_timeout_s: float = 5.0,
        read_timeout_s: float = 600.0,
    ) -> None:
        import httpx

        if not url.startswith(("http://", "https://")):
            raise VLLMError(f"vllm_url {url!r} is invalid; use a base URL such as http://127.0.0.1:8000/v1")
        self.url = url.rstrip("/")
        self.attempts = max(1, attempts)
        self.backoff_s = backoff_s
        self.timeout = httpx.Timeout(read_timeout_s, connect=connect_timeout_s)
        self.http = httpx.Client(timeout=self.timeout)

    def close(self) -> None:
        self.http.close()

    def _unreachable(self, what: str, err: BaseException | str) -> VLLMError:
        return VLLMError(
            f"vLLM server at {self.url} {what} after {self.attempts} attempt(s) ({err}); start it with "
            "`make serve-vllm` (or the command `bedside export vllm` printed), or set vllm_url to a running "
            "server, or use --backend local"
        )

    def _timed_out(self, path: str) -> VLLMError:
        # a server that accepted the request but stayed silent this long is stuck or overloaded, and
        # sending the request again would only double the wait
        return VLLMError(
            f"vLLM server at {self.url} accepted {path} but sent nothing for {self.timeout.read:.0f} s; "
            "check its log and load, then ask again"
        )

    def request(self, method: str, path: str, **kwargs: Any) -> Any:
        """Send one request and return its JSON body (None when empty), retrying transient failures."""
        import httpx

        url = self.url + path
        last: BaseException | str = "no attempt made"
        for attempt in range(1, self.attempts + 1):
            try:
                response = self.http.request(method, url, **kwargs)
            except httpx.ReadTimeout as err:
                raise self._timed_out(path) from err
            except httpx.TransportError as err:
                last = f"{type(err).__name__}: {err}"
            else:
                if response.status_code < 400:
                    return response.json() if response.content and _is_json(response) else None
                if response.status_code not in RETRYABLE_STATUS:
                    detail = _error_text(response)
                    raise VLLMError(
                        f"vLLM server at {self.url} rejected {method} {path} "
                        f"with HTTP {response.status_code}: {detail}",
                        response.status_code,
                        detail,
                    )
                last = f"HTTP {response.status_code}: {_error_text(response)}"
            logger.warning(
                "vLLM %s %s failed (attempt %d of %d): %s", method, path, attempt, self.attempts, last
            )
            if attempt < self.attempts:
                time.sleep(self.backoff_s * 2 ** (attempt - 1))
        raise self._unreachable("did not respond to " + path, last)

    def stream(self, path: str, payload: dict[str, Any]) -> Iterator[dict[str, Any]]:
        """POST with `stream: true` and yield each server-sent event's JSON.

        Opening the stream is retried like any request. Once an event has been yielded, a failure is
        raised at once: the caller has already shown part of the answer, so a silent restart would
        repeat or change text the clinician has read.
        """
        import httpx

        last: BaseException | str = "no attempt made"
        for attempt in range(1, self.attempts + 1):
            started = False
            try:
                with self.http.stream("POST", self.url + path, json=payload) as response:
                    if response.status_code >= 400:
                        response.read()
                        if response.status_code not in RETRYABLE_STATUS:
                            detail = _error_text(response)
                            raise VLLMError(
                                f"vLLM server at {self.url} rejected POST {path} with HTTP "
                                f"{response.status_code}: {detail}",
                                response.status_code,
                                detail,
                            )
                        last = f"HTTP {response.status_code}: {_error_text(response)}"
                    else:
                        for line in response.iter_lines():
                            if not line.startswith("data:"):
                                continue
                            data = line[len("data:") :].strip()
                            if data == "[DONE]":
                                return
                            event = json.loads(data)
                            if "error" in event:
                                raise VLLMError(
                                    f"vLLM server at {self.url} failed mid-answer: {event['error']}"
                                )
                            started = True
                            yield event
                        return
            except httpx.ReadTimeout as err:
                raise self._timed_out(path) from err
            except httpx.TransportError as err:
                if started:
                    raise VLLMError(
                        f"the connection to the vLLM server at {self.url} broke mid-answer "
                        f"({type(err).__name__}: {err}); ask again once the server is back"
                    ) from err
                last = f"{type(err).__name__}: {err}"
            logger.warning("vLLM POST %s failed (attempt %d of %d): %s", path, attempt, self.attempts, last)
            if attempt < self.attempts:
                time.sleep(self.backoff_s * 2 ** (attempt - 1))
        raise self._unreachable("did not respond to " + path, last)

    def models(self) -> list[ServedModel]:
        body = self.request("GET", "/models")
        return [
            ServedModel(
                id=m["id"],
                root=str(m.get("root") or ""),
                parent=m.get("parent"),
                max_model_len=m.get("max_model_len"),
            )
            for m in (body or {}).get("data", [])
        ]

    def load_lora(self, name: str, path: str) -> None:
        """Load an adapter into the running server (needs VLLM_ALLOW_RUNTIME_LORA_UPDATING=True there)."""
        self._runtime_lora("/load_lora_adapter", {"lora_name": name, "lora_path": path})

    def unload_lora(self, name: str) -> None:
        self._runtime_lora("/unload_lora_adapter", {"lora_name": name})

    def _runtime_lora(self, path: str, payload: dict[str, str]) -> None:
        # vLLM serves these under /v1 (vllm/entrypoints/serve/lora/api_router.py, vLLM 0.32)
        try:
            self.request("POST", path, json=payload)
        except VLLMError as err:
            # FastAPI's own reply for a route that does not exist, as opposed to vLLM's "adapter not found"
            if err.status == 404 and err.detail == "Not Found":
                raise VLLMError(
                    f"the vLLM server at {self.url} does not offer {path}; restart it with the environment "
                    "variable VLLM_ALLOW_RUNTIME_LORA_UPDATING=True (the command from `bedside export vllm` "
                    "sets it) so adapters can change without a restart"
                ) from err
            raise


def _is_json(response: Any) -> bool:
    return "json" in response.headers.get("content-type", "")


def _error_text(response: Any) -> str:
    """Extract the server's error message: OpenAI-style `{"error": {"message": ...}}`, else the raw body."""
    try:
        body = response.json()
    except (ValueError, UnicodeDecodeError):
        return response.text[:300]
    if isinstance(body, dict):
        if "detail" in body and "error" not in body:
            return str(body["detail"])[:300]
        error = body.get("error", body)
        if isinstance(error, dict):
            return str(error.get("message") or error)[:300]
        return str(error)[:300]
    return str(body)[:300]


# generator


class VLLMGenerator:
    """Generate on a vLLM server: same calls as `LocalGenerator`, adapters chosen by served name."""

    backend = "vllm"

    def __init__(
        self,
        client: VLLMClient,
        tokenizer: Any,
        model_name: str,
        model_fingerprint: str,
        max_model_len: int,
        dtype: str = "unknown",
        adapters: Mapping[str, str] | None = None,
        max_concurrency: int = 16,
    ) -> None:
        self.client = client
        self.tokenizer = tokenizer
        self.model_name = model_name
        self.model_fingerprint = model_fingerprint
        self.model = ServedBase(ModelConfig(max_model_len))
        self.dtype = dtype
        self.adapters: dict[str, str] = dict(adapters or {})
        self.max_concurrency = max_concurrency

    @classmethod
    def from_settings(cls, settings: Any) -> VLLMGenerator:
        """Connect to `settings.vllm_url` and identify the served base model and its adapters."""
        client = VLLMClient(settings.vllm_url)
        served = client.models()
        bases = [m for m in served if m.parent is None]
        if not bases:
            raise VLLMError(
                f"the vLLM server at {client.url} lists no base model; check its --model argument"
            )
        if len(bases) > 1:
            logger.warning(
                "vLLM lists several base models (%s); using %s", [b.id for b in bases], bases[0].id
            )
        base = bases[0]
        adapters = {m.id: m.root for m in served if m.parent == base.id}
        tokenizer, fingerprint, dtype = _identify_base(base, settings)
        generator = cls(client, tokenizer, base.id, fingerprint, base.max_model_len or 2048, dtype, adapters)
        logger.info(
            "vLLM backend at %s: base %s (%s), adapters %s",
            client.url,
            base.id,
            fingerprint[:19],
            sorted(adapters) or "none",
        )
        return generator

    # adapters

    def served_adapters(self) -> dict[str, str]:
        """Re-read the server's adapter list (another process may have loaded or unloaded some)."""
        served = self.client.models()
        self.adapters = {m.id: m.root for m in served if m.parent == self.model_name}
        return dict(self.adapters)

    def load_adapter(self, name: str, path: Path) -> None:
        """Make adapter `name` servable: checked when the server already has it, else loaded at runtime.

        NOTE: `path` is read by the server process, so it must be a path on the server's machine.
        """
        resolved = str(Path(path).resolve())
        if name in self.adapters or name in self.served_adapters():
            if not _same_adapter(self.adapters[name], resolved, None):
                raise VLLMError(
                    f"the vLLM server at {self.client.url} serves other weights under adapter name {name!r} "
                    f"than {resolved!r}; run `sync_adapters` or export and restart the server"
                )
            return
        self.client.load_lora(name, resolved)
        self.adapters[name] = str(path)
        logger.info("adapter %s loaded into vLLM at %s from %s", name, self.client.url, path)

    def unload_adapter(self, name: str) -> None:
        if name in self.adapters:
            self.client.unload_lora(name)
            del self.adapters[name]

    def _served_name(self, adapter: str | None) -> str:
        if not adapter:
            return self.model_name
        if adapter not in self.adapters and adapter not in self.served_adapters():
            raise VLLMError(
                f"adapter {adapter!r} is not served by the vLLM server at {self.client.url} (serving: "
                f"{sorted(self.adapters) or 'no adapters'}); export it with `bedside export vllm` and "
                "restart, or promote it so it is loaded at runtime"
            )
        return adapter

    # requests

    def encode(self, messages: list[dict[str, str]]) -> list[int]:
        """Render one conversation with the chat template into token ids, special tokens included once."""
        ids = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        if hasattr(ids, "keys"):
            ids = ids["input_ids"]
        return list(ids)

    def _payload(
        self, messages: list[dict[str, str]], adapter: str | None, settings: GenerationSettings
    ) -> dict[str, Any]:
        payload: dict[str, Any] = {
            "model": self._served_name(adapter),
            "prompt": self.encode(messages),
            "max_tokens": settings.max_new_tokens,
            # vLLM's repetition_penalty divides the logits of prompt and output tokens, as transformers does
            "repetition_penalty": settings.repetition_penalty,
            "skip_special_tokens": True,
        }
        if settings.do_sample:
            payload["temperature"] = settings.temperature
        else:
            payload["temperature"] = 0.0
        return payload

    def _check_model(self, body: dict[str, Any], expected: str) -> None:
        served = body.get("model")
        if served != expected:
            raise VLLMError(
                f"the vLLM server at {self.client.url} answered with model {served!r} when "
                f"{expected!r} was requested; the answer was discarded"
            )

    def generate(
        self,
        messages: list[dict[str, str]],
        adapter: str | None = None,
        settings: GenerationSettings | None = None,
    ) -> str:
        settings = settings or GenerationSettings()
        payload = self._payload(messages, adapter, settings)
        body = self.client.request("POST", "/completions", json=payload)
        self._check_model(body, payload["model"])
        return body["choices"][0]["text"].strip()

    def generate_batch(
        self,
        messages_list: list[list[dict[str, str]]],
        adapters: list[str | None] | None = None,
        settings: GenerationSettings | None = None,
    ) -> list[str]:
        """Send the conversations concurrently; vLLM batches them, mixing adapters in one step."""
        adapters = adapters or [None] * len(messages_list)
        if len(adapters) != len(messages_list):
            raise ValueError("adapters must list one entry (or None) per conversation")
        if not messages_list:
            return []
        workers = min(len(messages_list), self.max_concurrency)
        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="bedside-vllm") as pool:
            futures = [
                pool.submit(self.generate, messages, adapter, settings)
                for messages, adapter in zip(messages_list, adapters, strict=True)
            ]
            return [future.result() for future in futures]

    def stream(
        self,
        messages: list[dict[str, str]],
        adapter: str | None = None,
        settings: GenerationSettings | None = None,
    ) -> Iterator[str]:
        """Yield text pieces as the server produces them."""
        settings = settings or GenerationSettings()
        payload = self._payload(messages, adapter, settings)
        payload["stream"] = True
        for event in self.client.stream("/completions", payload):
            self._check_model(event, payload["model"])
            for choice in event.get("choices", []):
                if choice.get("text"):
                    yield choice["text"]


def _identify_base(base: ServedModel, settings: Any) -> tuple[Any, str, str]:
    """Load the tokenizer and read the fingerprint of the served base model.

    When the server's model folder is visible here (same machine, or a shared volume), both come
    from that folder and the export manifest beside it. Otherwise they come from the configured
    base model, which must be the one the server was started from.
    """
    from transformers import AutoTokenizer

    from assistant import models

    folder = Path(base.root)
    if (folder / "config.json").is_file():
        tokenizer = AutoTokenizer.from_pretrained(str(folder))
        fingerprint = _source_fingerprint(folder)
        manifest = _read_json(folder.parent / EXPORT_MANIFEST)
        dtype = str(manifest.get("dtype", "unknown")) if manifest else "unknown"
    else:
        spec = models.resolve_model(settings.model)
        local = models.dequantized_gguf_folder(spec) if spec.gguf_file else Path(spec.path)
        tokenizer = AutoTokenizer.from_pretrained(str(local) if local.exists() else spec.path)
        fingerprint = models.model_fingerprint(spec)
        dtype = "unknown"
        # NOTE: the served weights cannot be hashed from here, so the fingerprint is the configured
        # model's; a server started from another base would go unnoticed until answers degrade.
        logger.warning(
            "the vLLM model folder %s is not visible here; assuming it serves %s (%s)",
            base.root,
            spec.display_name,
            fingerprint[:19],
        )
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer, fingerprint, dtype


def _source_fingerprint(folder: Path) -> str:
    from assistant import models

    source = _read_json(folder / SOURCE_FILE)
    if source and source.get("source_fingerprint"):
        return str(source["source_fingerprint"])
    return "sha256:" + models.folder_fingerprint(folder)


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


# adapter promotion reaching a running server


@dataclass
class SyncReport:
    """Changes `sync_adapters` made on the server: the adapter names loaded, reloaded and unloaded."""

    loaded: list[str] = field(default_factory=list)
    reloaded: list[str] = field(default_factory=list)
    unloaded: list[str] = field(default_factory=list)

    @property
    def changed(self) -> bool:
        return bool(self.loaded or self.reloaded or self.unloaded)


def sync_adapters(
    url: str, registry: Any, audit: Any = None, user: str = "system", keep: set[str] | None = None
) -> SyncReport:
    """Make a running vLLM serve exactly the registry's active adapters, without restarting it.

    `registry` is an `AdapterRegistry`, an adapters folder holding `registry.json`, or a mapping of
    adapter name to folder. Adapters the server has under a name the registry no longer lists as
    active are unloaded, unless named in `keep`. An adapter whose served weights differ from the
    registry's is unloaded and loaded again under a new numeric id. vLLM 0.32 keeps the id on an
    in-place reload and warns that prefix-cache blocks computed with the old weights stay valid, so
    a fresh load is the safe way to change weights. Each change is
    written to `audit` (an `AuditLog`) with kind "adapter_change". The server must run with
    VLLM_ALLOW_RUNTIME_LORA_UPDATING=True.
    """
    client = VLLMClient(url)
    try:
        desired = _active_adapters(registry)
        served = client.models()
        bases = [m for m in served if m.parent is None]
        base_id = bases[0].id if bases else None
        current = {m.id: m.root for m in served if m.parent is not None}
        report = SyncReport()

        for name, (path, sha256) in desired.items():
            resolved = str(Path(path).resolve())
            if name in current and _same_adapter(current[name], resolved, sha256):
                continue
            action = "reload" if name in current else "load"
            if name in current:
                client.unload_lora(name)
            client.load_lora(name, resolved)
            (report.reloaded if action == "reload" else report.loaded).append(name)
            _audit_change(audit, user, client.url, base_id, action, name, resolved, sha256)

        for name, path in current.items():
            if name in desired or name in (keep or set()):
                continue
            client.unload_lora(name)
            report.unloaded.append(name)
            _audit_change(audit, user, client.url, base_id, "unload", name, path, None)
    finally:
        client.close()
    if report.changed:
        logger.info(
            "vLLM at %s: loaded %s, reloaded %s, unloaded %s",
            url,
            report.loaded or "none",
            report.reloaded or "none",
            report.unloaded or "none",
        )
    return report


def _same_adapter(served_root: str, folder: str, sha256: str | None) -> bool:
    """Return True when the served folder contains the registry's weights (by hash, else by path)."""
    served_weights = Path(served_root) / ADAPTER_WEIGHTS
    if served_weights.is_file():
        from assistant.tuning.registry import sha256_file

        expected = sha256 or sha256_file(Path(folder) / ADAPTER_WEIGHTS)
        return sha256_file(served_weights) == expected
    return served_root.rstrip("/") == folder.rstrip("/")


def _active_adapters(registry: Any) -> dict[str, tuple[str, str | None]]:
    """Normalise the registry argument to {name: (folder, weights sha256 or None)}."""
    if isinstance(registry, Mapping):
        return {str(name): (str(path), None) for name, path in registry.items()}
    if isinstance(registry, (str, Path)):
        from assistant.tuning.registry import AdapterRegistry

        registry = AdapterRegistry(Path(registry))
    if not hasattr(registry, "active_entries"):
        raise TypeError(
            "registry must be an AdapterRegistry, an adapters folder, or a mapping of name to folder"
        )
    return {
        entry["name"]: (str(registry.folder(entry)), entry.get("files", {}).get(ADAPTER_WEIGHTS))
        for entry in registry.active_entries()
    }


def _audit_change(
    audit: Any,
    user: str,
    url: str,
    base_id: str | None,
    action: str,
    name: str,
    path: str,
    sha256: str | None,
) -> None:
    if audit is None:
        return
    audit.record(
        kind="adapter_change",
        user=user,
        question=f"{action} adapter {name}",
        answer=f"vLLM at {url} {action}ed adapter {name} from {path}",
        abstained=False,
        retrieved=[],
        index_version=None,
        model=base_id,
        model_fingerprint=None,
        adapter={"name": name, "sha256": sha256},
        backend="vllm",
        generation={"action": action, "path": path, "url": url},
        citations=[],
        flags=[],
        timings={},
    )
