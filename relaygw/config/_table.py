"""
Typed, key-path-aware access to one raw TOML table.

L{Table} is the only code besides L{relaygw.config._load} that sees raw TOML
values.  It knows the key path of every value it hands out, so each problem
becomes a L{ConfigError} naming file, 0-based key path and problem.  Unknown
keys are refused when a table is opened, before any value of it is read, so a
misspelt key is reported rather than the required key it was meant to be.
"""

from __future__ import annotations

import datetime
import difflib
import json
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import TypeVar

from attrs import frozen

from relaygw.config._units import parse_duration, parse_size
from relaygw.errors import ConfigError

_T = TypeVar("_T")
#: A TOML bare key; any other key is shown quoted in key paths.
_BARE_KEY = re.compile(r"[A-Za-z0-9_-]+\Z")
_S = TypeVar("_S", bound=str)


def describe(value: object) -> str:
    """A TOML value named for a message, such as C{"the integer 25"}."""
    if isinstance(value, bool):
        return f"the boolean {str(value).lower()}"
    if isinstance(value, str):
        return f"the string {value!r}"
    if isinstance(value, int):
        return f"the integer {value}"
    if isinstance(value, float):
        return f"the float {value}"
    if isinstance(value, list):
        return "an array"
    if isinstance(value, dict):
        return "a table"
    if isinstance(value, (datetime.date, datetime.time)):
        return "a date/time"
    return "a value"  # pragma: no cover - tomllib produces nothing else


@frozen
class Source:
    """
    Where the text came from.

    @ivar name: the file name as given (C{str(path)}), or C{"<embedded default>"}.
    @ivar base_dir: the absolute directory that relative paths resolve against.
    """

    name: str
    base_dir: Path

    def error(self, key_path: str, problem: str) -> ConfigError:
        """A L{ConfigError} for this source."""
        return ConfigError(self.name, key_path, problem)

    def resolve(self, text: str) -> Path:
        """C{text} as an absolute path, relative ones against L{base_dir}."""
        path = Path(text)
        return path if path.is_absolute() else self.base_dir / path


class Table:
    """
    One TOML table (a section, an array-of-tables entry or an inline table)
    with the keys it may hold.
    """

    def __init__(
        self, source: Source, path: str, data: Mapping[str, object], keys: Iterable[str]
    ) -> None:
        """
        @param path: the key path of the table itself (C{""} for the document).
        @param keys: every key this table may hold.
        @raise ConfigError: for the first key that is not in C{keys}.
        """
        self.source = source
        self.location = path
        self._data = data
        self._keys = frozenset(keys)
        for key in data:
            if key not in self._keys:
                close = difflib.get_close_matches(key, sorted(self._keys), n=1)
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                # Any string may be a key: one that is not a bare key is shown
                # quoted, as TOML writes it ("gateway." + "." is no key path).
                shown = key if _BARE_KEY.match(key) else json.dumps(key, ensure_ascii=False)
                raise self.error(shown, f"unknown key{hint}")

    def key_path(self, key: str) -> str:
        """The key path of C{key} in this table."""
        return f"{self.location}.{key}" if self.location else key

    def error(self, key: str, problem: str) -> ConfigError:
        """A L{ConfigError} at C{key} of this table (C{""}: the table itself)."""
        return self.source.error(self.key_path(key) if key else self.location, problem)

    def has(self, key: str) -> bool:
        """Whether C{key} is written in this table."""
        return self._get(key) is not None

    def _get(self, key: str) -> object | None:
        assert key in self._keys, f"{key!r} read but not declared for {self.location!r}"
        return self._data.get(key)

    def _typed(self, key: str, kind: type[_T], what: str, value: object) -> _T:
        if not isinstance(value, kind) or (isinstance(value, bool) and kind is not bool):
            raise self.error(key, f"expected {what}, got {describe(value)}")
        return value

    def string(self, key: str, default: str) -> str:
        """A string, or C{default} when absent."""
        value = self._get(key)
        return default if value is None else self._typed(key, str, "a string", value)

    def required_string(self, key: str) -> str:
        """A non-empty string that must be present."""
        value = self._get(key)
        if value is None:
            raise self.error(key, "required, but missing")
        text = self._typed(key, str, "a string", value)
        if not text.strip():
            raise self.error(key, "must not be empty")
        return text

    def boolean(self, key: str, default: bool) -> bool:
        """C{true} or C{false}, or C{default} when absent."""
        value = self._get(key)
        return default if value is None else self._typed(key, bool, "true or false", value)

    def integer(self, key: str, default: int, minimum: int = 1, maximum: int | None = None) -> int:
        """An integer in C{[minimum, maximum]}, or C{default} when absent."""
        value = self._get(key)
        if value is None:
            return default
        number = self._typed(key, int, "an integer", value)
        if number < minimum or (maximum is not None and number > maximum):
            bounds = f"from {minimum} to {maximum}" if maximum is not None else f"{minimum} or more"
            raise self.error(key, f"{number} is out of range; it must be {bounds}")
        return number

    def choice(self, key: str, default: _S, choices: Sequence[_S]) -> _S:
        """One of C{choices} (exact spelling), or C{default} when absent."""
        text = self.string(key, default)
        for option in choices:
            if option == text:
                return option
        listed = ", ".join(f'"{option}"' for option in choices)
        raise self.error(key, f"{text!r} is not one of {listed}")

    def parsed(self, key: str, parse: Callable[[str], _T], default: _T) -> _T:
        """A string turned into a value by C{parse} (which raises L{ValueError})."""
        value = self._get(key)
        if value is None:
            return default
        text = self._typed(key, str, "a string", value)
        try:
            return parse(text)
        except ValueError as e:
            raise self.error(key, str(e)) from None

    def size(self, key: str, default: int) -> int:
        """A size in bytes (integer or C{"36MiB"}), at least 1, or C{default}."""
        value = self._get(key)
        if value is None:
            return default
        if isinstance(value, bool) or not isinstance(value, (int, str)):
            raise self.error(
                key, f'expected a size (bytes, or a string like "36MiB"), got {describe(value)}'
            )
        try:
            size = parse_size(value)
        except ValueError as e:
            raise self.error(key, str(e)) from None
        if size == 0:
            raise self.error(key, f"{value!r} is zero; a size here must be at least 1 byte")
        return size

    def duration(
        self, key: str, default: datetime.timedelta, zero: bool = False
    ) -> datetime.timedelta:
        """
        A duration string, or C{default}.

        @param zero: whether C{"0s"} is allowed (it disables the feature).
        """
        span = self.parsed(key, parse_duration, default)
        if not zero and span == datetime.timedelta(0):
            raise self.error(key, "must be longer than 0s")
        return span

    def path(self, key: str, default: str | None) -> Path | None:
        """A path, absolute or relative to the file's directory; C{""} is none."""
        text = self.string(key, default or "")
        return self.source.resolve(text) if text else None

    def array(self, key: str, default: Sequence[object] | None) -> list[object] | None:
        """A raw array, or C{default} (C{None}: required) when absent."""
        value = self._get(key)
        if value is None:
            if default is None:
                raise self.error(key, "required, but missing")
            return list(default)
        return self._typed(key, list, "an array", value)

    def strings(self, key: str, default: Sequence[str] | None) -> tuple[str, ...]:
        """An array of strings; C{default} C{None} makes the key required."""
        return self.parsed_list(key, lambda text: text, default)

    def parsed_list(
        self, key: str, parse: Callable[[str], _T], default: Sequence[str] | None
    ) -> tuple[_T, ...]:
        """
        An array of strings, each turned into a value by C{parse}; errors
        name the element, C{key[i]}.  C{default} (texts) is parsed too.
        """
        items = self.array(key, default)
        assert items is not None
        result = []
        for i, item in enumerate(items):
            element = f"{key}[{i}]"
            if not isinstance(item, str):
                raise self.error(element, f"expected a string, got {describe(item)}")
            try:
                result.append(parse(item))
            except ValueError as e:
                raise self.error(element, str(e)) from None
        return tuple(result)

    def table(self, key: str, keys: Iterable[str]) -> Table | None:
        """A sub-table (section or inline), or C{None} when absent."""
        value = self._get(key)
        if value is None:
            return None
        data = self._typed(key, dict, "a table", value)
        return Table(self.source, self.key_path(key), data, keys)

    def tables(self, key: str, keys: Iterable[str]) -> list[Table]:
        """An array of tables (C{[[key]]} or inline tables), C{[]} when absent."""
        if isinstance(self._get(key), dict):
            hint = f" ([[{key}]])" if not self.location else ""
            raise self.error(key, f"expected an array of tables{hint}, got a table")
        items = self.array(key, ())
        assert items is not None
        result = []
        for i, item in enumerate(items):
            path = f"{self.key_path(key)}[{i}]"
            if not isinstance(item, dict):
                raise self.source.error(path, f"expected a table, got {describe(item)}")
            result.append(Table(self.source, path, item, keys))
        return result

    def sub(self, key: str, keys: Iterable[str]) -> Table:
        """A sub-table, or an empty one when absent (so its defaults apply)."""
        return self.table(key, keys) or Table(self.source, self.key_path(key), {}, keys)
