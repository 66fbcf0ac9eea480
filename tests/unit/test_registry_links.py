"""Strict parsing of Link headers for tag list pagination."""

from __future__ import annotations

import pytest

from sandbox_backup.registry.links import MalformedLinkHeader, find_next_link


def test_distribution_style_next_link() -> None:
    header = '</v2/a/b/tags/list?last=t03&n=4>; rel="next"'

    assert find_next_link([header]) == "/v2/a/b/tags/list?last=t03&n=4"


def test_absolute_next_link() -> None:
    header = '<https://registry.example/v2/a/tags/list?n=2&last=x>; rel="next"'

    assert find_next_link([header]) == "https://registry.example/v2/a/tags/list?n=2&last=x"


def test_unquoted_rel_and_extra_params() -> None:
    assert find_next_link(["</next>; type=json; rel=next"]) == "/next"


def test_next_among_several_links() -> None:
    header = '</prev>; rel="prev", </next>; rel="next"'

    assert find_next_link([header]) == "/next"


def test_rel_with_several_relations() -> None:
    assert find_next_link(['</page2>; rel="last next"']) == "/page2"


def test_rel_is_case_insensitive() -> None:
    assert find_next_link(['</page2>; REL="Next"']) == "/page2"


def test_no_next_link() -> None:
    assert find_next_link(['</prev>; rel="prev"']) is None


def test_no_link_header() -> None:
    assert find_next_link([]) is None


@pytest.mark.parametrize(
    "header",
    [
        "garbage",
        "/v2/a/tags/list?n=1; rel=next",
        "</v2/a/tags/list?n=1; rel=next",
        '</next>; rel="next" trailing',
        '</next> rel="next"',
        '</next>; rel="next',
    ],
)
def test_malformed_header_raises(header: str) -> None:
    with pytest.raises(MalformedLinkHeader):
        find_next_link([header])
