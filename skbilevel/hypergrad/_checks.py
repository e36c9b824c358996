"""Checks of the core's numeric arguments, in a module of their own so that
every other module of the core (``_linear_solve`` included, which ``_base``
imports) can use them."""

import difflib
import math
import numbers


def _check_positive(value, name, allow_none=True):
    """Validate a positive finite number (a tolerance, a step); ``None`` passes
    when ``allow_none``. Returns ``value`` unchanged.

    Zero and infinity are rejected too: a tolerance of 0 is never met (every
    call warns), one of ``inf`` is always met (nothing is solved), and a step
    of 0 turns the hypergradient into an exact zero.
    """
    if value is None and allow_none:
        return value
    ok = (
        isinstance(value, numbers.Real)
        and not isinstance(value, bool)
        and math.isfinite(value)
        and value > 0
    )
    if not ok:
        none = "None or " if allow_none else ""
        raise ValueError(
            f"{name} must be {none}a positive finite number; got {value!r}."
        )
    return value


def _check_int(value, name, minimum=1, allow_none=False):
    """Validate an integer ``>= minimum`` (an iteration budget); ``None`` passes
    when ``allow_none``. Returns ``value`` unchanged."""
    if value is None and allow_none:
        return value
    ok = (
        isinstance(value, numbers.Integral)
        and not isinstance(value, bool)
        and value >= minimum
    )
    if not ok:
        none = "None or " if allow_none else ""
        raise ValueError(
            f"{name} must be {none}an integer >= {minimum}; got {value!r}."
        )
    return value


def _did_you_mean(unknown, names):
    """``" (did you mean ...?)"`` for the keywords ``unknown`` that resemble one
    of ``names`` (``"b for a"`` each when there are several), or ``""``."""
    guesses = [
        f"{close[0]} for {key}" if len(unknown) > 1 else close[0]
        for key in unknown
        for close in [difflib.get_close_matches(key, names, n=1)]
        if close
    ]
    return f" (did you mean {', '.join(guesses)}?)" if guesses else ""
