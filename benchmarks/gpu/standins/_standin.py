"""Stand-ins for packages that SAELens and TransformerLens import but the GPU run never calls.

``datasets`` needs pyarrow (a 42 MB wheel) and ``wandb`` is a 20 MB wheel: together more than
the bundle's 64 MiB leave room for. The GPU run reads offline text and logs to files, so these
names are imported and never used. Every name resolves to a class that raises on any use, so a
call that slipped through fails loudly, naming the package, instead of doing something else.
"""

from collections.abc import Callable


def standin(module: str) -> Callable[[str], type]:
    """A module ``__getattr__``: every attribute is a class that refuses to be used."""

    def attribute(name: str) -> type:
        if name.startswith("__"):
            raise AttributeError(name)

        def refuse(*args: object, **kwargs: object) -> None:
            raise RuntimeError(
                f"{module}.{name} was called, but {module.split('.')[0]} is only a stand-in on "
                "the GPU host (benchmarks/gpu/standins): run this part where it is installed."
            )

        meta = type(f"{name}Meta", (type,), {"__getattr__": lambda cls, attr: attribute(attr)})
        return meta(name, (), {"__init__": refuse, "__new__": lambda cls, *a, **k: refuse()})

    return attribute
