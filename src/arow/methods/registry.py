from ..registry import Registry


class _MethodRegistry(Registry):
    """Sets each method class's ``name`` to its registered name (used in its error messages)."""

    def register(self, name, help=None):
        deco = super().register(name, help)

        def wrap(cls):
            cls.name = name
            return deco(cls)

        return wrap


METHODS: Registry = _MethodRegistry("method")
