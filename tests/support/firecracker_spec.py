"""Firecracker's published API specifications (tests/data/firecracker/*.yaml) as request validators.

A request conforms when its method and path name an operation of the spec and its JSON body validates
against that operation's body schema. Two tightenings over the bare Swagger 2.0 text, both matching what
Firecracker itself does: objects reject properties the spec does not list (Firecracker deserializes with
serde's deny_unknown_fields, so an unknown field is a 400 on the real thing, and a field that only a newer
release knows must fail against the older spec), and a path id must equal the body's id of the same name
(Firecracker answers 400 when /drives/a carries {"drive_id": "b"}).
"""

from __future__ import annotations

import copy
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from jsonschema import Draft4Validator

SPEC_FILES = ("firecracker-api-v1.13.2.yaml", "firecracker-api-v1.16.1.yaml")
REPO_ROOT = Path(__file__).resolve().parents[2]
SPEC_DIR = REPO_ROOT / "tests" / "data" / "firecracker"  # copies of the published files, unmodified


def spec_dir() -> Path:
    missing = [name for name in SPEC_FILES if not (SPEC_DIR / name).is_file()]
    if missing:
        raise FileNotFoundError(f"missing Firecracker API specifications in {SPEC_DIR}: {', '.join(missing)}")
    return SPEC_DIR


@dataclass(frozen=True)
class Operation:
    method: str
    template: str
    pattern: re.Pattern[str]
    body: Draft4Validator | None
    body_required: bool


class Spec:
    def __init__(self, path: Path) -> None:
        # libyaml when present: the pure-Python parser takes a second per file, paid by every fake process.
        doc = yaml.load(path.read_text(), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
        if doc.get("swagger") != "2.0":
            raise ValueError(f"{path}: not a Swagger 2.0 document")
        self.path = path
        self.version: str = str(doc["info"]["version"])
        definitions = _strict(copy.deepcopy(doc.get("definitions", {})))
        Draft4Validator.check_schema({"definitions": definitions})  # once: it costs ~25 ms a call
        self.operations: list[Operation] = []
        for template, item in doc["paths"].items():
            for method, op in item.items():
                if method not in ("get", "put", "patch", "post", "delete"):
                    continue
                body = next((prm for prm in op.get("parameters", []) if prm.get("in") == "body"), None)
                validator = None
                if body is not None:
                    schema = {**_strict(copy.deepcopy(body["schema"])), "definitions": definitions}
                    validator = Draft4Validator(schema)
                # Path parameters match one non-empty segment, as in Firecracker's router.
                regex = "^" + re.sub(r"\\\{(\w+)\\\}", r"(?P<\1>[^/]+)", re.escape(template)) + "$"
                self.operations.append(Operation(method.upper(), template, re.compile(regex), validator,
                                                 bool(body and body.get("required"))))

    def __repr__(self) -> str:
        return f"Spec({self.version})"

    def violations(self, method: str, path: str, body: Any) -> list[str]:
        """Everything wrong with one request, as sentences; an empty list means it conforms."""
        for op in self.operations:
            match = op.pattern.match(path)
            if op.method == method.upper() and match:
                return self._check_body(op, match.groupdict(), body)
        return [f"{method} {path}: no such operation in Firecracker {self.version}"]

    def _check_body(self, op: Operation, params: dict[str, str], body: Any) -> list[str]:
        where = f"{op.method} {op.template}"
        if op.body is None:
            return [f"{where} takes no body in {self.version}"] if body is not None else []
        if body is None:
            return [f"{where} needs a body in {self.version}"] if op.body_required else []
        problems = [f"{where} body{''.join(f'[{p!r}]' for p in err.absolute_path)}: {err.message}"
                    for err in sorted(op.body.iter_errors(body), key=lambda e: list(map(str, e.absolute_path)))]
        for name, value in params.items():
            if isinstance(body, dict) and name in body and body[name] != value:
                problems.append(f"{where}: path {name}={value!r} but body {name}={body[name]!r}")
        return problems


def _strict(schema: Any) -> Any:
    """Add additionalProperties: false to every object schema that lists properties and says nothing else."""
    if isinstance(schema, dict):
        for value in schema.values():
            _strict(value)
        if "properties" in schema and "additionalProperties" not in schema:
            schema["additionalProperties"] = False
    elif isinstance(schema, list):
        for value in schema:
            _strict(value)
    return schema


def load_specs() -> list[Spec]:
    directory = spec_dir()
    return [Spec(directory / name) for name in SPEC_FILES]
