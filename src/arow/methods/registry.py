from ..registry import Registry
from .base import Passes


class _MethodRegistry(Registry):
    """Sets each method class's ``name`` to its registered name (used in its error messages), and
    checks the facts it declares: ``passes`` a :class:`Passes` (or None), ``test_settings`` naming
    only its hyper-parameters."""

    def register(self, name, help=None):
        deco = super().register(name, help)

        def wrap(cls):
            passes = getattr(cls, "passes", None)
            if passes is not None and not isinstance(passes, Passes):
                raise TypeError(f"method {name!r}: passes must be a Passes(target, attack, train, helper), "
                                f"got {passes!r}")
            unknown = set(getattr(cls, "test_settings", {})) - set(getattr(cls, "hparams", {}))
            if unknown:
                raise TypeError(f"method {name!r}: test_settings names no hyper-parameter(s) {sorted(unknown)}")
            cls.name = name
            return deco(cls)

        return wrap


METHODS: Registry = _MethodRegistry("method")
