"""Read a YAML config file safely: bounded size, depth and alias expansion; ``${VAR}`` values.

``${VAR}`` and ``${VAR:-default}`` inside a value are replaced from the environment after the
YAML is parsed (comments are never expanded, and an environment value cannot inject YAML); a
plain (unquoted) value is then typed as if written out, so ``seed: ${SEED}`` is a number. A
variable without a value and without a default is an error naming it. Aliases are counted as
the values they expand to, so a "billion laughs" file is refused in milliseconds.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import yaml

from amalgam.errors import RecipeError

MAX_BYTES = 1 << 20  # a recipe or flow config is a few KB
MAX_VALUES = 100_000  # values after alias expansion
MAX_DEPTH = 64
VARIABLE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")
TAGGED = re.compile(r"(&\S+\s+)?!")  # a scalar written with an explicit tag (!!str ...)
# libyaml's parser bounds nesting (1000) and is linear; the pure-Python one is quadratic in depth
LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


def load_yaml(path: str | Path, what: str = "config") -> Any:
    """The YAML document in ``path`` (``what`` names it in errors), checked and expanded."""
    p = Path(path)
    try:
        with p.open("rb") as fh:
            raw = fh.read(MAX_BYTES + 1)
    except OSError as exc:
        raise RecipeError(f"{p}: cannot read {what} ({exc.strerror})") from None
    if len(raw) > MAX_BYTES:
        raise RecipeError(f"{p}: over {MAX_BYTES} bytes, too large for a {what}")
    try:
        text = raw.decode()
    except UnicodeDecodeError as exc:
        raise RecipeError(f"{p}: not UTF-8 text ({exc})") from None
    loader = LOADER(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        _Walk(str(p), text, loader).size(node, 0)
        return loader.construct_document(node)
    except yaml.YAMLError as exc:
        raise RecipeError(f"{p}: not valid YAML ({' '.join(str(exc).split())})") from None
    except RecursionError:
        raise RecipeError(f"{p}: not valid YAML (nested too deeply)") from None
    finally:
        loader.dispose()


class _Walk:
    """One pass over the composed node graph: expanded sizes (aliases share nodes, so each
    node's size is computed once), depth, and ``${VAR}`` substitution in scalars."""

    def __init__(self, where: str, text: str, loader: Any):
        self.where, self.text, self.loader = where, text, loader
        self.sizes: dict[int, int] = {}

    def fail(self, node: yaml.Node, message: str) -> RecipeError:
        return RecipeError(f"{self.where}: line {node.start_mark.line + 1}: {message}")

    def size(self, node: yaml.Node, depth: int) -> int:
        if depth > MAX_DEPTH:
            raise self.fail(node, f"nested deeper than {MAX_DEPTH} levels")
        known = self.sizes.get(id(node))
        if known is not None:
            if known < 0:
                raise self.fail(node, "an alias refers to a value that contains it")
            return known
        self.sizes[id(node)] = -1
        if isinstance(node, yaml.ScalarNode):
            self.expand(node)
            n = 1
        elif isinstance(node, yaml.SequenceNode):
            n = 1 + sum(self.size(item, depth + 1) for item in node.value)
        else:
            n = 1 + sum(self.size(k, depth + 1) + self.size(v, depth + 1) for k, v in node.value)
        if n > MAX_VALUES:
            raise self.fail(node, f"expands to over {MAX_VALUES} values (aliases of aliases?)")
        self.sizes[id(node)] = n
        return n

    def expand(self, node: yaml.ScalarNode) -> None:
        if "${" not in node.value:
            return

        def value(match: re.Match) -> str:
            name, default = match.group(1), match.group(2)
            found = os.environ.get(name)
            if found is not None:
                return found
            if default is not None:
                return default
            raise self.fail(node, f"${{{name}}} is not set (set it, or write ${{{name}:-default}})")

        written = self.text[node.start_mark.index : node.end_mark.index]
        node.value = VARIABLE.sub(value, node.value)
        if not node.style and not TAGGED.match(written):  # plain, untagged: typed as if written
            node.tag = self.loader.resolve(yaml.ScalarNode, node.value, (True, False))
