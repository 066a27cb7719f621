"""The model-name rule: which names the repository API accepts before anything touches the filesystem.

A model name becomes a folder name (``<repository>/<name>``, or ``<tmp>/<name>`` for a load with
``file:`` parameters), so it must be exactly one safe path component. The accepted set is ASCII
letters, digits, ``_``, ``-`` and ``.``, starting with a letter, digit or ``_``, at most 128
characters (no ``.``/``..``, no separators, no NUL, no hidden-file names).
"""

from __future__ import annotations

import re

from .errors import invalid

MAX_LENGTH = 128
_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.\-]{0,%d}" % (MAX_LENGTH - 1))


def check_model_name(name: str, action: str = "load") -> str:
    """Return ``name`` when it is a valid model name; raise INVALID_ARGUMENT naming the rule otherwise."""
    if not isinstance(name, str) or _NAME.fullmatch(name) is None:
        shown = repr(name) if isinstance(name, str) and len(name) <= MAX_LENGTH else "the given name"
        raise invalid(
            f"failed to {action} model {shown}: a model name is one folder name of 1-{MAX_LENGTH} characters "
            "from A-Z a-z 0-9 _ - . that starts with a letter, digit or '_' (no '/', '\\', '..' or NUL)"
        )
    return name
