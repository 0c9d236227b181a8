"""Typed JSON for values crossing a process boundary (standard library only; also copied into the jail).

JSON alone loses Python types (tuples become lists, dict keys become strings, sets fail), which is
why comparisons with Python's ``==`` need this. Encoding: ``None``, ``bool``, ``int``, ``float``,
``str`` and ``list`` are JSON themselves; everything else is a tagged object ``{"$": tag, "v": ...}``
(``tuple``, ``dict`` as a list of pairs, ``set``, ``frozenset``, ``bytes``, ``bytearray``,
``complex``, ``bigint`` for integers too long for JSON's decimal limit, ``ref`` for an object left in
the process that made it). Subclasses of those types (a ``namedtuple``, an ``IntEnum``, a dict
subclass) are reduced to the base type through the base type's own methods, so a rigged ``__eq__`` or
``__iter__`` never travels: the receiver only ever holds built-in values.
"""

import base64

_TAGS = ("tuple", "dict", "set", "frozenset", "bytes", "bytearray", "complex", "bigint", "ref")


class Unencodable(Exception):
    """A value this codec cannot carry (and the caller has no ``ref`` table)."""


def encode(value, refs=None, depth=0):
    """``value`` as typed JSON data. Objects of other types are appended to ``refs`` when it is a list
    (and sent as a ``ref`` to their index), handed to ``refs`` when it is a callable (which returns
    their encoding), or raise ``Unencodable``."""
    if depth > 200:
        raise Unencodable("nested too deeply")
    d = depth + 1
    if value is None or value is True or value is False:
        return value
    if isinstance(value, int):
        value = int.__int__(value)
        if value.bit_length() > 12000:
            return {"$": "bigint", "v": hex(value)}
        return value
    if isinstance(value, float):
        return float.__float__(value)
    if isinstance(value, str):
        return str.__str__(value)
    if isinstance(value, list):
        return [encode(x, refs, d) for x in list.__iter__(value)]
    if isinstance(value, tuple):
        return {"$": "tuple", "v": [encode(x, refs, d) for x in tuple.__iter__(value)]}
    if isinstance(value, dict):
        return {"$": "dict", "v": [[encode(k, refs, d), encode(v, refs, d)] for k, v in dict.items(value)]}
    if isinstance(value, frozenset):
        return {"$": "frozenset", "v": [encode(x, refs, d) for x in frozenset.__iter__(value)]}
    if isinstance(value, set):
        return {"$": "set", "v": [encode(x, refs, d) for x in set.__iter__(value)]}
    if isinstance(value, bytes | bytearray):
        tag = "bytes" if isinstance(value, bytes) else "bytearray"
        return {"$": tag, "v": base64.b64encode(bytes(memoryview(value))).decode("ascii")}
    if isinstance(value, complex):
        return {"$": "complex", "v": [complex.real.__get__(value), complex.imag.__get__(value)]}
    if getattr(type(value), "__module__", None) == "numpy" and getattr(value, "ndim", None) == 0:
        return encode(value.item(), refs, d)  # numpy scalars, as Python's == treats them
    if refs is None:
        raise Unencodable(f"cannot carry a value of type {_type_name(value)}")
    if callable(refs):
        return refs(value)
    refs.append(value)
    return {"$": "ref", "v": len(refs) - 1}


def decode(data, refs=None):
    """Built-in values from typed JSON data; ``ref`` tags resolve through ``refs`` (a callable)."""
    if data is None or isinstance(data, bool | int | float | str):
        return data
    if isinstance(data, list):
        return [decode(x, refs) for x in data]
    if not isinstance(data, dict) or data.get("$") not in _TAGS:
        raise ValueError(f"not typed JSON: {str(data)[:100]}")
    tag, v = data["$"], data.get("v")
    if tag == "tuple":
        return tuple(decode(x, refs) for x in v)
    if tag == "dict":
        return {decode(k, refs): decode(x, refs) for k, x in v}
    if tag == "set":
        return {decode(x, refs) for x in v}
    if tag == "frozenset":
        return frozenset(decode(x, refs) for x in v)
    if tag in ("bytes", "bytearray"):
        raw = base64.b64decode(v.encode("ascii"), validate=True)
        return raw if tag == "bytes" else bytearray(raw)
    if tag == "complex":
        return complex(float(v[0]), float(v[1]))
    if tag == "bigint":
        return int(v, 16)
    if refs is None or not isinstance(v, int):
        raise ValueError("an object reference cannot be resolved here")
    return refs(v)


def _type_name(value):
    try:
        return str(type(value).__qualname__)[:100]
    except BaseException:
        return "?"
