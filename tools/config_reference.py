"""Print the configuration reference table of docs/configuration.md from the config dataclasses.

    python tools/config_reference.py

tests/unit/test_config.py checks that docs/configuration.md contains exactly this table.
"""

import ast
import dataclasses
import inspect
import sys
import typing
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from trb_megatron import config  # noqa: E402


def _field_docs(cls) -> dict:
    """The docstring written under each field of a dataclass."""
    body = ast.parse(inspect.getsource(cls)).body[0].body
    return {node.target.id: " ".join(nxt.value.value.split())
            for node, nxt in zip(body, body[1:])
            if isinstance(node, ast.AnnAssign) and isinstance(nxt, ast.Expr)
            and isinstance(nxt.value, ast.Constant)}


def _unwrap(kind):
    """DataConfig | None -> DataConfig; anything else unchanged."""
    args = [a for a in typing.get_args(kind) if a is not type(None)]
    return args[0] if len(args) == 1 and dataclasses.is_dataclass(args[0]) else kind


def _rows(cls, prefix):
    docs, hints = _field_docs(cls), typing.get_type_hints(cls)
    for field in dataclasses.fields(cls):
        kind = _unwrap(hints[field.name])
        if dataclasses.is_dataclass(kind):
            optional = kind is not hints[field.name]
            yield (f"| `{prefix}{field.name}` | {'optional section' if optional else 'section'}"
                   f" | {docs.get(field.name, '')} |")
            yield from _rows(kind, f"{prefix}{field.name}.")
            continue
        required = field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING
        default = "required" if required else f"`{field.default!r}`"
        yield f"| `{prefix}{field.name}` | {default} | {docs[field.name]} |"


def reference_table() -> str:
    lines = ["| key | default | meaning |", "|---|---|---|", *_rows(config.Config, "")]
    return "\n".join(line.replace("\\boxed", "\\\\boxed") for line in lines) + "\n"


if __name__ == "__main__":
    print(reference_table(), end="")
