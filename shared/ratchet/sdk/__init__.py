"""Ratchet's SDK: serve the task prompts Ratchet improves, and report the runs of an agent that
runs in your own application.

    from ratchet.sdk import Ratchet

    ratchet = await Ratchet.connect(["nats://ratchet:4222"], app="shop", password=...)
    served = ratchet.prompt("qa", key=user_id)  # microseconds: followed and cached in memory
    answer = await my_agent(system=served.system, question=question)
    ratchet.report(task="qa", input=question, output=answer, prompt=served)  # queued, not sent
    await ratchet.close()  # delivers what is queued

This package needs only nats-py and pydantic (``pip install ratchet``, no extra); the LangChain
callback (:meth:`Ratchet.tracer`, :mod:`ratchet.sdk.langchain`) also needs langchain-core
(``pip install 'ratchet[langchain]'``) and is imported only when used.
"""

from ratchet.sdk.client import AppSettings, Ratchet, RatchetUnavailable, Stats
from ratchet.sdk.report import ReportError, Trace, build_report
from ratchet.sdk.served import Prompt, PromptCache

__all__ = [
    "AppSettings",
    "Prompt",
    "PromptCache",
    "Ratchet",
    "RatchetUnavailable",
    "ReportError",
    "Stats",
    "Trace",
    "build_report",
]
