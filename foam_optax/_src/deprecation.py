"""Renamed arguments, still accepted under their old name for one release."""

import functools
import warnings


def renamed_argument(old: str, new: str):
  """Decorator: ``fn(old=v)`` calls ``fn(new=v)`` with a DeprecationWarning.

  The signature seen by `inspect` (and so by `optax.inject_hyperparams` and
  the documentation) is the function's own, which has only `new`.
  """

  def decorate(fn):

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
      if old in kwargs:
        if new in kwargs:
          raise TypeError(f"{fn.__name__}() got both {old}= (deprecated) and "
                          f"{new}=; pass {new}= only.")
        warnings.warn(
            f"{fn.__name__}(): {old}= is deprecated and will be removed in "
            f"the next release; it is now {new}= (same values).",
            DeprecationWarning, stacklevel=2)
        kwargs[new] = kwargs.pop(old)
      return fn(*args, **kwargs)

    return wrapper

  return decorate
