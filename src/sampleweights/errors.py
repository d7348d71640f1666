"""Exceptions of sampleweights: subclasses of the built-in ones, so ``except ValueError`` works."""

from __future__ import annotations

__all__ = ["StateMismatchError"]


class StateMismatchError(ValueError):
    """A saved state (scorer, sampler or scores file) does not fit what it is loaded into.

    Raised for another dataset size, another scorer or sampler type, or another selection; the
    object it was loaded into is unchanged.
    """
