"""Chat format of the default model: template rendering, incremental token building, masks.

The central property (DESIGN.md invariants 1 and 2): a conversation tokenised incrementally (prompt,
sampled turns, inserted observations) decodes to exactly what the chat template renders for the same
conversation, and the mask is 1 exactly on the assistant's tokens.
"""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tirl.chat.format import ChatFormat, builtin_template, load_chat_format, template_supports_tools
from tirl.chat.hermes import render_tool_call
from tirl.errors import ConfigError
from tirl.types import Message, ToolCall

CALC = {"type": "function", "function": {"name": "calculator", "description": "Evaluate an expression.",
                                          "parameters": {"type": "object",
                                                         "properties": {"expression": {"type": "string"}},
                                                         "required": ["expression"]}}}


def _conversation(question: str, expressions: list[str], results: list[str], answer: str) -> list[Message]:
    msgs = [Message("system", "Solve it."), Message("user", question)]
    for k, (e, r) in enumerate(zip(expressions, results)):
        call = ToolCall(f"c{k}", "calculator", {"expression": e})
        msgs += [Message("assistant", "", tool_calls=(call,)), Message("tool", r, tool_call_id=f"c{k}", name="calculator")]
    msgs.append(Message("assistant", answer))
    return msgs


def test_default_model_gets_tirl_tool_template(smol_tokenizer, smol_format):
    assert not template_supports_tools(smol_tokenizer, smol_tokenizer.chat_template)  # SmolLM2 ignores tools=
    assert smol_format.name == "chatml-tools"
    assert template_supports_tools(smol_tokenizer, smol_format.template)


def test_prompt_shows_tools_and_ends_with_generation_prompt(smol_format):
    text = smol_format.render([Message("system", "S"), Message("user", "Q")], [CALC], add_generation_prompt=True)
    assert '"name": "calculator"' in text and "<tool_call>" in text
    assert text.endswith("<|im_start|>assistant\n")
    assert smol_format.decode(smol_format.prompt_ids([Message("user", "Q")], [CALC])) == \
        smol_format.render([Message("user", "Q")], [CALC], add_generation_prompt=True)


def test_observation_text_with_and_without_sampled_eos(smol_format):
    tool = Message("tool", "178377", tool_call_id="c0", name="calculator")
    assert smol_format.observation_text([tool], sampled_eos=False) == \
        "<|im_end|>\n<|im_start|>tool\n178377<|im_end|>\n<|im_start|>assistant\n"
    assert smol_format.observation_text([tool], sampled_eos=True) == \
        "\n<|im_start|>tool\n178377<|im_end|>\n<|im_start|>assistant\n"


def test_assistant_text_is_the_compact_hermes_call(smol_format):
    call = ToolCall("c0", "calculator", {"expression": "4821 * 37"})
    assert smol_format.assistant_text(Message("assistant", "", tool_calls=(call,))) == render_tool_call(call)
    assert smol_format.assistant_text(Message("assistant", "<answer>5</answer>")) == "<answer>5</answer>"


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(question=st.text(alphabet=st.characters(blacklist_categories=("Cs", "Cc", "Cn", "Co")), min_size=1, max_size=40),
       exprs=st.lists(st.from_regex(r"\(?[0-9]{1,4} [-+*/] [0-9]{1,4}\)?", fullmatch=True), min_size=0, max_size=3),
       answer=st.from_regex(r"<answer>-?[0-9]{1,7}</answer>", fullmatch=True))
def test_incremental_tokens_equal_template_render(smol_format, question, exprs, answer):
    results = [str(len(e)) for e in exprs]
    msgs = _conversation(question, exprs, results, answer)
    seq = smol_format.sft_sequence(msgs, [CALC])
    full_text = smol_format.render(msgs, [CALC])
    # the template closes the final turn with "<|im_end|>\n"; the rollout stops at the eos token
    assert smol_format.decode(seq.prompt_ids + seq.response_ids) + "\n" == full_text
    # masked-in tokens decode to the assistant turns exactly (the eos of the last turn included)
    trained = [t for t, m in zip(seq.response_ids, seq.loss_mask) if m]
    expected = "".join(smol_format.assistant_text(m) for m in msgs if m.role == "assistant") + "<|im_end|>"
    assert smol_format.decode(trained) == expected
    # and nothing of the tool outputs is trained on
    inserted = smol_format.decode([t for t, m in zip(seq.response_ids, seq.loss_mask) if not m])
    for r in results:
        assert r in inserted


def test_tool_output_tokens_are_masked(smol_format):
    msgs = _conversation("What is 2*3?", ["2*3"], ["6"], "<answer>6</answer>")
    seq = smol_format.sft_sequence(msgs, [CALC])
    masked_out = smol_format.decode([t for t, m in zip(seq.response_ids, seq.loss_mask) if m == 0])
    assert masked_out == "<|im_end|>\n<|im_start|>tool\n6<|im_end|>\n<|im_start|>assistant\n"


def test_sft_sequence_rejects_conversations_without_final_assistant(smol_format):
    with pytest.raises(ValueError):
        smol_format.sft_sequence([Message("user", "q")], None)
    with pytest.raises(ValueError):
        smol_format.sft_sequence([Message("user", "q"), Message("assistant", "a"), Message("tool", "x")], None)


def test_template_that_rerenders_history_is_refused(smol_tokenizer):
    # a template that writes the number of messages first is not prefix-stable
    bad = "{{ messages|length }}" + builtin_template("chatml-tools")
    fmt = ChatFormat(smol_tokenizer, bad, "bad")
    with pytest.raises(ConfigError, match="not prefix-stable"):
        fmt.observation_text([Message("tool", "1")], sampled_eos=False)


def test_load_chat_format_choices(smol_tokenizer, tmp_path):
    assert load_chat_format(smol_tokenizer, "chatml-tools").name == "chatml-tools"
    assert load_chat_format(smol_tokenizer, "model").template == smol_tokenizer.chat_template
    with pytest.raises(ConfigError, match="no such file"):
        load_chat_format(smol_tokenizer, str(tmp_path / "missing.jinja"))
    with pytest.raises(ConfigError, match="unknown built-in chat template"):
        load_chat_format(smol_tokenizer, "nope")
    path = tmp_path / "t.jinja"
    path.write_text(builtin_template("chatml-tools"))
    assert load_chat_format(smol_tokenizer, str(path)).name == "t.jinja"
