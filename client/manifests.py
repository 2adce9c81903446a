"""Manifests: YAML/JSON documents to model values and back, for `topoipamctl`.

Pure: no etcd and no printing. :func:`load` turns the text of a manifest
file (multi-document YAML, a JSON object or array, ``kind: List``) into
validated model values, each tagged with where it came from so that an error
names the document. Every problem is raised as one :class:`InvalidInput`
with a single-line message; nothing is returned half-parsed.

``topoipam/v1`` documents are strict: an unknown field is an error, because a
misspelt ``nodeSelctor`` silently selecting every node is worse than a
refused file. Calico ``projectcalico.org/v3`` IPPool (and IPReservation)
manifests are accepted so operators can reuse them; the Calico fields we have
no use for (``natOutgoing``, ``ipipMode``...) are dropped with one warning
each, since they configure the dataplane, which is not ours.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import yaml

from topoipam.daemon.core.errors import InvalidInput
from topoipam.daemon.core.model import (
    CONFIG_NAME,
    IPAMConfig,
    IPPool,
    IPReservation,
    Node,
    Resource,
    check_kubernetes_label,
    check_name,
    check_pool_name,
    kind_of,
    name_of,
)

API_VERSION = "topoipam/v1"
# The aggregated API (calicoctl) and the CRD form (kubectl get ippools.crd...)
# carry the same IPPool spec.
CALICO_API_VERSIONS = ("projectcalico.org/v3", "crd.projectcalico.org/v1")
CALICO_KINDS = ("IPPool", "IPReservation")


KINDS: dict[str, type[Resource]] = {
    "IPPool": IPPool,
    "Node": Node,
    "IPAMConfig": IPAMConfig,
    "IPReservation": IPReservation,
}

# The spec fields of each kind: the JSON names of the model's to_dict.
SPEC_FIELDS: dict[str, tuple[str, ...]] = {
    "IPPool": ("cidr", "blockSize", "nodeSelector", "disabled", "assignmentMode", "gateway",
               "priority", "topologyKey", "topologyBlockSize"),
    "Node": ("labels",),
    "IPAMConfig": ("strictAffinity", "maxBlocksPerHost", "autoAllocateBlocks",
                   "ipCooldownSeconds", "warmAddresses", "stickyHoldSeconds",
                   "stickyTakeoverSeconds"),
    "IPReservation": ("cidrs", "reservedCIDRs"),
}

# There is one IPAM configuration; Calico names its IPAMConfiguration "default".

_TOP_LEVEL_FIELDS = ("apiVersion", "kind", "metadata", "spec")

# Calico v3 IPPool ``allowedUses``: only Workload (pod addresses) is ours.
CALICO_USES = ("Workload", "Tunnel", "LoadBalancer")
# Calico fields we ignore whose absence changes who gets addresses: say how.
_CALICO_CONSEQUENCES = {
    "namespaceSelector": "the pool serves pods of every namespace on the nodes it selects",
}


@dataclass(frozen=True)
class Document:
    """One validated resource and where it came from ("pools.yaml document 2")."""

    obj: Resource
    where: str

    @property
    def kind(self) -> str:
        return kind_of(self.obj)

    @property
    def name(self) -> str:
        return name_of(self.obj)


@dataclass
class Manifests:
    documents: list[Document] = field(default_factory=list)
    #: Fields that were accepted but have no effect, one line each, without "warning: ".
    warnings: list[str] = field(default_factory=list)


def load(text: str, source: str) -> Manifests:
    """Parse and validate every resource in ``text``; ``source`` names the file in errors.

    Raises InvalidInput (one line) for a syntax error, a document that is not
    a resource, an unknown kind or field, or an invalid value.
    """
    result = Manifests()
    for where, document in _documents(text, source):
        result.documents.append(Document(_parse_document(document, where, result.warnings),
                                         where))
    if not result.documents:
        raise InvalidInput(f"{source}: no resources found")
    return result


def to_manifest(obj: Resource) -> dict[str, Any]:
    """The ``topoipam/v1`` manifest of ``obj``; :func:`load` accepts it back unchanged."""
    return {
        "apiVersion": API_VERSION,
        "kind": kind_of(obj),
        "metadata": {"name": name_of(obj)},
        "spec": obj.to_dict(),
    }


def to_list_manifest(objs: list[Resource]) -> dict[str, Any]:
    return {"apiVersion": API_VERSION, "kind": "List", "items": [to_manifest(o) for o in objs]}


def _one_line(text: str) -> str:
    return " ".join(text.split())


def _documents(text: str, source: str) -> list[tuple[str, Any]]:
    """The raw documents of the file, flattened out of JSON arrays and ``List`` kinds."""
    stripped = text.lstrip()
    raw: list[Any]
    if stripped.startswith(("{", "[")):
        # Parse JSON as JSON: PyYAML is YAML 1.1 and chokes on some valid JSON (tabs).
        try:
            value = json.loads(text)
        except json.JSONDecodeError as exc:
            raise InvalidInput(
                f"{source}: invalid JSON at line {exc.lineno}, column {exc.colno}: {exc.msg}"
            ) from exc
        raw = [value]
    else:
        try:
            raw = [d for d in yaml.safe_load_all(text) if d is not None]
        except yaml.MarkedYAMLError as exc:
            mark = exc.problem_mark or exc.context_mark
            position = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
            problem = exc.problem or exc.context or "syntax error"
            raise InvalidInput(f"{source}: invalid YAML{position}: {_one_line(problem)}") from exc
        except yaml.YAMLError as exc:
            raise InvalidInput(f"{source}: invalid YAML: {_one_line(str(exc))}") from exc
    documents: list[tuple[str, Any]] = []
    for index, document in enumerate(raw, start=1):
        where = f"{source} document {index}"
        if isinstance(document, list):
            # A YAML sequence or JSON array of resources.
            for item_index, item in enumerate(document, start=1):
                documents.append((f"{where} item {item_index}", item))
        elif isinstance(document, Mapping) and _is_list(document):
            items = document.get("items")
            if not isinstance(items, list):
                raise InvalidInput(f"{where}: kind {document.get('kind')} needs a list of items")
            for item_index, item in enumerate(items, start=1):
                documents.append((f"{where} item {item_index}", _inherit(document, item)))
        else:
            documents.append((where, document))
    return documents


def _is_list(document: Mapping[str, Any]) -> bool:
    kind = document.get("kind")
    # calicoctl prints "IPPoolList", kubectl prints "List".
    return isinstance(kind, str) and (
        kind == "List" or (kind.endswith("List") and kind.removesuffix("List") in KINDS)
    )


def _inherit(container: Mapping[str, Any], item: Any) -> Any:
    """Items of an ``IPPoolList`` may omit apiVersion and kind; take them from the list."""
    if not isinstance(item, Mapping):
        return item
    filled = dict(item)
    kind = str(container.get("kind", ""))
    if "apiVersion" not in filled and "apiVersion" in container:
        filled["apiVersion"] = container["apiVersion"]
    if "kind" not in filled and kind != "List":
        filled["kind"] = kind.removesuffix("List")
    return filled


def _describe_type(value: object) -> str:
    if isinstance(value, list):
        return "a list"
    if isinstance(value, str):
        return f"the text {value!r}"
    return f"{value!r}"


def _parse_document(document: Any, where: str, warnings: list[str]) -> Resource:
    if not isinstance(document, Mapping):
        raise InvalidInput(
            f"{where}: expected a resource (a mapping with apiVersion, kind, metadata and "
            f"spec), got {_describe_type(document)}"
        )
    api_version = document.get("apiVersion")
    kind = document.get("kind")
    if api_version is None:
        raise InvalidInput(f"{where}: apiVersion is required (use {API_VERSION})")
    if kind is None:
        raise InvalidInput(f"{where}: kind is required ({_kind_choices()})")
    calico = api_version in CALICO_API_VERSIONS
    if api_version != API_VERSION and not calico:
        raise InvalidInput(
            f"{where}: unsupported apiVersion {api_version!r} (use {API_VERSION}; "
            f"{CALICO_API_VERSIONS[0]} is accepted for IPPool and IPReservation)"
        )
    if kind not in KINDS:
        raise InvalidInput(f"{where}: unknown kind {kind!r} ({_kind_choices()})")
    if calico and kind not in CALICO_KINDS:
        raise InvalidInput(
            f"{where}: kind {kind} of apiVersion {api_version} is not supported "
            f"(only {' and '.join(CALICO_KINDS)}); write it as apiVersion {API_VERSION}"
        )
    metadata = document.get("metadata", {})
    if not isinstance(metadata, Mapping):
        raise InvalidInput(f"{where}: metadata must be a mapping")
    name = _name(kind, metadata, where)
    subject = f"{kind} {name}"
    spec = document.get("spec", {})
    if spec is None:
        spec = {}
    if not isinstance(spec, Mapping):
        raise InvalidInput(f"{where}: {subject}: spec must be a mapping")
    spec = dict(spec)

    allowed_metadata = ("name", "labels") if kind == "Node" else ("name",)
    for section, data, allowed in (
        ("", document, _TOP_LEVEL_FIELDS),
        ("metadata.", metadata, allowed_metadata),
        ("spec.", spec, SPEC_FIELDS[kind]),
    ):
        for key in list(data):
            if key in allowed:
                continue
            if not calico:
                raise InvalidInput(
                    f"{where}: {subject}: unknown field {section}{key} "
                    f"(known: {', '.join(section + k for k in allowed)})"
                )
            if section == "spec." and kind == "IPPool" and key == "allowedUses":
                _calico_allowed_uses(spec, subject, where, warnings)
                continue
            # Calico's dataplane and bookkeeping fields: harmless, but say we drop them.
            consequence = _CALICO_CONSEQUENCES.get(key) if section == "spec." else None
            warnings.append(f"{subject}: field {section}{key} is not used by topoipam (ignored)"
                            + (f": {consequence}" if consequence else ""))
            if section == "spec.":
                del spec[key]

    try:
        return _build(kind, name, metadata, spec, subject)
    except InvalidInput as exc:
        raise InvalidInput(f"{where}: {exc}") from exc


def _calico_allowed_uses(
    spec: dict[str, Any], subject: str, where: str, warnings: list[str]
) -> None:
    """Honour Calico's ``allowedUses`` (removed from ``spec``).

    Workload in the list: the pool serves pods, the other uses are named.
    No Workload (a Tunnel or LoadBalancer pool): Calico never gives pods its
    addresses, so it becomes a Manual pool — it still holds its range against
    overlapping pools, and pods get addresses from it only where a CNI
    config names it. Refusing it instead would make a whole calicoctl export
    unusable.
    """
    uses = spec.pop("allowedUses")
    if uses is None or uses == []:
        return  # Calico's default: Workload and Tunnel
    if not isinstance(uses, list) or not all(isinstance(u, str) for u in uses):
        raise InvalidInput(f"{where}: {subject}: spec.allowedUses must be a list of uses")
    for use in uses:
        if use not in CALICO_USES:
            raise InvalidInput(
                f"{where}: {subject}: spec.allowedUses: unknown use {use!r} (Calico knows "
                f"{', '.join(CALICO_USES)})"
            )
    others = ",".join(u for u in uses if u != "Workload")
    if "Workload" in uses:
        if others:
            warnings.append(f"{subject}: spec.allowedUses {others} is not served by topoipam "
                            "(Workload is honoured)")
        return
    spec["assignmentMode"] = "Manual"
    warnings.append(
        f"{subject}: spec.allowedUses {others} has no Workload: imported as assignmentMode "
        "Manual (pods get addresses from it only where a CNI config names it)"
    )


def _kind_choices() -> str:
    return "expected one of " + ", ".join(KINDS)


def _name(kind: str, metadata: Mapping[str, Any], where: str) -> str:
    name = metadata.get("name")
    if kind == "IPAMConfig":
        if name not in (None, CONFIG_NAME):
            raise InvalidInput(
                f"{where}: IPAMConfig: metadata.name must be {CONFIG_NAME!r} or absent "
                f"(there is one IPAM configuration), got {name!r}"
            )
        return CONFIG_NAME
    if name is None:
        raise InvalidInput(f"{where}: {kind}: metadata.name is required")
    try:
        return check_pool_name(name) if kind == "IPPool" else check_name(kind.lower(), name)
    except InvalidInput as exc:
        raise InvalidInput(f"{where}: {exc}") from exc


def _build(
    kind: str, name: str, metadata: Mapping[str, Any], spec: dict[str, Any], subject: str
) -> Resource:
    if kind == "IPPool":
        return IPPool.from_dict(name, spec)
    if kind == "IPReservation":
        if "cidrs" in spec and "reservedCIDRs" in spec:
            raise InvalidInput(f"{subject}: give spec.cidrs or spec.reservedCIDRs, not both")
        return IPReservation.from_dict(name, spec)
    if kind == "IPAMConfig":
        return IPAMConfig.from_dict(spec)
    return Node(name, _node_labels(metadata, spec, subject))


def _node_labels(
    metadata: Mapping[str, Any], spec: Mapping[str, Any], subject: str
) -> dict[str, str]:
    """Labels from metadata.labels (kubectl habit) and spec.labels (our stored shape)."""
    labels: dict[str, str] = {}
    for section, source in (("metadata", metadata), ("spec", spec)):
        given = source.get("labels") or {}
        if not isinstance(given, Mapping):
            raise InvalidInput(f"{subject}: {section}.labels must be a mapping")
        for key, value in given.items():
            if not isinstance(value, str):
                # YAML reads `rack: 0` as a number; the selector compares strings.
                raise InvalidInput(
                    f"{subject}: label {key} has the non-string value {value!r}; "
                    f"quote it in YAML (e.g. {key}: \"{value}\")"
                )
            check_kubernetes_label(key, value, subject)
            if key in labels and labels[key] != value:
                raise InvalidInput(
                    f"{subject}: label {key} is {labels[key]!r} in metadata.labels but "
                    f"{value!r} in spec.labels"
                )
            labels[key] = value
    return labels
