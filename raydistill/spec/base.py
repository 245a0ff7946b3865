"""The config layer's common parts: the strict pydantic base, the error class, one YAML loader
with dotted overrides, one validation-error formatter, content hashes and storage URIs."""

from __future__ import annotations

import difflib
import hashlib
import json
import types
import typing
from pathlib import Path

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError


class SpecError(ValueError):
    """A config that cannot run; the message names the file and the field."""


def redact_storage(storage: str) -> str:
    """`storage` with any user:password part of a URI replaced by ***, for messages."""
    from urllib.parse import urlsplit

    parts = urlsplit(storage) if "://" in storage else None
    if parts is None or not (parts.username or parts.password):
        return storage
    return parts._replace(netloc="***@" + parts.netloc.rsplit("@", 1)[1]).geturl()


STORAGE_SCHEMES = ("s3", "gs", "gcs", "hdfs", "viewfs", "abfs", "abfss", "file")  # pyarrow's


def storage_problem(storage: str, connect: bool = True) -> str | None:
    """Why pyarrow cannot use `storage` (a local folder or a URI such as s3://bucket/prefix) for
    checkpoints, or None. Credentials inside the URI are refused: the URI is saved with the run.
    With `connect`, pyarrow opens the file system (an S3 bucket's region is looked up online)."""
    from urllib.parse import urlsplit

    import pyarrow as pa
    import pyarrow.fs

    if "://" in storage:
        parts = urlsplit(storage)
        if parts.username or parts.password:
            return ("holds credentials; remove them from the URI (it is saved with the run) and set them in the "
                    "environment instead (AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, GOOGLE_APPLICATION_CREDENTIALS)")
        if parts.scheme not in STORAGE_SCHEMES:
            return f"unknown scheme {parts.scheme!r}; give a local folder or a URI such as s3://bucket/prefix"
        if parts.scheme != "file" and not parts.netloc:
            return "names no bucket; give s3://bucket/prefix or gs://bucket/prefix"
    if not connect:
        return None
    try:
        pyarrow.fs.FileSystem.from_uri(storage)
    except (pa.ArrowException, ValueError) as err:
        return f"{err}; give a local folder or a URI such as s3://bucket/prefix or gs://bucket/prefix"
    except OSError as err:
        return f"cannot open it ({' '.join(str(err).split())[:300]}); check the bucket, network and credentials"
    return None


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def check_members(field: str, value: list[str], allowed: tuple[str, ...]) -> list[str]:
    unknown = [v for v in value if v not in allowed]
    if unknown:
        raise ValueError(f"unknown {field} {unknown}; choose from {list(allowed)}")
    return value


def content_hash(obj: object) -> str:
    """Stable 16-hex-char hash of a JSON-serialisable object."""
    blob = json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def parse_overrides(items: list[str]) -> dict:
    """`--set a.b=1` pairs, values parsed as YAML (numbers, lists, booleans)."""
    overrides = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise SpecError(f"--set expects KEY=VALUE (e.g. train.epochs=1), got {item!r}")
        try:
            overrides[key] = yaml.safe_load(value)
        except yaml.YAMLError as err:
            raise SpecError(f"--set {item!r}: the value is not valid YAML ({err.__class__.__name__}); "
                            "quote it, e.g. --set 'name=\"a b\"'") from None
    return overrides


def apply_overrides(raw: dict, overrides: dict | None) -> dict:
    """`raw` with each dotted key of `overrides` set (`a.b.c`: the levels that are missing are
    created); the nested mappings it changes are copies, so the caller's `raw` is left as it was."""
    raw = dict(raw)
    for dotted, value in (overrides or {}).items():
        *parents, leaf = dotted.split(".")
        node = raw
        for key in parents:
            child = node.get(key, {})
            if not isinstance(child, dict):
                raise SpecError(f"override {dotted!r}: {key!r} holds {type(child).__name__}, not a mapping of fields")
            node[key] = dict(child)
            node = node[key]
        node[leaf] = value
    return raw


def yaml_problem(err: yaml.YAMLError) -> str:
    """One line: what the YAML parser found and where."""
    mark = getattr(err, "problem_mark", None)
    where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
    problem = getattr(err, "problem", None) or str(err).splitlines()[0]
    return f"{problem}{where}"


def not_a_mapping(source: str, kind: str, model: str, fields: str, value: object) -> SpecError:
    return SpecError(f"{source}: the top level must be a mapping of fields, got {type(value).__name__} (a {kind} "
                     f"config is a mapping of {model} fields: {fields})")


def read_config(path: str | Path, kind: str, model: str, fields: str, overrides: dict | None = None,
                missing_hint: str = "") -> dict:
    """The mapping in a YAML config file with dotted-key overrides applied. Every problem is a
    one-line SpecError naming the file: missing, unreadable, not YAML, not a mapping. `kind`, the
    `model` it becomes and a few of its `fields` word the messages."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise SpecError(f"{path}: no such file; check the path given to --config{missing_hint}") from None
    except (OSError, UnicodeDecodeError) as err:
        reason = " ".join(str(err).split())
        raise SpecError(f"{path}: cannot read the {kind} config ({reason}); pass a readable YAML file") from None
    except yaml.YAMLError as err:
        raise SpecError(f"{path}: not valid YAML: {yaml_problem(err)}; cannot read the {kind} config, fix it "
                        "or pass another file") from None
    raw = {} if raw is None else raw
    if not isinstance(raw, dict):
        raise not_a_mapping(str(path), kind, model, fields, raw)
    return apply_overrides(raw, overrides)


def describe_validation(err: ValidationError, model: type[BaseModel], prefix: str = "") -> str:
    """A pydantic error as one line: "a.b: message" per problem, joined by "; ". An unknown field
    gets the nearest allowed name and the list of the fields allowed where it was found."""
    return "; ".join(_problem(e, model, prefix) for e in err.errors())


def _problem(error: dict, model: type[BaseModel], prefix: str) -> str:
    loc = prefix + (".".join(str(p) for p in error["loc"]) or "(top level)")
    message = error["msg"].removeprefix("Value error, ")
    if error["type"] != "extra_forbidden":
        return f"{loc}: {message}"
    allowed = _fields_at(model, error["loc"][:-1])
    close = difflib.get_close_matches(str(error["loc"][-1]), allowed, n=1)
    hint = f"did you mean '{close[0]}'? " if close else ""
    return f"{loc}: {message}; {hint}allowed here: {', '.join(allowed)}"


def _fields_at(model: type[BaseModel], loc: tuple) -> list[str]:
    """Field names of the (nested) model at `loc`, stepping through optional fields, lists and
    mappings; [] where `loc` is not a model."""
    node: object = model
    for key in loc:
        node = _optional_model(node)
        if _is_model(node):
            field = node.model_fields.get(str(key))
            node = field.annotation if field else None
        else:  # a list index or a mapping key: step to the item type
            node = (getattr(node, "__args__", None) or (None,))[-1]
    node = _optional_model(node)
    return list(node.model_fields) if _is_model(node) else []


def _is_model(node: object) -> bool:
    return isinstance(node, type) and issubclass(node, BaseModel)


def _optional_model(annotation: object) -> object:
    """The model inside `Model | None`, else `annotation` itself."""
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        return next((a for a in typing.get_args(annotation) if _is_model(a)), annotation)
    return annotation
