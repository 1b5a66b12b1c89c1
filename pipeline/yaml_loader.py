"""A safe YAML loader that keeps line numbers, for error messages that point into files.

Mappings load as :class:`LocatedDict` (a ``dict`` with ``line`` and ``key_lines``) and sequences as
:class:`LocatedList` (a ``list`` with ``line`` and ``item_lines``); everything else is what
``yaml.safe_load`` gives.  Duplicate keys are an error (PyYAML silently keeps the last one).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from .errors import PipelineDefinitionError

__all__ = ["LocatedDict", "LocatedList", "load_yaml_file", "load_yaml_text", "line_of", "item_line"]


class LocatedDict(dict):
    """A dict that knows the 1-based line of itself and of each of its keys."""

    line: int | None = None
    file: str | None = None

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.key_lines: dict[Any, int] = {}

    def copy_with(self, items: dict[Any, Any]) -> LocatedDict:
        """A LocatedDict of ``items`` with this one's line information."""
        out = LocatedDict(items)
        out.key_lines = dict(self.key_lines)
        out.line = self.line
        out.file = self.file
        return out


class LocatedList(list):
    """A list that knows the 1-based line of itself and of each item."""

    line: int | None = None
    file: str | None = None

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        self.item_lines: list[int] = []


def line_of(obj: Any, key: Any = None, default: int | None = None) -> int | None:
    """Line of a key in a LocatedDict (or of the object itself), else ``default``."""
    if key is not None and isinstance(obj, LocatedDict):
        return obj.key_lines.get(key, obj.line if obj.line is not None else default)
    return getattr(obj, "line", None) or default


def item_line(obj: Any, index: int, default: int | None = None) -> int | None:
    """Line of item ``index`` of a LocatedList."""
    if isinstance(obj, LocatedList) and index < len(obj.item_lines):
        return obj.item_lines[index]
    return getattr(obj, "line", None) or default


class _Loader(yaml.SafeLoader):
    source: str | None = None


def _construct_mapping(loader: _Loader, node: yaml.MappingNode) -> LocatedDict:
    loader.flatten_mapping(node)
    out = LocatedDict()
    out.line = node.start_mark.line + 1
    out.file = loader.source
    for key_node, value_node in node.value:
        key = loader.construct_object(key_node, deep=True)
        try:
            hash(key)
        except TypeError:
            raise PipelineDefinitionError(
                f"unhashable mapping key {key!r}", file=loader.source, line=key_node.start_mark.line + 1
            ) from None
        if key in out:
            raise PipelineDefinitionError(
                f"duplicate key {key!r} (first at line {out.key_lines[key]}); each key may appear once",
                file=loader.source,
                line=key_node.start_mark.line + 1,
            )
        out[key] = loader.construct_object(value_node, deep=True)
        out.key_lines[key] = key_node.start_mark.line + 1
    return out


def _construct_sequence(loader: _Loader, node: yaml.SequenceNode) -> LocatedList:
    out = LocatedList(loader.construct_object(child, deep=True) for child in node.value)
    out.item_lines = [child.start_mark.line + 1 for child in node.value]
    out.line = node.start_mark.line + 1
    out.file = loader.source
    return out


_Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)
_Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_SEQUENCE_TAG, _construct_sequence)


def load_yaml_text(text: str, source: str | None = None) -> Any:
    """Parse YAML text (one document) keeping line numbers.

    Raises
    ------
    PipelineDefinitionError
        Syntax errors and duplicate keys, with the source name and line.
    """
    loader = _Loader(text)
    loader.source = source
    try:
        return loader.get_single_data()
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = mark.line + 1 if mark is not None else None
        problem = exc.problem or exc.context or "syntax error"
        raise PipelineDefinitionError(f"invalid YAML: {problem}", file=source, line=line) from None
    except yaml.YAMLError as exc:
        raise PipelineDefinitionError(f"invalid YAML: {exc}", file=source) from None
    finally:
        loader.dispose()


def load_yaml_file(path: str | Path, *, what: str = "file") -> Any:
    """Read and parse a YAML file keeping line numbers (see :func:`load_yaml_text`)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise PipelineDefinitionError(f"{what} {path} does not exist") from None
    except OSError as exc:
        raise PipelineDefinitionError(f"cannot read {what} {path}: {exc.strerror}") from None
    return load_yaml_text(text, str(path))
