"""``core/ASSET`` references in a v2 workflow: find, check, and replace them by file names.

A v2 client puts, where a file name would go in an API-format workflow (``LoadImage``'s
``image``), the object comfy-sdk's ``Asset.as_reference()`` makes (comfy_low.models
``AssetReference``)::

    {"__type": "core/ASSET", "info": {"id": "<asset uuid>", "hash": "blake3:...",
                                      "file_path": "photo.png"}}

``info.id`` is required and authoritative; ``hash`` and ``file_path`` are optional hints that
never override it. A malformed reference, or one whose id names no kept asset, fails the
submission with v2 ``missing_asset`` (:class:`~comfy_sidecar.errors.MissingAsset`, 422 at the
v2 edge). Any object tagged ``"__type": "core/ASSET"`` counts as an attempted reference
wherever it is in the workflow (any depth of a node's inputs, lists included), so a malformed
one is refused instead of being sent to ComfyUI as a literal dict (comfy-api-proxy's
``_rewrite_asset_refs`` does the same).

Locations are dotted from ``workflow``: ``workflow.<node>.inputs.<field>``, then keys and list
indexes for deeper values (``workflow.7.inputs.images.0``). Pure functions: the store is
reached only through the ``lookup`` the caller passes.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from comfy_sidecar.errors import MissingAsset

ASSET_TYPE = "core/ASSET"

A = TypeVar("A")


@dataclass(frozen=True)
class AssetReference:
    """One ``core/ASSET`` object found in a workflow. ``path`` is the keys and list indexes
    from the workflow's top to it, ``location`` the same dotted from ``workflow``."""

    location: str
    path: tuple[str | int, ...]
    id: str
    hash: str | None
    file_path: str | None


@dataclass(frozen=True)
class ResolvedReference(Generic[A]):
    """A reference and what ``lookup`` gave for its id (the store's asset)."""

    reference: AssetReference
    asset: A


def _location(path: tuple[str | int, ...]) -> str:
    return ".".join(["workflow", *(str(part) for part in path)])


def _is_reference(value: object) -> bool:
    return isinstance(value, dict) and value.get("__type") == ASSET_TYPE


def _walk(workflow: Mapping[str, Any]) -> list[tuple[tuple[str | int, ...], dict[str, Any]]]:
    """Every ``core/ASSET``-tagged object with its path, in document order (iterative: a deep
    workflow cannot exhaust the stack)."""
    found: list[tuple[tuple[str | int, ...], dict[str, Any]]] = []
    stack: list[tuple[tuple[str | int, ...], Any]] = [
        ((str(key),), value) for key, value in reversed(list(workflow.items()))
    ]
    while stack:
        path, value = stack.pop()
        if _is_reference(value):
            found.append((path, value))
            continue
        children: list[tuple[tuple[str | int, ...], Any]] = []
        if isinstance(value, Mapping):
            children = [((*path, str(key)), child) for key, child in value.items()]
        elif isinstance(value, list):
            children = [((*path, index), child) for index, child in enumerate(value)]
        stack.extend(reversed(children))
    return found


def _parse(path: tuple[str | int, ...], value: dict[str, Any]) -> AssetReference | None:
    """The reference at ``path``, or None when it is malformed."""
    info = value.get("info")
    if not isinstance(info, dict):
        return None
    asset_id, digest, file_path = info.get("id"), info.get("hash"), info.get("file_path")
    if not isinstance(asset_id, str) or not asset_id:
        return None
    if digest is not None and not isinstance(digest, str):
        return None
    if file_path is not None and not isinstance(file_path, str):
        return None
    return AssetReference(_location(path), path, asset_id, digest, file_path)


def find_asset_references(workflow: Mapping[str, Any]) -> list[AssetReference]:
    """Every ``core/ASSET`` reference in ``workflow`` (an API-format dict), in document order.

    Raises :class:`~comfy_sidecar.errors.MissingAsset` when any is malformed (``info`` not an
    object, ``info.id`` not a non-empty string, ``hash`` or ``file_path`` present but not a
    string): ``location`` is the first bad one, field ``missing`` every bad location."""
    references: list[AssetReference] = []
    bad: list[str] = []
    for path, value in _walk(workflow):
        reference = _parse(path, value)
        if reference is None:
            bad.append(_location(path))
        else:
            references.append(reference)
    if bad:
        raise MissingAsset(
            "malformed core/ASSET reference: expected "
            '{"__type": "core/ASSET", "info": {"id": "<asset id>"}}',
            bad[0],
            missing=bad,
        )
    return references


def resolve_asset_references(
    workflow: Mapping[str, Any], lookup: Callable[[str], A | None]
) -> list[ResolvedReference[A]]:
    """:func:`find_asset_references`, each with ``lookup(info.id)`` (e.g.
    :meth:`AssetStore.find <comfy_sidecar.assets.store.AssetStore.find>`).

    Raises :class:`~comfy_sidecar.errors.MissingAsset` for a malformed reference or one whose
    lookup gives None (``location`` the first, ``missing`` all, ``asset_ids`` the unknown ids
    in order)."""
    resolved: list[ResolvedReference[A]] = []
    unknown: list[AssetReference] = []
    for reference in find_asset_references(workflow):
        asset = lookup(reference.id)
        if asset is None:
            unknown.append(reference)
        else:
            resolved.append(ResolvedReference(reference, asset))
    if unknown:
        raise missing_assets(unknown)
    return resolved


def missing_assets(unknown: Sequence[AssetReference]) -> MissingAsset:
    """The error for references whose asset is not there (at least one): ``location`` the
    first, ``missing`` every one's, ``asset_ids`` their ids, in order."""
    return MissingAsset(
        f"no asset with id {unknown[0].id!r}",
        unknown[0].location,
        missing=[reference.location for reference in unknown],
        asset_ids=[reference.id for reference in unknown],
    )


def replace_asset_references(
    workflow: Mapping[str, Any], names: Mapping[str, str]
) -> dict[str, Any]:
    """A copy of ``workflow`` with each ``core/ASSET`` reference replaced by
    ``names[info.id]`` (the staged file name, relative to ComfyUI's input directory, the value
    a ``LoadImage`` input takes). Only the containers on the way to a reference are copied;
    everything else is shared with ``workflow``, which is not changed.

    Raises :class:`~comfy_sidecar.errors.MissingAsset` for a malformed reference and KeyError
    for an id ``names`` lacks (the caller's own mistake: it stages what it resolved)."""
    result: dict[str, Any] = dict(workflow)
    copied = {id(result)}
    for reference in find_asset_references(workflow):
        name = names[reference.id]
        parent: Any = result
        for part in reference.path[:-1]:
            child = parent[part]
            if id(child) not in copied:
                child = dict(child) if isinstance(child, Mapping) else list(child)
                copied.add(id(child))
                parent[part] = child
            parent = child
        parent[reference.path[-1]] = name
    return result
