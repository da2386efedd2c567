"""Load YAML into plain Python values while remembering where each value stood in the file.

PyYAML's composer keeps a start mark on every node; we walk the node graph ourselves so that a
validation error about `users[1].name` can point at line and column of that very value.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import yaml

from .errors import SiteError

Path = tuple[str | int, ...]


@dataclass
class Marked:
    value: object
    marks: dict[Path, tuple[int, int]] = field(default_factory=dict)

    def mark(self, path: Path) -> tuple[int | None, int | None]:
        """Line and column (1-based) of `path`, or of its nearest ancestor that has one."""
        while True:
            if path in self.marks:
                return self.marks[path]
            if not path:
                return None, None
            path = path[:-1]


def _place(node: yaml.Node) -> tuple[int, int]:
    return node.start_mark.line + 1, node.start_mark.column + 1


def load(text: str, filename: str) -> Marked:
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        line, col = (mark.line + 1, mark.column + 1) if mark else (None, None)
        raise SiteError(f"not valid YAML: {e.problem or e.context}", filename, line, col) from None
    except yaml.YAMLError as e:  # reader errors (bad bytes) carry no mark
        raise SiteError(f"not valid YAML: {e}", filename) from None
    marked = Marked(None)
    if root is None:
        raise SiteError("the site file is empty", filename, 1, 1)
    constructor = yaml.SafeLoader("")

    def walk(node: yaml.Node, path: Path):
        marked.marks[path] = _place(node)
        if isinstance(node, yaml.MappingNode):
            out = {}
            for key_node, value_node in node.value:
                if not isinstance(key_node, yaml.ScalarNode):
                    raise SiteError("mapping keys must be plain names", filename, *_place(key_node),
                                    _dotted(path))
                key = str(key_node.value)
                if key == "<<":
                    raise SiteError("YAML merge keys are not supported", filename, *_place(key_node))
                if key in out:
                    raise SiteError(f"key '{key}' appears twice", filename, *_place(key_node),
                                    _dotted(path + (key,)))
                marked.marks[path + (key,)] = _place(value_node)
                out[key] = walk(value_node, path + (key,))
                # point errors about the key itself (unknown key) at the key
                marked.marks[path + (key, "__key__")] = _place(key_node)
            return out
        if isinstance(node, yaml.SequenceNode):
            return [walk(item, path + (i,)) for i, item in enumerate(node.value)]
        try:
            return constructor.construct_object(node, deep=True)
        except yaml.YAMLError as e:
            raise SiteError(f"bad value: {e}", filename, *_place(node), _dotted(path)) from None
        except (ValueError, TypeError, OverflowError) as e:  # e.g. an impossible !!timestamp
            raise SiteError(f"bad value: {e}", filename, *_place(node), _dotted(path)) from None

    try:
        marked.value = walk(root, ())
    except RecursionError:
        raise SiteError("the document nests too deeply", filename) from None
    return marked


def _dotted(path: Path) -> str:
    out = ""
    for part in path:
        if part == "__key__":
            continue
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


dotted = _dotted
