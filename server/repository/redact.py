"""Client-facing text without the server's absolute paths (they stay in the log).

Load errors come from many places (config reading, backends, onnxruntime and torch messages,
Python import errors) and often carry the full path of a file. ``public`` rewrites the model's
folder to its name, so a client reads ``simple/1/model.onnx``, and any other absolute path to its
last component behind ``.../``.
"""

from __future__ import annotations

import re
from pathlib import Path

# an absolute path: '/' not preceded by a word character, ':' or '/' (URLs and relative paths stay)
_ABSOLUTE = re.compile(r"(?<![\w.:/~-])/(?:[^\s'\"(),;:/]+/)*([^\s'\"(),;:/]+)/?")


def public(message: str, model_path: Path | None = None, name: str | None = None) -> str:
    if model_path is not None:
        label = name or model_path.name
        roots = {str(model_path), str(model_path.absolute())}
        try:
            roots.add(str(model_path.resolve()))
        except OSError:
            pass
        for root in sorted(roots, key=len, reverse=True):  # longest first: no partial rewrite
            message = message.replace(root, label)
    return _ABSOLUTE.sub(lambda m: ".../" + m.group(1), message)
