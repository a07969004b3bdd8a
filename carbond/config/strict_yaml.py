"""YAML as carbond reads its own files (carbond.yaml, the web config): safe types only, and
refused where a lenient parser would quietly do something else.

- A key given twice in one mapping is refused, naming both lines. PyYAML keeps the last one:
  a second `tls_server_config: {}` served plain HTTP, a second `basic_auth_users: {}` served
  /metrics without credentials, a second `budgets:` replaced the first. exporter-toolkit
  refuses them (Go's UnmarshalStrict); so does carbond. `<<` merge keys may still be
  overridden by the mapping's own keys, as YAML defines.
- Aliases may add at most MAX_ALIAS_NODES nodes to the document beyond those written in it. The
  408-byte billion-laughs file composes into a few dozen shared nodes but stands for 10**9;
  anything that walks or prints it (validation, an error message) took 21 s and 3 GB. Sizes
  are counted while composing, so such a file is refused after a few thousand nodes, in
  milliseconds and bounded memory. An alias inside the node it names (a cycle) is refused too.
"""

from __future__ import annotations

from typing import Any

import yaml
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

MAX_ALIAS_NODES = 10_000
_MERGE_TAG = "tag:yaml.org,2002:merge"


class StrictYamlError(Exception):
    """A document that parses but is refused; `line` is 1-based."""

    def __init__(self, line: int, problem: str) -> None:
        super().__init__(f"line {line}: {problem}")
        self.line = line
        self.problem = problem


def _shown_key(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:79] + "…"


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that sizes every node as it is composed and checks each mapping's keys."""

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self._sizes: dict[int, int] = {}  # id(node) -> nodes it stands for, aliases expanded
        self._composed = 0  # nodes actually written in the document so far

    def compose_node(self, parent: Node | None, index: object) -> Node:
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            target = self.anchors.get(event.anchor)
            if target is not None and id(target) not in self._sizes:
                raise StrictYamlError(event.start_mark.line + 1,
                                      f"alias *{_cut(event.anchor)} is inside the node it "
                                      "names (a recursive alias)")
            return super().compose_node(parent, index)
        node = super().compose_node(parent, index)
        self._composed += 1
        if isinstance(node, ScalarNode):
            size = 1
        elif isinstance(node, SequenceNode):
            size = 1 + sum(self._sizes[id(child)] for child in node.value)
        else:
            assert isinstance(node, MappingNode)
            size = 1 + sum(self._sizes[id(k)] + self._sizes[id(v)] for k, v in node.value)
        self._sizes[id(node)] = size
        if size - self._composed > MAX_ALIAS_NODES:
            raise StrictYamlError(node.start_mark.line + 1,
                                  f"aliases expand to more than {MAX_ALIAS_NODES:,} nodes "
                                  "beyond those written (an alias bomb?)")
        return node

    def compose_mapping_node(self, anchor: str | None) -> MappingNode:
        node = super().compose_mapping_node(anchor)
        first: dict[Any, int] = {}
        for key_node, _ in node.value:
            if not isinstance(key_node, ScalarNode) or key_node.tag == _MERGE_TAG:
                continue  # a complex key cannot be hashed anyway; construction refuses it
            key = self.construct_object(key_node)
            line = key_node.start_mark.line + 1
            if key in first:
                raise StrictYamlError(line, f"duplicate key {_shown_key(key)} (first at line "
                                      f"{first[key]})")
            first[key] = line
        return node


def _cut(text: str) -> str:
    return text if len(text) <= 40 else text[:39] + "…"


def load(text: str) -> Any:
    """One YAML document as Python data; StrictYamlError for a duplicate key or an alias bomb,
    yaml.YAMLError (with its marks) for what is not YAML at all."""
    loader = _StrictLoader(text)
    try:
        return loader.get_single_data()
    finally:
        loader.dispose()
