"""Messages <-> tokens for one model: its chat template, tool-call syntax and end-of-turn tokens.

The token sequence of a trajectory is built incrementally (DESIGN.md invariants 1 and 2):

    prompt_ids(messages, tools)                  rendered by the template, mask 0
    + tokens the model sampled                   kept exactly as sampled, mask 1
    + observation_ids(tool messages, ...)        what the template puts between that turn and the
                                                 next assistant turn, mask 0
    + tokens the model sampled ...

Nothing the model sampled is ever re-tokenised. The pieces the environment inserts are derived from
the template itself by rendering probe conversations, so SFT (`sft_ids`), RL and eval all see the
same bytes the template would produce.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from importlib import resources
from pathlib import Path
from typing import Any

from tirl.chat.hermes import ParsedCall, parse_tool_calls
from tirl.errors import ConfigError
from tirl.types import Message

_PROBE = "\x00tirl-probe\x00"
_PROBE_TOOLS = [{"type": "function", "function": {
    "name": "probe_tool", "description": "Probe.",
    "parameters": {"type": "object", "properties": {"x": {"type": "string"}}, "required": ["x"]}}}]


def builtin_template(name: str) -> str:
    """Text of a template shipped with tirl (`chatml-tools`)."""
    file = resources.files("tirl.chat").joinpath("templates").joinpath(name.replace("-", "_") + ".jinja")
    if not file.is_file():
        raise ConfigError(f"unknown built-in chat template {name!r}; valid: chatml-tools")
    return file.read_text()


@dataclass(frozen=True)
class SFTSequence:
    """A conversation tokenised the way a rollout would have produced it."""

    prompt_ids: tuple[int, ...]
    response_ids: tuple[int, ...]
    loss_mask: tuple[int, ...]


class ChatFormat:
    """Renders and parses conversations for one tokenizer + chat template (Hermes tool calls)."""

    def __init__(self, tokenizer: Any, template: str, name: str):
        self.tokenizer = tokenizer
        self.template = template
        self.name = name
        eos = tokenizer.eos_token_id
        if eos is None:
            raise ConfigError("the tokenizer has no eos token; tirl needs one to end assistant turns")
        self.eos_token_id: int = int(eos)
        self.eos_text: str = tokenizer.convert_ids_to_tokens(self.eos_token_id)

    # ----------------------------------------------------------------- rendering
    def render(self, messages: list[Message] | list[dict], tools: list[dict] | None = None,
               add_generation_prompt: bool = False) -> str:
        """The template's text for `messages` (assistant content rendered raw, tool calls included)."""
        dicts = [m.to_openai() if isinstance(m, Message) else m for m in messages]
        return self.tokenizer.apply_chat_template(
            dicts, tools=tools or None, chat_template=self.template, tokenize=False,
            add_generation_prompt=add_generation_prompt)

    def encode(self, text: str) -> list[int]:
        """Token ids of `text` with no special tokens added (markup in the text is recognised)."""
        return list(self.tokenizer.encode(text, add_special_tokens=False))

    def decode(self, ids: list[int] | tuple[int, ...]) -> str:
        """Text of `ids`, special tokens kept."""
        return self.tokenizer.decode(list(ids), skip_special_tokens=False)

    def prompt_ids(self, messages: list[Message], tools: list[dict] | None) -> list[int]:
        """Tokens of the prompt, ending with the generation prompt of the first assistant turn."""
        return self.encode(self.render(messages, tools, add_generation_prompt=True))

    @cached_property
    def _turn_closing(self) -> str:
        """What the template writes after an assistant message's content (e.g. '<|im_end|>\\n')."""
        text = self.render([Message("user", "u"), Message("assistant", _PROBE)])
        return text[text.rindex(_PROBE) + len(_PROBE):]

    def observation_text(self, observations: list[Message], sampled_eos: bool) -> str:
        """Text inserted after an assistant turn: its closing (minus the eos the model already
        sampled), the observation messages, and the next assistant generation prompt."""
        head = [Message("user", "u"), Message("assistant", _PROBE)]
        before = self.render(head)
        after = self.render(head + list(observations), add_generation_prompt=True)
        if not after.startswith(before):
            raise ConfigError(f"chat template {self.name!r} is not prefix-stable: appending tool messages "
                              "re-renders earlier turns, so token-in/token-out training is impossible with it")
        closing = self._turn_closing
        if sampled_eos:
            if not closing.startswith(self.eos_text):
                raise ConfigError(f"chat template {self.name!r} does not close assistant turns with the eos "
                                  f"token {self.eos_text!r}")
            closing = closing[len(self.eos_text):]
        return closing + after[len(before):]

    def observation_ids(self, observations: list[Message], sampled_eos: bool) -> list[int]:
        """Tokens of `observation_text` (mask 0 in the trajectory)."""
        return self.encode(self.observation_text(observations, sampled_eos))

    def assistant_text(self, message: Message) -> str:
        """How the template writes an assistant message's content and tool calls (SFT targets)."""
        head = [Message("user", "u")]
        before = self.render(head, add_generation_prompt=True)
        full = self.render(head + [message])
        closing = self._turn_closing
        if not full.startswith(before) or not full.endswith(closing):
            raise ConfigError(f"chat template {self.name!r} renders assistant turns in a way tirl cannot split")
        return full[len(before):len(full) - len(closing)]

    # ----------------------------------------------------------------- parsing
    def parse(self, text: str, id_prefix: str = "call") -> list[ParsedCall]:
        """Tool-call blocks in an assistant output."""
        return parse_tool_calls(text, id_prefix)

    @property
    def tool_call_stop(self) -> str:
        """Generation stops when this string has been produced (end of a tool call)."""
        return "</tool_call>"

    # ----------------------------------------------------------------- SFT
    def sft_sequence(self, messages: list[Message], tools: list[dict] | None) -> SFTSequence:
        """Tokenise a finished conversation exactly as a rollout would have built it.

        `messages` = prompt messages (system/user), then alternating assistant turns and tool messages,
        ending with an assistant turn. Assistant turns that call tools end at the tool-call stop (no eos);
        the final assistant turn ends with the eos token, which is trained on.
        """
        first = next((i for i, m in enumerate(messages) if m.role == "assistant"), None)
        if first is None or messages[-1].role != "assistant":
            raise ValueError("an SFT conversation needs at least one assistant turn and must end with one")
        prompt = self.prompt_ids(messages[:first], tools)
        response: list[int] = []
        mask: list[int] = []
        i = first
        while i < len(messages):
            msg = messages[i]
            if msg.role != "assistant":
                raise ValueError(f"message {i}: expected an assistant turn, got {msg.role!r}")
            j = i + 1
            while j < len(messages) and messages[j].role == "tool":
                j += 1
            final = j == len(messages)
            ids = self.encode(self.assistant_text(msg)) + ([self.eos_token_id] if final else [])
            response += ids
            mask += [1] * len(ids)
            if not final:
                obs = self.observation_ids(messages[i + 1:j], sampled_eos=False)
                response += obs
                mask += [0] * len(obs)
            i = j
        return SFTSequence(tuple(prompt), tuple(response), tuple(mask))


def template_supports_tools(tokenizer: Any, template: str) -> bool:
    """True when rendering with `tools=` changes the output (the template shows tools to the model)."""
    msgs = [{"role": "user", "content": "u"}]
    plain = tokenizer.apply_chat_template(msgs, chat_template=template, tokenize=False)
    with_tools = tokenizer.apply_chat_template(msgs, tools=_PROBE_TOOLS, chat_template=template, tokenize=False)
    return plain != with_tools and "probe_tool" in with_tools


def load_chat_format(tokenizer: Any, setting: str = "auto") -> ChatFormat:
    """Pick the chat template: `auto`, `model`, `chatml-tools`, or a path to a .jinja file.

    `auto` uses the model's own template when it renders tools, otherwise tirl's `chatml-tools` for
    ChatML models; anything else is an error naming the fix (DESIGN.md invariant 3).
    """
    own = getattr(tokenizer, "chat_template", None)
    if setting == "auto":
        if own and template_supports_tools(tokenizer, own):
            return ChatFormat(tokenizer, own, "model")
        if own and "<|im_start|>" in own:
            return ChatFormat(tokenizer, builtin_template("chatml-tools"), "chatml-tools")
        raise ConfigError("the model's chat template has no tool support and is not ChatML; set "
                          "model.chat_template to a .jinja file that renders tools and tool calls")
    if setting == "model":
        if not own:
            raise ConfigError("model.chat_template=model, but the tokenizer has no chat template")
        return ChatFormat(tokenizer, own, "model")
    if setting.endswith(".jinja"):
        path = Path(setting)
        if not path.is_file():
            raise ConfigError(f"model.chat_template: no such file {setting!r}")
        return ChatFormat(tokenizer, path.read_text(), path.name)
    return ChatFormat(tokenizer, builtin_template(setting), setting)
