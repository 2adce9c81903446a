from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Attachment(_message.Message):
    __slots__ = ("network", "container_id", "ifname")
    NETWORK_FIELD_NUMBER: _ClassVar[int]
    CONTAINER_ID_FIELD_NUMBER: _ClassVar[int]
    IFNAME_FIELD_NUMBER: _ClassVar[int]
    network: str
    container_id: str
    ifname: str
    def __init__(self, network: _Optional[str] = ..., container_id: _Optional[str] = ..., ifname: _Optional[str] = ...) -> None: ...

class AllocateRequest(_message.Message):
    __slots__ = ("attachment", "assign_ipv4", "assign_ipv6", "ipv4_pools", "ipv6_pools", "ips", "attributes", "gateways", "identity")
    class AttributesEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    ATTACHMENT_FIELD_NUMBER: _ClassVar[int]
    ASSIGN_IPV4_FIELD_NUMBER: _ClassVar[int]
    ASSIGN_IPV6_FIELD_NUMBER: _ClassVar[int]
    IPV4_POOLS_FIELD_NUMBER: _ClassVar[int]
    IPV6_POOLS_FIELD_NUMBER: _ClassVar[int]
    IPS_FIELD_NUMBER: _ClassVar[int]
    ATTRIBUTES_FIELD_NUMBER: _ClassVar[int]
    GATEWAYS_FIELD_NUMBER: _ClassVar[int]
    IDENTITY_FIELD_NUMBER: _ClassVar[int]
    attachment: Attachment
    assign_ipv4: bool
    assign_ipv6: bool
    ipv4_pools: _containers.RepeatedScalarFieldContainer[str]
    ipv6_pools: _containers.RepeatedScalarFieldContainer[str]
    ips: _containers.RepeatedScalarFieldContainer[str]
    attributes: _containers.ScalarMap[str, str]
    gateways: _containers.RepeatedScalarFieldContainer[str]
    identity: str
    def __init__(self, attachment: _Optional[_Union[Attachment, _Mapping]] = ..., assign_ipv4: _Optional[bool] = ..., assign_ipv6: _Optional[bool] = ..., ipv4_pools: _Optional[_Iterable[str]] = ..., ipv6_pools: _Optional[_Iterable[str]] = ..., ips: _Optional[_Iterable[str]] = ..., attributes: _Optional[_Mapping[str, str]] = ..., gateways: _Optional[_Iterable[str]] = ..., identity: _Optional[str] = ...) -> None: ...

class AllocatedAddress(_message.Message):
    __slots__ = ("ip", "pool", "pool_cidr", "block", "family", "gateway")
    IP_FIELD_NUMBER: _ClassVar[int]
    POOL_FIELD_NUMBER: _ClassVar[int]
    POOL_CIDR_FIELD_NUMBER: _ClassVar[int]
    BLOCK_FIELD_NUMBER: _ClassVar[int]
    FAMILY_FIELD_NUMBER: _ClassVar[int]
    GATEWAY_FIELD_NUMBER: _ClassVar[int]
    ip: str
    pool: str
    pool_cidr: str
    block: str
    family: int
    gateway: str
    def __init__(self, ip: _Optional[str] = ..., pool: _Optional[str] = ..., pool_cidr: _Optional[str] = ..., block: _Optional[str] = ..., family: _Optional[int] = ..., gateway: _Optional[str] = ...) -> None: ...

class AllocateResponse(_message.Message):
    __slots__ = ("handle", "addresses")
    HANDLE_FIELD_NUMBER: _ClassVar[int]
    ADDRESSES_FIELD_NUMBER: _ClassVar[int]
    handle: str
    addresses: _containers.RepeatedCompositeFieldContainer[AllocatedAddress]
    def __init__(self, handle: _Optional[str] = ..., addresses: _Optional[_Iterable[_Union[AllocatedAddress, _Mapping]]] = ...) -> None: ...

class ReleaseRequest(_message.Message):
    __slots__ = ("attachment",)
    ATTACHMENT_FIELD_NUMBER: _ClassVar[int]
    attachment: Attachment
    def __init__(self, attachment: _Optional[_Union[Attachment, _Mapping]] = ...) -> None: ...

class ReleaseResponse(_message.Message):
    __slots__ = ("released",)
    RELEASED_FIELD_NUMBER: _ClassVar[int]
    released: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, released: _Optional[_Iterable[str]] = ...) -> None: ...

class GetRequest(_message.Message):
    __slots__ = ("attachment",)
    ATTACHMENT_FIELD_NUMBER: _ClassVar[int]
    attachment: Attachment
    def __init__(self, attachment: _Optional[_Union[Attachment, _Mapping]] = ...) -> None: ...

class GetResponse(_message.Message):
    __slots__ = ("handle", "addresses")
    HANDLE_FIELD_NUMBER: _ClassVar[int]
    ADDRESSES_FIELD_NUMBER: _ClassVar[int]
    handle: str
    addresses: _containers.RepeatedCompositeFieldContainer[AllocatedAddress]
    def __init__(self, handle: _Optional[str] = ..., addresses: _Optional[_Iterable[_Union[AllocatedAddress, _Mapping]]] = ...) -> None: ...

class GarbageCollectRequest(_message.Message):
    __slots__ = ("network", "valid_attachments")
    NETWORK_FIELD_NUMBER: _ClassVar[int]
    VALID_ATTACHMENTS_FIELD_NUMBER: _ClassVar[int]
    network: str
    valid_attachments: _containers.RepeatedCompositeFieldContainer[Attachment]
    def __init__(self, network: _Optional[str] = ..., valid_attachments: _Optional[_Iterable[_Union[Attachment, _Mapping]]] = ...) -> None: ...

class GarbageCollectResponse(_message.Message):
    __slots__ = ("released_handles",)
    RELEASED_HANDLES_FIELD_NUMBER: _ClassVar[int]
    released_handles: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, released_handles: _Optional[_Iterable[str]] = ...) -> None: ...

class StatusRequest(_message.Message):
    __slots__ = ("assign_ipv4", "assign_ipv6", "ipv4_pools", "ipv6_pools")
    ASSIGN_IPV4_FIELD_NUMBER: _ClassVar[int]
    ASSIGN_IPV6_FIELD_NUMBER: _ClassVar[int]
    IPV4_POOLS_FIELD_NUMBER: _ClassVar[int]
    IPV6_POOLS_FIELD_NUMBER: _ClassVar[int]
    assign_ipv4: bool
    assign_ipv6: bool
    ipv4_pools: _containers.RepeatedScalarFieldContainer[str]
    ipv6_pools: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, assign_ipv4: _Optional[bool] = ..., assign_ipv6: _Optional[bool] = ..., ipv4_pools: _Optional[_Iterable[str]] = ..., ipv6_pools: _Optional[_Iterable[str]] = ...) -> None: ...

class PoolStatus(_message.Message):
    __slots__ = ("name", "cidr", "selected", "reason")
    NAME_FIELD_NUMBER: _ClassVar[int]
    CIDR_FIELD_NUMBER: _ClassVar[int]
    SELECTED_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    name: str
    cidr: str
    selected: bool
    reason: str
    def __init__(self, name: _Optional[str] = ..., cidr: _Optional[str] = ..., selected: _Optional[bool] = ..., reason: _Optional[str] = ...) -> None: ...

class StatusResponse(_message.Message):
    __slots__ = ("node", "labels", "pools", "in_sync", "etcd_reachable", "etcd_error", "affine_blocks", "free_addresses", "version", "ready", "not_ready_reason")
    class LabelsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    NODE_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    POOLS_FIELD_NUMBER: _ClassVar[int]
    IN_SYNC_FIELD_NUMBER: _ClassVar[int]
    ETCD_REACHABLE_FIELD_NUMBER: _ClassVar[int]
    ETCD_ERROR_FIELD_NUMBER: _ClassVar[int]
    AFFINE_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    FREE_ADDRESSES_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    READY_FIELD_NUMBER: _ClassVar[int]
    NOT_READY_REASON_FIELD_NUMBER: _ClassVar[int]
    node: str
    labels: _containers.ScalarMap[str, str]
    pools: _containers.RepeatedCompositeFieldContainer[PoolStatus]
    in_sync: bool
    etcd_reachable: bool
    etcd_error: str
    affine_blocks: int
    free_addresses: int
    version: str
    ready: bool
    not_ready_reason: str
    def __init__(self, node: _Optional[str] = ..., labels: _Optional[_Mapping[str, str]] = ..., pools: _Optional[_Iterable[_Union[PoolStatus, _Mapping]]] = ..., in_sync: _Optional[bool] = ..., etcd_reachable: _Optional[bool] = ..., etcd_error: _Optional[str] = ..., affine_blocks: _Optional[int] = ..., free_addresses: _Optional[int] = ..., version: _Optional[str] = ..., ready: _Optional[bool] = ..., not_ready_reason: _Optional[str] = ...) -> None: ...
