"""A LangChain callback handler that reports one invocation of an app's agent to Ratchet.

Instrumenting a LangGraph app is one line::

    served = ratchet.prompt("qa", key=user_id)
    await graph.ainvoke(
        {"messages": [("system", served.system), ("user", question)]},
        config={"callbacks": [ratchet.tracer(task="qa", prompt=served, expected=answer)]},
    )

The handler records the trace of the invocation it is given to (model steps with their token
usage and timings, tool steps, errors) and, when that invocation ends, reports it with the
prompt version the app served. Needs only ``langchain-core`` (the ``langchain`` extra); ``import
ratchet.sdk`` does not import this module until :meth:`ratchet.sdk.Ratchet.tracer` is called.

It is a plain handler that runs inline (``run_inline``): recording a step is a few dictionary
operations, so there is no reason to hop to a thread, and it works the same under ``invoke``
(where LangGraph may call it from its worker threads) and ``ainvoke``. It does the least it can
per callback (``benchmarks/sdk.py --mode tracer`` measures it): token counts are added up as
integers and validated once, in the report; the model's name is looked up only when the trace
or the report needs it.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any
from uuid import UUID

from langchain_core.callbacks import BaseCallbackHandler
from langchain_core.messages import AIMessage, BaseMessage, HumanMessage, convert_to_messages
from langchain_core.outputs import ChatGeneration, LLMResult

from ratchet.contracts import Check, RunReported, TokenUsage, new_id
from ratchet.sdk.report import Expected, ReportError, Trace
from ratchet.sdk.served import Prompt

if TYPE_CHECKING:
    from ratchet.sdk.client import Ratchet

log = logging.getLogger("ratchet.sdk")

OPEN_STEPS = 1024  # steps started and not ended that one invocation may hold
INPUT_KEYS = ("input", "question", "query")
OUTPUT_KEYS = ("output", "answer", "result")


class RatchetTracer(BaseCallbackHandler):
    """Records one invocation and reports it when it ends. Make one per invocation, with
    :meth:`ratchet.sdk.Ratchet.tracer`. The first run it hears of is the invocation (a
    LangGraph graph, a chain, a bare chat model); its end, or its error, is reported."""

    run_inline = True

    def __init__(
        self,
        client: Ratchet,
        *,
        task: str,
        prompt: Prompt,
        check: Check | Mapping[str, Any] | None = None,
        expected: Expected | None = None,
        input: str | None = None,
        run_id: str | None = None,
        model: str | None = None,
    ) -> None:
        self.client = client
        self.task = task
        self.prompt = prompt
        self.check = check
        self.expected = expected
        self.input = input
        self.run_id = run_id or new_id()
        self.model = model
        self.trace = Trace()
        self._tokens = [0, 0]  # input, output: summed as they come, validated in the report
        self.reported: RunReported | None = None
        self._root: UUID | None = None
        self._started = 0.0
        self._open: dict[UUID, tuple[float, str, str]] = {}  # run id: (start, name, input)
        self._answer = ""  # the last model output: the answer unless the outputs say otherwise
        self._done = False
        self._warned = False

    @property
    def usage(self) -> TokenUsage:
        """The tokens the invocation's model steps used so far."""
        return TokenUsage(input_tokens=self._tokens[0], output_tokens=self._tokens[1])

    def _add_usage(self, input_tokens: Any, output_tokens: Any) -> None:
        if type(input_tokens) is not int or type(output_tokens) is not int:
            usage = TokenUsage(input_tokens=input_tokens, output_tokens=output_tokens)
            input_tokens, output_tokens = usage.input_tokens, usage.output_tokens
        elif input_tokens < 0 or output_tokens < 0:  # refused as TokenUsage refuses it
            TokenUsage(input_tokens=input_tokens, output_tokens=output_tokens)
        self._tokens[0] += input_tokens
        self._tokens[1] += output_tokens

    # --- the invocation -------------------------------------------------------------------------

    def _begin(self, run_id: UUID, name: str, input: str = "") -> None:
        if self._done:
            if run_id != self._root and not self._warned:
                self._warned = True
                log.warning("a tracer reports one invocation; make one per call: not reported")
            return
        now = time.perf_counter()
        if self._root is None:
            self._root, self._started = run_id, now
        if len(self._open) < OPEN_STEPS:
            self._open[run_id] = (now, name, input)

    def _end(self, run_id: UUID) -> tuple[str, str, float] | None:
        """(name, input, milliseconds) of a step that ends, if it was recorded."""
        began = self._open.pop(run_id, None)
        if began is None or self._done:
            return None
        start, name, input = began
        return name, input, (time.perf_counter() - start) * 1000

    def _finish(self, output: str, error: BaseException | None = None) -> None:
        self._done = True
        text = None
        if error is not None:
            self.trace.add("error", type(error).__name__, output=str(error))
            text = f"{type(error).__name__}: {error}"
        try:
            self.reported = self.client.report(
                task=self.task,
                input=self.input or "",
                output=output,
                prompt=self.prompt,
                trace=self.trace,
                usage=self.usage,
                latency_ms=(time.perf_counter() - self._started) * 1000,
                check=self.check,
                expected=self.expected,
                run_id=self.run_id,
                model=self.model or "unknown",
                error=text,
            )
        except (ReportError, RuntimeError) as exc:
            log.error("run %s of task %s not reported: %s", self.run_id, self.task, exc)

    def on_chain_start(
        self,
        serialized: dict[str, Any],
        inputs: dict[str, Any],
        *,
        run_id: UUID,
        parent_run_id: UUID | None = None,
        tags: list[str] | None = None,
        metadata: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        if self._root is None and self.input is None:
            self.input = _input_text(inputs)
        self._begin(run_id, "chain")

    def on_chain_end(
        self,
        outputs: dict[str, Any],
        *,
        run_id: UUID,
        parent_run_id: UUID | None = None,
        **kwargs: Any,
    ) -> None:
        self._open.pop(run_id, None)
        if run_id == self._root and not self._done:
            self._finish(_output_text(outputs, self._answer))

    def on_chain_error(
        self,
        error: BaseException,
        *,
        run_id: UUID,
        parent_run_id: UUID | None = None,
        **kwargs: Any,
    ) -> None:
        self._open.pop(run_id, None)
        if run_id == self._root and not self._done:
            self._finish(self._answer, error)

    # --- model steps ----------------------------------------------------------------------------

    def on_chat_model_start(
        self,
        serialized: dict[str, Any],
        messages: list[list[BaseMessage]],
        *,
        run_id: UUID,
        parent_run_id: UUID | None = None,
        tags: list[str] | None = None,
        metadata: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        self._model_start(serialized, run_id, metadata or {}, kwargs)
        if self._root == run_id and self.input is None:  # a bare chat model invocation
            self.input = _last_human(messages[0] if messages else [])

    def on_llm_start(
        self,
        serialized: dict[str, Any],
        prompts: list[str],
        *,
        run_id: UUID,
        parent_run_id: UUID | None = None,
        tags: list[str] | None = None,
        metadata: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        self._model_start(serialized, run_id, metadata or {}, kwargs)
        if self._root == run_id and self.input is None:
            self.input = prompts[-1] if prompts else ""

    def _model_start(
        self,
        serialized: dict[str, Any] | None,
        run_id: UUID,
        metadata: dict[str, Any],
        kwargs: dict[str, Any],
    ) -> None:
        node = metadata.get("langgraph_node")
        label = ""
        if self.model is None or not node:  # the name is needed
            label = _model_label(serialized, metadata, kwargs)
            if self.model is None and label:
                self.model = label
        self._begin(run_id, str(node or label or "model"))

    def on_llm_end(
        self,
        response: LLMResult,
        *,
        run_id: UUID,
        parent_run_id: UUID | None = None,
        **kwargs: Any,
    ) -> None:
        ended = self._end(run_id)
        if ended is None:
            return
        name, _input, ms = ended
        generation = response.generations[0][0] if response.generations else None
        message = generation.message if isinstance(generation, ChatGeneration) else None
        calls = ""
        if isinstance(message, AIMessage):
            calls = "; ".join(f"{c['name']}({c['args']})" for c in message.tool_calls)
            if message.usage_metadata:
                meta = message.usage_metadata
                self._add_usage(meta.get("input_tokens", 0), meta.get("output_tokens", 0))
            else:
                self._add_usage(*_reported_usage(response))
        else:
            self._add_usage(*_reported_usage(response))
        text = message.text if message is not None else generation.text if generation else ""
        if text:
            self._answer = text
        self.trace.add("model", name, input=calls, output=text, ms=ms)
        if run_id == self._root:
            self._finish(text)

    def on_llm_error(
        self,
        error: BaseException,
        *,
        run_id: UUID,
        parent_run_id: UUID | None = None,
        **kwargs: Any,
    ) -> None:
        self._step_error(run_id, error)

    # --- tool steps -----------------------------------------------------------------------------

    def on_tool_start(
        self,
        serialized: dict[str, Any],
        input_str: str,
        *,
        run_id: UUID,
        parent_run_id: UUID | None = None,
        tags: list[str] | None = None,
        metadata: dict[str, Any] | None = None,
        inputs: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        name = (serialized or {}).get("name") or kwargs.get("name") or "tool"
        if self._root is None and self.input is None:
            self.input = input_str
        self._begin(run_id, str(name), input_str)

    def on_tool_end(
        self,
        output: Any,
        *,
        run_id: UUID,
        parent_run_id: UUID | None = None,
        **kwargs: Any,
    ) -> None:
        ended = self._end(run_id)
        if ended is None:
            return
        name, input, ms = ended
        text = output.text if isinstance(output, BaseMessage) else str(output)
        self.trace.add("tool", name, input=input, output=text, ms=ms)
        if run_id == self._root:
            self._finish(text)

    def on_tool_error(
        self,
        error: BaseException,
        *,
        run_id: UUID,
        parent_run_id: UUID | None = None,
        **kwargs: Any,
    ) -> None:
        self._step_error(run_id, error)

    def _step_error(self, run_id: UUID, error: BaseException) -> None:
        ended = self._end(run_id)
        if ended is None:
            return
        name, input, ms = ended
        self.trace.add("error", name, input=input, output=f"{type(error).__name__}: {error}", ms=ms)
        if run_id == self._root:
            self._finish(self._answer, error)


def _model_label(
    serialized: dict[str, Any] | None, metadata: dict[str, Any], kwargs: dict[str, Any]
) -> str:
    """The model's name as LangChain knows it: its ``ls_model_name``, the model it was invoked
    with, else its class."""
    params = kwargs.get("invocation_params") or {}
    for candidate in (
        metadata.get("ls_model_name"),
        params.get("model"),
        params.get("model_name"),
        (serialized or {}).get("name"),
    ):
        if candidate:
            return str(candidate)
    ids = (serialized or {}).get("id") or []
    return str(ids[-1]) if ids else ""


def _reported_usage(response: LLMResult) -> tuple[int, int]:
    """Token counts (input, output) a provider put in ``llm_output`` instead of on the
    message."""
    usage = (response.llm_output or {}).get("token_usage") or {}
    if not isinstance(usage, Mapping):
        return 0, 0
    return int(usage.get("prompt_tokens") or 0), int(usage.get("completion_tokens") or 0)


def _last_human(messages: Sequence[BaseMessage]) -> str:
    for message in reversed(messages):
        if isinstance(message, HumanMessage):
            return message.text
    return messages[-1].text if messages else ""


def _input_text(inputs: Any) -> str:
    """What the user asked: the last human message of a messages state, else a usual input
    key, else the inputs as text."""
    if isinstance(inputs, str):
        return inputs
    if isinstance(inputs, Mapping):
        if "messages" in inputs:
            messages = inputs["messages"]
            if isinstance(messages, list) and all(isinstance(m, BaseMessage) for m in messages):
                return _last_human(messages)  # what converting them would give, for less
            try:
                return _last_human(convert_to_messages(messages))
            except (ValueError, TypeError, NotImplementedError):
                pass
        for key in INPUT_KEYS:
            if isinstance(inputs.get(key), str):
                return str(inputs[key])
    return str(inputs)


def _output_text(outputs: Any, answer: str) -> str:
    """What the invocation answered: the last AI message of a messages state, else a usual
    output key, else the last model output."""
    if isinstance(outputs, str):
        return outputs
    if isinstance(outputs, BaseMessage):
        return outputs.text
    if isinstance(outputs, Mapping):
        messages = outputs.get("messages")
        if isinstance(messages, Sequence):
            for message in reversed(messages):
                if isinstance(message, AIMessage):
                    return message.text
        for key in OUTPUT_KEYS:
            if isinstance(outputs.get(key), str):
                return str(outputs[key])
    return answer
