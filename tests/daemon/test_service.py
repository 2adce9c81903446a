"""The CNI socket's request view: checked like protobuf's ParseDict, read like a message."""

from __future__ import annotations

from typing import Any

import pytest

from topoipam.daemon.core.errors import InvalidInput
from topoipam.daemon.service import JsonRequest
from topoipam.proto import ipam_pb2

ALLOCATE = ipam_pb2.AllocateRequest.DESCRIPTOR


def test_reads_like_the_generated_message() -> None:
    request = JsonRequest(ALLOCATE, {
        "attachment": {"network": "n", "container_id": "c", "ifname": "eth0"},
        "assign_ipv4": True, "ips": ["10.0.0.5"], "attributes": {"pod": "p"}})
    assert request.attachment.network == "n" and request.assign_ipv4 is True
    assert request.ips == ["10.0.0.5"] and request.attributes == {"pod": "p"}
    # proto3 defaults for what was not sent
    assert request.assign_ipv6 is False and request.ipv4_pools == []
    empty = JsonRequest(ALLOCATE, {})
    assert empty.attachment.container_id == "" and empty.attributes == {}


@pytest.mark.parametrize(("payload", "fragment"), [
    ({"colour": "blue"}, "no field 'colour'"),
    ({"assign_ipv4": "yes"}, "assign_ipv4 must be a bool"),
    ({"ips": "10.0.0.1"}, "ips must be a list"),
    ({"ips": [1]}, "ips[] must be a str"),
    ({"attributes": {"a": 1}}, "attributes must be an object of strings"),
    ({"attachment": "n/c/eth0"}, "attachment. must be a JSON object"),
    ({"attachment": {"network": 5}}, "attachment.network must be a str"),
    ({"attachment": {"pod": "x"}}, "no field 'pod'"),
])
def test_refuses_what_parse_dict_refuses(payload: dict[str, Any], fragment: str) -> None:
    with pytest.raises(InvalidInput) as info:
        JsonRequest(ALLOCATE, payload)
    assert fragment in str(info.value)
