"""Command-line flags generated from dataclass fields, with the field docstrings as help.

A field `num_chunks: int = 2` with the docstring below it becomes `--<prefix>num-chunks` (type int,
the docstring as help, the default shown); `bool` fields become switches; a field's
`metadata["choices"]` becomes argparse choices. Megatron-LM's newer argument code generates its
flags from dataclass fields the same way. Each generated flag stores into `GROUP.FIELD`, so parsed
values can be handed back to the dataclass they came from.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import functools
import inspect
import textwrap
from typing import Dict, Iterable, Mapping, Optional

_SCALARS = {"int": int, "float": float, "str": str}


@functools.lru_cache(maxsize=None)
def field_docs(cls: type) -> Dict[str, str]:
    """{field name: docstring} of a dataclass: the string literal written under each field."""
    docs: Dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass):
            continue
        tree = ast.parse(textwrap.dedent(inspect.getsource(klass)))
        body = tree.body[0].body
        for node, following in zip(body, body[1:]):
            if (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)
                    and isinstance(following, ast.Expr) and isinstance(following.value, ast.Constant)
                    and isinstance(following.value.value, str)):
                docs[node.target.id] = " ".join(following.value.value.split())
    return docs


def _kind(annotation: str) -> tuple:
    """(scalar type, is_list) of a field annotation written as a string (PEP 563)."""
    text = annotation.replace("typing.", "")
    if text.startswith("Optional[") and text.endswith("]"):
        text = text[len("Optional["):-1]
    for prefix in ("List[", "list["):
        if text.startswith(prefix):
            return _SCALARS.get(text[len(prefix):-1], str), True
    if text in ("list", "List"):
        return str, True
    return _SCALARS.get(text, str), False


def flag_name(prefix: str, field: str, renames: Mapping[str, str]) -> str:
    """The flag of a field: an explicit rename, else --PREFIX + the field in kebab case (a field
    that already starts with the prefix's word is not prefixed twice: rope_type -> --rope-type)."""
    if field in renames:
        return renames[field]
    name = field.replace("_", "-")
    if prefix and not name.startswith(prefix):
        name = prefix + name
    return "--" + name


def add_dataclass_flags(
    parser: argparse._ActionsContainer,
    cls: type,
    group: str,
    *,
    prefix: str = "",
    renames: Optional[Mapping[str, str]] = None,
    exclude: Iterable[str] = (),
    keep_defaults: bool = True,
    required: Iterable[str] = (),
    notes: Optional[Mapping[str, str]] = None,
) -> None:
    """Add one flag per field of dataclass `cls`, storing into dest "GROUP.FIELD".

    keep_defaults=False gives every flag the default None, so a caller can tell "not given" from a
    value (for settings that a preset or a checkpoint supplies); the help still shows the field's
    own default. `required` fields must be given; `notes` adds command-line-only remarks to a
    field's help (e.g. a default the parser derives).
    """
    renames = dict(renames or {})
    exclude, required = set(exclude), set(required)
    docs = field_docs(cls)
    for f in dataclasses.fields(cls):
        if f.name in exclude:
            continue
        kind, is_list = _kind(str(f.type))
        has_default = f.default is not dataclasses.MISSING
        default = f.default if has_default else None
        help_text = " ".join(filter(None, [docs.get(f.name, ""), (notes or {}).get(f.name)]))
        kwargs: dict = dict(dest=f"{group}.{f.name}", help=help_text)
        if str(f.type) == "bool":
            kwargs.update(action="store_true", default=False if keep_defaults else None)
        else:
            kwargs.update(type=kind, default=default if keep_defaults else None)
            if is_list:
                kwargs["nargs"] = "*"
                kwargs["default"] = [] if keep_defaults else None
            if "choices" in f.metadata:
                kwargs["choices"] = list(f.metadata["choices"])
            else:
                kwargs["metavar"] = f.name.upper()
            if has_default and default is not None and not keep_defaults:
                kwargs["help"] = f"{help_text} (default: {default})"
        if f.name in required:
            kwargs["required"] = True
        parser.add_argument(flag_name(prefix, f.name, renames), **kwargs)


def group_values(namespace: argparse.Namespace, group: str, *, given_only: bool = False) -> dict:
    """{field: value} of the flags stored under GROUP (given_only: leave out the Nones)."""
    values = {}
    for dest, value in vars(namespace).items():
        head, _, name = dest.partition(".")
        if head == group and not (given_only and value is None):
            values[name] = value
    return values
