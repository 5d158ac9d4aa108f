"""OpenAPI documentation of workflow routes: comfyui-api's Markdown table of the input fields."""

from __future__ import annotations

from typing import Any, cast

import msgspec

__all__ = ["input_markdown_table"]


def input_markdown_table(request_type: type[msgspec.Struct]) -> str:
    """comfyui-api's Markdown table of a request type's fields, from its JSON schema."""
    (schema,), components = msgspec.json.schema_components([request_type])
    body = _deref(schema, components)
    required = set(body.get("required", []))
    rows = ["| Field | Type | Description | Default |", "|---|---|---|---|"]
    for name, prop in body.get("properties", {}).items():
        prop = _deref(prop, components)
        if name in required:
            default = "**Required**"
        elif "default" in prop:
            default = f"`{msgspec.json.encode(prop['default']).decode()}`"
        else:
            default = ""
        description = str(prop.get("description", "")).replace("|", "\\|").replace("\n", " ")
        rows.append(f"| {name} | {_type_label(prop, components)} | {description} | {default} |")
    return "\n".join(rows)


def _deref(schema: dict[str, Any], components: dict[str, Any]) -> dict[str, Any]:
    ref = schema.get("$ref")
    if isinstance(ref, str):
        return cast(dict[str, Any], components.get(ref.rsplit("/", 1)[-1], {}))
    return schema


def _type_label(prop: dict[str, Any], components: dict[str, Any]) -> str:
    if "enum" in prop:
        return " \\| ".join(f"`{v}`" for v in prop["enum"])
    if "anyOf" in prop:
        return " \\| ".join(_type_label(_deref(p, components), components) for p in prop["anyOf"])
    kind = prop.get("type")
    if kind == "array":
        return f"array of {_type_label(_deref(prop.get('items', {}), components), components)}"
    if kind is None and "title" in prop:
        return str(prop["title"])
    label = str(kind or "any")
    bounds = [
        f"{sym} {prop[key]}"
        for key, sym in (("minimum", "≥"), ("exclusiveMinimum", ">"), ("maximum", "≤"))
        if key in prop
    ]
    return f"{label} ({', '.join(bounds)})" if bounds else label
