"""A python task's return value as JSON: the rules, in one place (the README's "Return values" lists them).

* JSON values stay as they are; tuples become lists; dict keys that are not strings become strings
  (numbers and booleans as ``json`` writes them, anything else as its ``repr``, noted).
* Non-finite floats (NaN, +inf, -inf) become ``null``, as JavaScript's ``JSON.stringify`` and orjson
  write them (JSON has no such numbers), and the task's log says how many and where.
* numpy scalars become numbers or booleans (``.item()``); arrays of at most ``MAX_LIST_ELEMENTS``
  elements become nested lists. A larger array is saved with ``np.save`` as ``return-arrays/NAME.npy``
  beside ``return.json`` (``NAME`` from its place in the value, e.g. ``cl.tt``) and the JSON holds
  ``{"$npy": "return-arrays/cl.tt.npy", "dtype": "float64", "shape": [2001, 4]}``. NaN stays NaN there.
* sets become sorted lists (iteration order if they do not sort); paths become strings; ``datetime``,
  ``date`` and ``time`` ISO 8601 strings; ``timedelta`` seconds; ``Decimal`` and ``Fraction`` floats;
  ``complex`` ``{"real": r, "imag": i}``; ``bytes`` ``{"$base64": "..."}``; an ``Enum`` its value; a
  dataclass instance a mapping of its fields.
* Anything else (and a circular reference) is written as its ``repr``, and the task's log says so. A
  value is never a reason for a task to fail after its work is done.

numpy is never imported here: a numpy value exists only if the task's code imported numpy already.
"""

from __future__ import annotations

import base64
import dataclasses
import datetime
import decimal
import enum
import fractions
import json
import math
import os
import re
import shutil
import sys
from collections.abc import Mapping
from typing import Any

MAX_LIST_ELEMENTS = 10**6  # a larger numpy array goes to its own .npy file
ARRAYS_DIR = "return-arrays"  # beside return.json, in the work directory and in the published outputs
_NAME_CHARS = re.compile(r"[^A-Za-z0-9_.-]+")
_SHOWN = 3  # places named in one note


def encode(value: Any, work_dir: str) -> tuple[str, list[str]]:
    """``value`` as JSON text, and notes for the task's log on everything not written as it stands.

    Large numpy arrays are saved under ``work_dir/ARRAYS_DIR`` (an earlier attempt's are removed first).
    Raises ``OSError`` only: when an array cannot be saved.
    """
    arrays = os.path.join(work_dir, ARRAYS_DIR)
    if os.path.lexists(arrays):
        shutil.rmtree(arrays, ignore_errors=True)
    try:  # the common case, JSON already: the C encoder alone
        return json.dumps(value, allow_nan=False), []
    except Exception:  # noqa: BLE001 - TypeError, ValueError (NaN), RecursionError, or the value's own methods
        pass
    converter = _Converter(work_dir)
    try:
        plain = converter.convert(value, ())
    except RecursionError:
        converter.note("repr", "value", "a value nested too deeply")
        plain = _repr(value)
    except OSError:
        raise
    except Exception as exc:  # noqa: BLE001 - a value whose own methods raise (items(), __fspath__...)
        reason = (str(exc).strip().splitlines() or [""])[0]
        converter.note("repr", "value", f"a value that could not be converted ({type(exc).__name__}: {reason})")
        plain = _repr(value)
    return json.dumps(plain, allow_nan=False), converter.notes()


class _Converter:
    def __init__(self, work_dir: str) -> None:
        self.work_dir = work_dir
        self.np: Any = sys.modules.get("numpy")
        self.seen: set[int] = set()  # containers on the current path: a cycle is written as a repr
        self.names: set[str] = set()
        self.places: dict[tuple[str, str], list[str]] = {}

    def note(self, kind: str, place: str, what: str) -> None:
        self.places.setdefault((kind, what), []).append(place)

    def notes(self) -> list[str]:
        out = []
        for (kind, what), places in self.places.items():
            shown = ", ".join(places[:_SHOWN]) + (f" and {len(places) - _SHOWN} more" if len(places) > _SHOWN else "")
            if kind == "nan":
                out.append(f"{len(places)} non-finite float(s) written as null (at {shown})")
            elif kind == "npy":
                out.append(f"{what} saved as {shown}")
            else:
                out.append(f"{what} written as its repr (at {shown})")
        return out

    def convert(self, v: Any, path: tuple[str, ...]) -> Any:
        if v is None or isinstance(v, (str, bool, int)):
            return v
        if isinstance(v, float):
            if math.isfinite(v):
                return v
            self.note("nan", _place(path), "")
            return None
        np = self.np
        if np is not None and isinstance(v, np.ndarray):
            return self._array(v, path)
        if np is not None and isinstance(v, np.generic):
            return self.convert(v.item(), path)
        if isinstance(v, (Mapping, list, tuple, set, frozenset)) or dataclasses.is_dataclass(v):
            if id(v) in self.seen:
                self.note("repr", _place(path), "a circular reference")
                return _repr(v)
            self.seen.add(id(v))
            try:
                return self._container(v, path)
            finally:
                self.seen.discard(id(v))
        if isinstance(v, enum.Enum):
            return self.convert(v.value, path)
        if isinstance(v, os.PathLike):  # pathlib paths among them
            return self.convert(os.fspath(v), path)
        if isinstance(v, (datetime.date, datetime.time)):  # datetime is a date
            return v.isoformat()
        if isinstance(v, datetime.timedelta):
            return v.total_seconds()
        if isinstance(v, (decimal.Decimal, fractions.Fraction)):
            return self.convert(float(v), path)
        if isinstance(v, complex):
            return {"real": self.convert(v.real, (*path, "real")), "imag": self.convert(v.imag, (*path, "imag"))}
        if isinstance(v, (bytes, bytearray, memoryview)):
            return {"$base64": base64.b64encode(bytes(v)).decode("ascii")}
        self.note("repr", _place(path), f"a value of type {type(v).__name__!r}")
        return _repr(v)

    def _container(self, v: Any, path: tuple[str, ...]) -> Any:
        if dataclasses.is_dataclass(v) and not isinstance(v, type):
            v = {f.name: getattr(v, f.name) for f in dataclasses.fields(v)}
        elif isinstance(v, (set, frozenset)):
            try:
                v = sorted(v)
            except TypeError:
                v = list(v)
        elif isinstance(v, type):  # a dataclass itself, not an instance
            self.note("repr", _place(path), f"a value of type {type(v).__name__!r}")
            return _repr(v)
        if isinstance(v, Mapping):
            out = {}
            for key, item in v.items():
                name = self._key(key, path)
                out[name] = self.convert(item, (*path, name))
            return out
        return [self.convert(item, (*path, str(i))) for i, item in enumerate(v)]

    def _key(self, key: Any, path: tuple[str, ...]) -> str:
        np = self.np
        if np is not None and isinstance(key, np.generic):
            key = key.item()
        if isinstance(key, str):
            return key
        if key is None or isinstance(key, (bool, int, float)):
            return json.dumps(key)  # as json writes it: true, 1, 1.5, NaN
        self.note("repr", _place(path), f"a key of type {type(key).__name__!r}")
        return _repr(key)

    def _array(self, a: Any, path: tuple[str, ...]) -> Any:
        np = self.np
        if a.size <= MAX_LIST_ELEMENTS:
            if a.dtype.kind in "biu" or (a.dtype.kind == "f" and bool(np.isfinite(a).all())):
                return a.tolist()  # numbers only: nothing left to convert
            return self.convert(a.tolist(), path)
        name = self._name(path)
        rel = f"{ARRAYS_DIR}/{name}.npy"
        os.makedirs(os.path.join(self.work_dir, ARRAYS_DIR), exist_ok=True)
        try:
            np.save(os.path.join(self.work_dir, rel), a)
        except OSError:
            raise
        except Exception:  # noqa: BLE001 - e.g. an object array whose items do not pickle
            self.names.discard(name)
            self.note("repr", _place(path), f"an array of dtype {a.dtype} that np.save refused")
            return _repr(a)
        self.note("npy", rel, f"{_place(path)}: an array of {a.size} elements (over {MAX_LIST_ELEMENTS})")
        return {"$npy": rel, "dtype": str(a.dtype), "shape": list(a.shape)}

    def _name(self, path: tuple[str, ...]) -> str:
        base = _NAME_CHARS.sub("_", ".".join(path))[:100].strip(".") or "value"
        name, n = base, 1
        while name in self.names:
            n += 1
            name = f"{base}-{n}"
        self.names.add(name)
        return name


def _place(path: tuple[str, ...]) -> str:
    """Where a value sits in the return value, ``value["cl"][0]`` written ``cl.0`` (``value`` for the top)."""
    return ".".join(path) or "value"


def _repr(v: Any) -> str:
    try:
        return repr(v)
    except Exception:  # noqa: BLE001 - a broken __repr__ must not fail a task whose work is done
        return f"<{type(v).__name__} object>"
