"""Chat messages -> one prompt, for models whose tokenizer has no chat template of its own.

The plain template (documented in docs/llm.md): each message as ``<|role|>`` on its own line, then
its content and a newline; the prompt ends with ``<|assistant|>`` and a newline, where the model's
answer begins. Both the OpenAI routes (for models that take only ``text_input``) and the llm backend
(for tokenizers without ``chat_template``) use it, so a conversation reads the same either way.
"""

from __future__ import annotations

from typing import Any

from .errors import invalid

ROLES = ("system", "developer", "user", "assistant", "tool")


def message_text(content: Any, where: str) -> str:
    """A message's content: a string, or OpenAI's list of parts of which only text parts are accepted."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = []
        for part in content:
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise invalid(f"{where}: only text content parts are supported ({{'type': 'text', 'text': ...}})")
            texts.append(part["text"])
        return "".join(texts)
    if content is None:
        return ""
    raise invalid(f"{where}: 'content' must be a string or a list of text parts")


def normalize(messages: Any) -> list[dict[str, str]]:
    """Validated ``[{role, content}]`` with string contents; INVALID_ARGUMENT names the bad message."""
    if not isinstance(messages, list) or not messages:
        raise invalid("'messages' must be a non-empty list of {'role', 'content'} objects")
    out = []
    for i, message in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(message, dict):
            raise invalid(f"{where} must be an object with 'role' and 'content'")
        role = message.get("role")
        if role not in ROLES:
            raise invalid(f"{where}: 'role' must be one of {', '.join(ROLES)}, got {role!r}")
        out.append({"role": role, "content": message_text(message.get("content"), where)})
    return out


def plain_prompt(messages: list[dict[str, str]]) -> str:
    return "".join(f"<|{m['role']}|>\n{m['content']}\n" for m in messages) + "<|assistant|>\n"
