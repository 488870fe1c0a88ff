"""Issue #15, finding 8: the outbound guard refuses every address that is not global.

Carrier-grade NAT, 6to4, NAT64 and other special-purpose blocks passed the old checks, and
a refusal named the internal address a host resolved to. Literal addresses only: `resolve`
needs no DNS for them, and the machine's network is closed.
"""

from __future__ import annotations

import ipaddress

import pytest

from conveyor.outbound import BlockedDestination, globally_routable, resolve

NOTHING_ALLOWED: frozenset[str] = frozenset()


def url_of(address: str) -> str:
    """Return an http URL to a literal address."""
    return f"http://[{address}]/" if ":" in address else f"http://{address}/"


@pytest.mark.parametrize(
    "address",
    [
        "100.64.0.1",  # carrier-grade NAT
        "100.100.100.200",  # a cloud metadata service inside carrier-grade NAT
        "2002::1",  # 6to4 of 0.0.0.0
        "2002:7f00:1::",  # 6to4 of 127.0.0.1
        "2002:808:808::1",  # 6to4, even of a public address: deprecated, refused whole
        "64:ff9b::7f00:1",  # NAT64 of 127.0.0.1
        "64:ff9b::a9fe:a9fe",  # NAT64 of 169.254.169.254
        "64:ff9b:1::a00:1",  # local-use NAT64
        "2001::1",  # Teredo
        "198.18.0.1",  # benchmarking
        "192.0.0.8",  # IETF protocol assignments
        "192.88.99.1",  # 6to4 relay anycast
        "240.0.0.1",  # reserved
        "255.255.255.255",
        "224.0.0.1",  # multicast
        "::ffff:10.0.0.1",  # IPv4-mapped private
        "::127.0.0.1",  # IPv4-compatible loopback
        "fc00::1",  # unique local
        "fd00:ec2::254",  # a cloud metadata service's IPv6 address (unique local)
        "fec0::1",  # site-local
        "2001:db8::1",  # documentation
        "3fff::1",  # documentation
        "5f00::1",  # segment routing
        "ff02::1",  # multicast
    ],
)
def test_non_global_addresses_are_refused(address: str) -> None:
    assert not globally_routable(ipaddress.ip_address(address))
    with pytest.raises(BlockedDestination, match=r"^blocked destination"):
        resolve(url_of(address), NOTHING_ALLOWED)


@pytest.mark.parametrize(
    "address",
    [
        "8.8.8.8",
        "1.1.1.1",
        "93.184.215.14",
        "2606:4700:4700::1111",
        "2001:4860:4860::8888",
        "::ffff:8.8.8.8",  # IPv4-mapped public: judged by the IPv4 address
        "64:ff9b::808:808",  # NAT64 of 8.8.8.8, as DNS64 answers on an IPv6-only host
    ],
)
def test_public_addresses_pass(address: str) -> None:
    assert globally_routable(ipaddress.ip_address(address))
    scheme, _, port, pinned = resolve(url_of(address), NOTHING_ALLOWED)
    assert (scheme, port, ipaddress.ip_address(pinned)) == (
        "http",
        80,
        ipaddress.ip_address(address),
    )


def test_an_allow_listed_address_still_passes() -> None:
    assert resolve("http://100.64.0.1:8080/x", frozenset({"100.64.0.1"}))[3] == "100.64.0.1"


def test_a_refusal_never_says_where_a_name_resolves_or_whether_it_does() -> None:
    """`localhost` resolves (to loopback) from /etc/hosts; the other two never resolve."""
    messages = {}
    for host in ["localhost", "nothing-here.invalid", "a" * 64 + ".example"]:
        with pytest.raises(BlockedDestination) as refused:
            resolve(f"http://{host}:8080/", NOTHING_ALLOWED)
        messages[host] = str(refused.value).replace(host, "<host>")
    assert "127.0.0.1" not in messages["localhost"]
    assert "::1" not in messages["localhost"]
    assert len(set(messages.values())) == 1, messages
    assert messages["localhost"].startswith("blocked destination")
