"""Reading a model's configuration: config.pbtxt (protobuf text format) or a JSON override.

Unknown fields are reported, not fatal, as Triton does. The text is parsed once by protobuf with
``allow_unknown_field`` (every other error is fatal), and one walk over its tokens against the
ModelConfig descriptor names each unknown field with its line; nothing depends on the wording of
protobuf's error messages.
"""

from __future__ import annotations

import logging
from pathlib import Path

from google.protobuf import json_format, text_format
from google.protobuf.descriptor import Descriptor

from server.core.errors import ErrorCode, ServingError
from server.protos import model_config_pb2 as mc

log = logging.getLogger(__name__)

_OPEN = {"{": "}", "<": ">"}


def _precondition(model: str, message: str) -> ServingError:
    return ServingError(ErrorCode.FAILED_PRECONDITION, f"model '{model}': {message}")


def parse_text(model: str, text: str) -> tuple[mc.ModelConfig, list[str]]:
    """Parse config text; unknown fields are skipped and reported, other errors are fatal."""
    config = mc.ModelConfig()
    try:
        text_format.Parse(text, config, allow_unknown_field=True)
    except text_format.ParseError as exc:
        raise _precondition(model, f"config.pbtxt does not parse: {exc}") from exc
    warnings = [f"unknown field '{name}' ignored (line {line}, in {where})"
                for name, line, where in unknown_fields(text, mc.ModelConfig.DESCRIPTOR)]
    for w in warnings:
        log.warning("model '%s': config.pbtxt: %s", model, w)
    return config, warnings


def unknown_fields(text: str, descriptor: Descriptor) -> list[tuple[str, int, str]]:
    """(name, line, message type) of every field in ``text`` that ``descriptor`` does not declare,
    outermost only (the contents of an unknown field are not looked into). ``text`` must already
    parse with ``allow_unknown_field``: the walk trusts its structure."""
    walk = _Walk(text_format.Tokenizer(text.split("\n")))  # split as text_format.Parse splits it
    walk.fields(descriptor)
    return walk.found


class _Walk:
    """One pass over the tokens, following the descriptor into known message fields."""

    def __init__(self, tokens: text_format.Tokenizer) -> None:
        self.tokens = tokens
        self.found: list[tuple[str, int, str]] = []

    def line(self) -> int:
        # the public way to ask a Tokenizer where it is: the position it would report an error at
        return self.tokens.ParseError("").GetLine()

    def fields(self, descriptor: Descriptor | None) -> None:
        """The fields of one message body, up to its closing bracket (or the end of the text);
        ``descriptor`` None: the body of an unknown field, walked only to get past it."""
        tokens = self.tokens
        while not tokens.AtEnd() and tokens.token not in ("}", ">"):
            line, name = self.line(), tokens.token
            tokens.NextToken()
            field = None
            if descriptor is not None:
                field = descriptor.fields_by_name.get(name)
                if field is None:
                    self.found.append((name, line, descriptor.full_name))
            tokens.TryConsume(":")
            self.value(field.message_type if field is not None else None)
            if not tokens.TryConsume(","):
                tokens.TryConsume(";")

    def value(self, message: Descriptor | None) -> None:
        """One value: a message body, a ``[ ... ]`` list of values, or a scalar (adjacent strings
        are one value, and a sign may stand apart from its number)."""
        tokens = self.tokens
        if tokens.token in _OPEN:
            close = _OPEN[tokens.token]
            tokens.NextToken()
            self.fields(message)
            tokens.TryConsume(close)
        elif tokens.TryConsume("["):
            while not tokens.AtEnd() and not tokens.TryConsume("]"):
                self.value(message)
                tokens.TryConsume(",")
        else:
            tokens.TryConsume("-")
            quoted = tokens.token[:1] in ("'", '"')
            tokens.NextToken()
            while quoted and tokens.token[:1] in ("'", '"'):
                tokens.NextToken()


def read(model_path: Path, override_json: str | None = None) -> tuple[mc.ModelConfig, list[str]]:
    """The model's configuration: an override (ModelConfig JSON), config.pbtxt, or empty."""
    name = model_path.name
    if override_json is not None:
        config = mc.ModelConfig()
        try:
            json_format.Parse(override_json, config)
        except json_format.ParseError as exc:
            raise ServingError(ErrorCode.INVALID_ARGUMENT, f"model '{name}': config override: {exc}") from exc
        return config, []
    path = model_path / "config.pbtxt"
    if not path.exists():
        return mc.ModelConfig(), []
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise _precondition(name, f"cannot read config.pbtxt: {exc}") from exc
    return parse_text(name, text)
