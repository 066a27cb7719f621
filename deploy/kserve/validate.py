#!/usr/bin/env python3
"""Check KServe manifests against the KServe Python SDK's model classes (kserve==0.21.0).

    python deploy/kserve/validate.py                    # every deploy/kserve/*.yaml
    python deploy/kserve/validate.py a.yaml b.yaml      # these files

Each YAML document is built into its SDK class (V1alpha1ClusterServingRuntime,
V1alpha1ServingRuntime, V1beta1InferenceService) field by field: a key the class (or a nested
Kubernetes class such as V1Container) does not declare, a value of the wrong type, or a missing
required field is reported with its path. The SDK's own deserializer silently drops unknown keys,
which would hide a misspelled field; this one does not. Exit status 1 when anything is wrong;
``--json`` prints the findings as JSON.

Run it in its own process: kserve registers its own copy of the v2 protos (package ``inference``),
which clashes with tritonclient's and inferd's in one protobuf descriptor pool.
"""

from __future__ import annotations

import argparse
import datetime
import json
import re
import sys
from pathlib import Path

import yaml

KINDS = {
    ("serving.kserve.io/v1alpha1", "ClusterServingRuntime"): "V1alpha1ClusterServingRuntime",
    ("serving.kserve.io/v1alpha1", "ServingRuntime"): "V1alpha1ServingRuntime",
    ("serving.kserve.io/v1beta1", "InferenceService"): "V1beta1InferenceService",
}


class Builder:
    """Builds SDK model objects from plain YAML data, collecting every problem with its path."""

    def __init__(self) -> None:
        import kserve.models
        import kubernetes.client.models

        self._modules = (kserve.models, kubernetes.client.models)
        self.errors: list[str] = []

    def _class(self, name: str):
        for module in self._modules:
            klass = getattr(module, name, None)
            if klass is not None:
                return klass
        raise LookupError(f"no SDK class named {name}")

    def build(self, data, type_name: str, path: str):
        if data is None:
            return None
        # the SDKs spell containers both ways: list[X] / List[X], dict(str, X) / Dict[str, X]
        match = re.fullmatch(r"[lL]ist\[(.*)\]", type_name)
        if match:
            if not isinstance(data, list):
                return self._fail(path, f"expected a list, got {type(data).__name__}")
            return [self.build(item, match.group(1), f"{path}[{i}]") for i, item in enumerate(data)]
        match = re.fullmatch(r"dict\(str, (.*)\)|Dict\[str, (.*)\]", type_name)
        if match:
            if not isinstance(data, dict):
                return self._fail(path, f"expected a mapping, got {type(data).__name__}")
            inner = match.group(1) or match.group(2)
            return {k: self.build(v, inner, f"{path}.{k}") for k, v in data.items()}
        primitive = self._primitive(data, type_name, path)
        if primitive is not NotImplemented:
            return primitive
        return self._model(data, self._class(type_name), path)

    def _primitive(self, data, type_name: str, path: str):
        if type_name == "object":  # IntOrString and friends
            return data
        if type_name in ("str", "bytes"):
            return data if isinstance(data, str) else self._fail(path, f"expected a string, got {data!r}")
        if type_name == "int":
            ok = isinstance(data, int) and not isinstance(data, bool)
            return data if ok else self._fail(path, f"expected an integer, got {data!r}")
        if type_name == "float":
            ok = isinstance(data, (int, float)) and not isinstance(data, bool)
            return data if ok else self._fail(path, f"expected a number, got {data!r}")
        if type_name == "bool":
            return data if isinstance(data, bool) else self._fail(path, f"expected true/false, got {data!r}")
        if type_name in ("datetime", "date"):
            ok = isinstance(data, (str, datetime.date))
            return data if ok else self._fail(path, f"expected a timestamp, got {data!r}")
        if type_name == "ResourceQuantity":  # kserve's alias for Kubernetes quantities
            ok = isinstance(data, (str, int, float)) and not isinstance(data, bool)
            return data if ok else self._fail(path, f"expected a quantity, got {data!r}")
        return NotImplemented

    def _model(self, data, klass, path: str):
        if not isinstance(data, dict):
            return self._fail(path, f"expected a mapping for {klass.__name__}, got {type(data).__name__}")
        by_json = {json_key: attr for attr, json_key in klass.attribute_map.items()}
        before = len(self.errors)
        kwargs = {}
        for key, value in data.items():
            attr = by_json.get(key)
            if attr is None:
                self._fail(f"{path}.{key}", f"{klass.__name__} has no field '{key}'")
                continue
            kwargs[attr] = self.build(value, klass.openapi_types[attr], f"{path}.{key}")
        if len(self.errors) > before:
            return None  # reported below; building this level would only repeat it
        try:
            return klass(**kwargs)  # the SDK's own checks: required fields, types, enum values
        except (ValueError, TypeError) as exc:
            # pydantic (kubernetes models) explains over several lines; keep the facts on one
            lines = [ln.strip() for ln in str(exc).splitlines()
                     if ln.strip() and "errors.pydantic.dev" not in ln]
            return self._fail(path, f"{klass.__name__}: {'; '.join(lines)}")

    def _fail(self, path: str, message: str) -> None:
        self.errors.append(f"{path}: {message}")
        return None


def check_document(doc, where: str) -> list[str]:
    if not isinstance(doc, dict):
        return [f"{where}: not a mapping"]
    key = (doc.get("apiVersion"), doc.get("kind"))
    if key not in KINDS:
        known = ", ".join(f"{a} {k}" for a, k in KINDS)
        return [f"{where}: unsupported apiVersion/kind {key[0]} {key[1]} (known: {known})"]
    builder = Builder()
    builder.build(doc, KINDS[key], doc["kind"])
    return [f"{where}: {e}" for e in builder.errors]


def check_files(paths: list[Path]) -> dict[str, list[str]]:
    """File -> problems (empty list when the file is valid)."""
    result: dict[str, list[str]] = {}
    for path in paths:
        problems: list[str] = []
        try:
            docs = list(yaml.safe_load_all(path.read_text()))
        except yaml.YAMLError as exc:
            docs, problems = [], [f"{path.name}: YAML does not parse: {exc}"]
        docs = [d for d in docs if d is not None]
        if not docs and not problems:
            problems.append(f"{path.name}: no YAML document")
        for i, doc in enumerate(docs):
            problems += check_document(doc, f"{path.name}#{i}")
        result[str(path)] = problems
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("files", nargs="*", type=Path)
    parser.add_argument("--json", action="store_true", help="print {file: [problems]} as JSON")
    args = parser.parse_args(argv)
    files = args.files or sorted(Path(__file__).resolve().parent.glob("*.yaml"))
    result = check_files(files)
    if args.json:
        print(json.dumps(result, indent=1))
    else:
        for file, problems in result.items():
            print(f"{'FAIL' if problems else 'ok  '} {file}")
            for p in problems:
                print(f"     {p}")
    return 1 if any(result.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
