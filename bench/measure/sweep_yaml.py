"""A sweep file read safely: a regular file of bounded size, parsed as YAML with safe_load's types
only, bounded in values and nesting before anything is built, and every key's line kept so that an
error names where it is."""
from __future__ import annotations

import os
import stat
from pathlib import Path

import yaml

from bench.cli import BadInput

MAX_BYTES = 256 << 10
MAX_NODES = 20_000  # YAML values, aliases expanded
MAX_DEPTH = 32  # nesting of mappings and lists
# The YAML types a sweep holds, by kind of node: safe_load's plain ones (and the `<<` merge key).
TAGS = {"ScalarNode": {"str", "int", "float", "bool", "null", "merge"},
        "SequenceNode": {"seq"}, "MappingNode": {"map"}}


class SweepError(BadInput):
    """A sweep file or an override is wrong; the message is one line: where, which key, what.
    Characters that would break the line (newlines, NUL, escapes) are shown escaped."""

    def __init__(self, message: str):
        super().__init__("".join(c if c.isprintable() else ascii(c)[1:-1] for c in message))


def first_line(e: BaseException) -> str:
    """An exception's message as one short line (its type where it has none)."""
    return (str(e).strip().splitlines() or [type(e).__name__])[0][:200]


def read_text(path: Path) -> str:
    """The file as text: at most MAX_BYTES of UTF-8, read no further than that. Only a regular file
    is read: a FIFO or device could block or never end, so it is refused before it is opened, and
    the file is opened without blocking and checked again in case it was swapped in between."""
    try:
        _regular(path, os.stat(path).st_mode)
        with open(os.open(path, os.O_RDONLY | os.O_NONBLOCK), "rb") as f:
            _regular(path, os.fstat(f.fileno()).st_mode)
            data = f.read(MAX_BYTES + 1)
    except (OSError, ValueError) as e:  # ValueError: a NUL byte in the path
        why = getattr(e, "strerror", None) or e
        raise SweepError(f"{path}: cannot read the sweep file ({why})") from None
    if len(data) > MAX_BYTES:
        raise SweepError(f"{path}: larger than {MAX_BYTES >> 10} KiB; not a sweep file")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data[:e.start].count(b"\n") + 1
        raise SweepError(f"{path}:{line}: not UTF-8 text (byte {e.start}); not a sweep file") from None


def _regular(path: Path, mode: int) -> None:
    if not stat.S_ISREG(mode):
        kind = {"d": "a directory", "p": "a FIFO", "c": "a device", "b": "a device",
                "s": "a socket"}.get(stat.filemode(mode)[0], "not a regular file")
        raise SweepError(f"{path}: {kind}, not a regular file; not a sweep file")


_Loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # libyaml's parser when present: 10x faster


class Doc:
    """The parsed document (None when empty) plus the line of every key and item, for error
    messages. `path` names the text in messages: a file, or an option whose value it is, which has
    no line numbers (numbered=False)."""

    def __init__(self, path, text: str, numbered: bool = True):
        self.path, self.numbered = path, numbered
        self.lines: dict[tuple, int] = {}
        try:
            self._scan(text)
            loader = _Loader(text)
            try:
                node = loader.get_single_node()
                if node is not None:
                    self._bound(node)
                self.data = None if node is None else self._convert(loader, node, ())
            finally:
                loader.dispose()
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None) or getattr(e, "context_mark", None)
            problem = getattr(e, "problem", None) or getattr(e, "reason", None) or type(e).__name__
            at = self._at(mark.line + 1 if mark else None)
            raise SweepError(f"{at}: not valid YAML ({problem})") from None
        except (RecursionError, MemoryError):
            raise SweepError(f"{path}: too large or nested too deeply for a sweep file") from None
        except ValueError as e:  # e.g. an integer of more digits than Python converts
            raise SweepError(f"{path}: not a usable value ({first_line(e)})") from None

    def _at(self, line: int | None) -> str:
        return f"{self.path}:{line}" if self.numbered and line else str(self.path)

    def _scan(self, text: str) -> None:
        """Walk the parser's events once, before any value is built, and stop at the first one past
        MAX_DEPTH levels of nesting or MAX_NODES values: parsing deep nesting costs time that grows
        with the square of the depth, so it must end early."""
        loader = _Loader(text)
        depth = count = 0
        try:
            while loader.check_event():
                event = loader.get_event()
                count += 1
                if isinstance(event, (yaml.MappingStartEvent, yaml.SequenceStartEvent)):
                    depth += 1
                elif isinstance(event, (yaml.MappingEndEvent, yaml.SequenceEndEvent)):
                    depth -= 1
                if depth > MAX_DEPTH or count > MAX_NODES:
                    what = f"nested more than {MAX_DEPTH} levels deep" if depth > MAX_DEPTH \
                        else f"more than {MAX_NODES} values"
                    raise SweepError(f"{self._at(event.start_mark.line + 1)}: {what}; not a sweep file")
        finally:
            loader.dispose()

    def _bound(self, root) -> None:
        """Refuse, before anything is built, a document whose aliases expand past MAX_NODES values
        (an alias bomb), that refers to itself, that nests deeper than MAX_DEPTH, or that has a
        node of a type safe_load would not build (`!!python/...`, `!!binary`, local tags), on a
        mapping or list as much as on a plain value."""
        sizes: dict[int, int] = {}

        def size(node, depth: int) -> int:
            if id(node) in sizes:
                if sizes[id(node)] < 0:
                    self._fail(node, "an alias refers to the value that contains it")
                return sizes[id(node)]
            if depth > MAX_DEPTH:
                self._fail(node, f"nested more than {MAX_DEPTH} levels deep")
            tag = node.tag.removeprefix("tag:yaml.org,2002:")
            if tag not in TAGS[type(node).__name__]:
                shown = ("!!" + tag if tag != node.tag else tag)[:80]
                self._fail(node, f"YAML tag {shown} is not allowed (a sweep holds mappings, lists, "
                           "strings, numbers, true/false and null; quote a value to make it a string)")
            sizes[id(node)] = -1
            children = (node.value if isinstance(node, yaml.SequenceNode) else
                        [n for kv in node.value for n in kv] if isinstance(node, yaml.MappingNode) else [])
            total = 1
            for child in children:
                total += size(child, depth + 1)
                if total > MAX_NODES:
                    self._fail(node, f"expands to more than {MAX_NODES} values (aliases?); not a sweep file")
            sizes[id(node)] = total
            return total

        size(root, 0)

    def _fail(self, node, msg: str):
        raise SweepError(f"{self._at(node.start_mark.line + 1)}: {msg}")

    def _convert(self, loader, node, at: tuple):
        self.lines[at] = node.start_mark.line + 1
        if isinstance(node, yaml.MappingNode):
            loader.flatten_mapping(node)
            out = {}
            for key_node, value_node in node.value:
                if not isinstance(key_node, yaml.ScalarNode):
                    self._fail(key_node, "a key must be a plain value, not a mapping or list")
                key = loader.construct_object(key_node, deep=True)
                if key in out:
                    self._fail(key_node, f"duplicate key '{str(key)[:80]}'")
                out[key] = self._convert(loader, value_node, at + (key,))
                self.lines[at + (key,)] = key_node.start_mark.line + 1
            return out
        if isinstance(node, yaml.SequenceNode):
            return [self._convert(loader, n, at + (i,)) for i, n in enumerate(node.value)]
        return loader.construct_object(node, deep=True)

    def where(self, at: tuple) -> str:
        while at and at not in self.lines:
            at = at[:-1]
        return f"{self.path}:{self.lines.get(at, 1)}"
