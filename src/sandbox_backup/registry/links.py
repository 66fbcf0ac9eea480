"""Strict parsing of RFC 8288 (formerly RFC 5988) `Link` headers for tag list pagination.

httpx's `Response.links` accepts any text, so a garbled header would look like "no next page"
and silently cut the list short. This parser raises instead.
"""

from __future__ import annotations

import re

_TOKEN = r"[!#$%&'*+.^_`|~0-9A-Za-z-]+"
_LINK_RE = re.compile(
    rf"""\s*<(?P<target>[^<>\s]*)>(?P<params>(?:\s*;\s*{_TOKEN}\*?\s*(?:=\s*(?:"[^"]*"|{_TOKEN}))?)*)\s*(?:,|$)"""
)
_PARAM_RE = re.compile(rf""";\s*({_TOKEN}\*?)\s*(?:=\s*("[^"]*"|{_TOKEN}))?""")


class MalformedLinkHeader(ValueError):
    """A `Link` header value that does not fit the RFC 8288 grammar."""


def find_next_link(header_values: list[str]) -> str | None:
    """Return the target of the first link with relation `next`, or None if there is none.

    The target is returned as written, often relative to the request URL. Raises
    MalformedLinkHeader when a value cannot be parsed.
    """
    for value in header_values:
        for target, relations in _parse_links(value):
            if "next" in relations:
                return target
    return None


def _parse_links(value: str) -> list[tuple[str, set[str]]]:
    links = []
    position = 0

    while position < len(value) and not value[position:].isspace():
        match = _LINK_RE.match(value, position)
        if match is None or match.end() == position:
            raise MalformedLinkHeader(f"cannot parse Link header {value!r} at character {position}")
        links.append((match["target"], _relations(match["params"])))
        position = match.end()

    return links


def _relations(params: str) -> set[str]:
    relations: set[str] = set()
    for name, raw_value in _PARAM_RE.findall(params):
        if name.lower() == "rel" and raw_value:
            relations.update(raw_value.strip('"').lower().split())
    return relations
