"""A tiny name -> factory registry, in the spirit of timm's ``create_model``.

Example:
    >>> from kt_mlflow.registry import Registry
    >>> animals = Registry("animal")
    >>> @animals.register("cat")
    ... def make_cat(): return "meow"
    >>> animals.create("cat")
    'meow'
"""
from __future__ import annotations

from typing import Any, Callable, Dict, List

from .errors import KTError


class Registry:
    """Maps names to factories; unknown names get a one-line error listing the known ones."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._factories: Dict[str, Callable[..., Any]] = {}

    def register(self, name: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
        def decorator(factory: Callable[..., Any]) -> Callable[..., Any]:
            if name in self._factories:
                raise ValueError(f"{self.kind} {name!r} is registered twice; pick another name.")
            self._factories[name] = factory
            return factory

        return decorator

    def names(self) -> List[str]:
        return sorted(self._factories)

    def get(self, name: str) -> Callable[..., Any]:
        if name not in self._factories:
            raise KTError(
                f"unknown {self.kind} {name!r}; choose one of: {', '.join(self.names())}."
            )
        return self._factories[name]

    def create(self, name: str, **kwargs: Any) -> Any:
        return self.get(name)(**kwargs)

    def __contains__(self, name: str) -> bool:
        return name in self._factories
