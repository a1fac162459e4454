"""vLLM's own tool parsers for a server backend: ``tool_parsers: {default: hermes}`` in the server config.

By default the server parses a reply's tool calls with budgetlm's ``<tool_call>`` parser
(:func:`budgetlm.tools.parse_tool_calls`).  A backend that runs in-process vLLM can instead use one of
vLLM's registered tool parsers (``vllm.tool_parsers.ToolParserManager``: ``hermes``, ``qwen3_json``,
``llama3_json``, ``mistral``, ...), the same code ``vllm serve --tool-call-parser NAME`` runs, built on the
backend's own tokenizer: :meth:`EngineToolParser.parse` hands it the reply and the request's tools
(as vLLM's ``ChatCompletionRequest``) and turns its ``ExtractedToolCallInformation`` into budgetlm's
:class:`~budgetlm.tools.ToolCall` s, so voting, charging and the response are the same for both parsers.

**Where it applies.**  budgetlm renders the tools and earlier calls in the Hermes format
(``<tool_call>{...}</tool_call>``, :mod:`budgetlm.server.tools`), and a forced call starts with
``<tool_call>``; so parsers of that format (``hermes``, ``qwen3_json``, ...) fit any model, and a
parser of another format only fits a model that answers in it regardless of the prompt.  Rendering the
tools with the model's own chat template is not done yet.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import TYPE_CHECKING

from budgetlm.errors import ConfigError, MissingDependency
from budgetlm.tools import ToolCall

if TYPE_CHECKING:
    from budgetlm.backends.base import Backend

__all__ = ["EngineToolParser", "parser_names"]

Parse = Callable[[str], tuple[str, list[ToolCall]]]


def parser_names() -> list[str]:
    """The tool parsers vLLM registers (empty without vLLM)."""
    try:
        from vllm.tool_parsers import ToolParserManager
    except ImportError:
        return []
    return list(ToolParserManager.list_registered())


class EngineToolParser:
    """One vLLM tool parser on a backend's tokenizer (built once per server; :meth:`parse` is per reply)."""

    def __init__(self, name: str, tokenizer: object) -> None:
        try:
            from vllm.tool_parsers import ToolParserManager
        except ImportError as exc:
            raise MissingDependency("vllm", "tool_parsers", extra="cpu") from exc
        names = ToolParserManager.list_registered()
        if name not in names:
            raise ConfigError(f"`tool_parsers` values must be vLLM tool parsers ({', '.join(names)}), got {name!r}")
        self.name = name
        self._cls = ToolParserManager.get_tool_parser(name)
        self._tokenizer = tokenizer

    @classmethod
    def for_backend(cls, name: str, backend: Backend, backend_name: str) -> EngineToolParser:
        """The parser ``name`` on ``backend``'s tokenizer (an in-process vLLM backend)."""
        tok = getattr(backend, "_tok", None)
        if tok is None or not hasattr(backend, "llm"):
            raise ConfigError(f"`tool_parsers.{backend_name}` needs an in-process vLLM backend (vllm:...), got "
                              f"{type(backend).__name__}; remove the entry to use budgetlm's <tool_call> parser")
        return cls(name, tok)

    def parse(self, text: str, tools: list[dict[str, object]]) -> tuple[str, list[ToolCall]]:
        """``(content, calls)`` of a reply, by the vLLM parser (calls whose arguments are not a JSON object are
        dropped, as budgetlm's parser drops them)."""
        from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest

        request = ChatCompletionRequest(model="budgetlm", messages=[{"role": "user", "content": ""}], tools=tools,
                                        tool_choice="auto")
        parser = self._cls(self._tokenizer, request.tools)
        info = parser.extract_tool_calls(text, request)
        calls: list[ToolCall] = []
        for tc in info.tool_calls if info.tools_called else []:
            try:
                args = json.loads(tc.function.arguments or "{}")
            except ValueError:
                continue
            if isinstance(args, dict) and tc.function.name:
                calls.append(ToolCall(tc.function.name, args))
        content = info.content if info.content is not None else ("" if calls else text)
        return content.strip(), calls
