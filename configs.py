"""
A network's settings read from a config.json beside its weights, checked before the
network is built: each value must be of its field's kind (a size a whole number >= 1,
eps a positive number, patch_size three sizes, ...), and what the weights themselves
say (the number of blocks) must agree. A wrong value is one sentence naming the file
and the key, never a TypeError from deep inside a constructor or a model of a billion
layers built on the meta device.
"""

import math
from dataclasses import fields


MAX_SIZE = 2 ** 20  # no width, count or vocabulary of these networks comes near it


class ConfigError(Exception):
    """A config.json value that cannot build the network; the message names the key."""


def value_problem(value, default):
    """What is wrong with `value` for a field whose released value is `default` (a phrase), or None."""
    if isinstance(default, bool):
        return None if isinstance(value, bool) else "is not true or false"
    if isinstance(default, int):
        return None if type(value) is int and 1 <= value <= MAX_SIZE else f"is not a whole number from 1 to {MAX_SIZE}"
    if isinstance(default, float):
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value > 0
        return None if ok else "is not a positive number"
    if isinstance(default, tuple):
        kind = "true/false values" if isinstance(default[0], bool) else f"whole numbers from 1 to {MAX_SIZE}"
        if not isinstance(value, (list, tuple)) or len(value) != len(default) or \
                any(value_problem(v, d) for v, d in zip(value, default)):
            return f"is not a list of {len(default)} {kind}"
    return None


def build(cls, values, where, names=None):
    """cls(**values) of a config dataclass with every value checked (value_problem), or
    one ConfigError naming `where` and the key as the file spells it (`names`: our
    field -> the file's key, where they differ)."""
    defaults = {f.name: f.default for f in fields(cls)}
    if unknown := [name for name in values if name not in defaults]:
        raise ConfigError(f"{where}: {unknown[0]!r} is no setting of this network (it takes {', '.join(defaults)}); "
                          "download the config.json again")
    for name, value in values.items():
        check(where, (names or {}).get(name, name), value, defaults[name])
    return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in values.items()})


def check(where, key, value, default):
    """One ConfigError naming `where` and `key` if `value` is not of the kind of `default` (value_problem)."""
    if problem := value_problem(value, default):
        raise ConfigError(f"{where}: {key}={value!r} {problem}; download the config.json again")


def agree(where, claim, expected, held, what):
    """The config's `claim` ("num_layers=30") makes `expected` of `what`; the weights hold
    `held`: a disagreement is refused before a network of the claimed size is built."""
    if expected != held:
        raise ConfigError(f"{where}: {claim} makes {expected} {what}, but the weights hold {held}; download the "
                          "config.json again (or the weights, if they are cut short)")
