"""A name -> object registry: the one extension mechanism of tirl (DESIGN.md section 5).

A duplicate name raises; an unknown name raises and lists the valid names; `module:attr` paths
load user objects without registering them. A registry given an entry-point group also holds what
installed packages declare there (`[project.entry-points."tirl.tasks"] my_task = "pkg.mod:MyTask"`),
loaded on first lookup; a broken entry point is an error naming it. Standard library only.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

T = TypeVar("T")


class RegistryError(KeyError):
    """A registry lookup or registration failed; the message says why."""

    def __str__(self) -> str:  # KeyError quotes its message; we want it plain
        return str(self.args[0]) if self.args else ""


class Registry(Generic[T]):
    """Maps names to plain functions or classes of one kind (`what` names the kind in errors)."""

    def __init__(self, what: str, entry_point_group: str | None = None, modules: tuple[str, ...] = ()):
        self.what = what
        self.entry_point_group = entry_point_group
        """Group of installed packages' entry points registered here on first lookup (None: none)."""
        self.modules = modules
        """Modules imported on first lookup because importing them registers entries here (built-ins that
        cannot be imported eagerly without an import cycle or a heavy import)."""
        self._items: dict[str, T] = {}
        self._docs: dict[str, str] = {}
        self._entry_points_loaded = entry_point_group is None and not modules

    def _load_entry_points(self) -> None:
        """Import `modules`, then register every entry point of `entry_point_group` not registered yet (once)."""
        if self._entry_points_loaded:
            return
        self._entry_points_loaded = True
        for module in self.modules:
            importlib.import_module(module)
        if self.entry_point_group is None:
            return
        from importlib.metadata import entry_points

        for ep in entry_points(group=self.entry_point_group):
            if ep.name in self._items:
                continue
            try:
                obj = ep.load()
            except Exception as e:  # an installed package's bug: name it, do not hide it
                raise RegistryError(f"{self.what} entry point {ep.name!r} = {ep.value!r} (group "
                                    f"{self.entry_point_group!r}) failed to load: {type(e).__name__}: {e}") from e
            self.add(ep.name, obj)

    def register(self, name: str, doc: str | None = None) -> Callable[[T], T]:
        """Decorator that registers the decorated object under `name`."""

        def deco(obj: T) -> T:
            self.add(name, obj, doc)
            return obj

        return deco

    def add(self, name: str, obj: T, doc: str | None = None) -> None:
        """Register `obj` under `name`; raises if the name is taken."""
        if name in self._items:
            raise RegistryError(f"{self.what} {name!r} is already registered")
        self._items[name] = obj
        self._docs[name] = doc if doc is not None else _first_line(getattr(obj, "__doc__", None))

    def get(self, name: str) -> T:
        """The object registered as `name`, or loaded from a `module:attr` path."""
        if name not in self._items and ":" not in name:
            self._load_entry_points()
        if name in self._items:
            return self._items[name]
        if ":" in name:
            return load_object(name, self.what)
        valid = ", ".join(sorted(self._items)) or "(none)"
        raise RegistryError(f"unknown {self.what} {name!r}; valid names: {valid} (or a 'module:attr' path)")

    def describe(self) -> dict[str, str]:
        """Name -> one-line description, sorted by name."""
        self._load_entry_points()
        return {k: self._docs[k] for k in sorted(self._items)}

    def __contains__(self, name: object) -> bool:
        self._load_entry_points()
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        self._load_entry_points()
        return iter(sorted(self._items))

    def __len__(self) -> int:
        self._load_entry_points()
        return len(self._items)


def load_object(path: str, what: str = "object"):
    """Import `module:attr` (attr may be dotted) and return the attribute."""
    module_name, _, attr = path.partition(":")
    if not module_name or not attr:
        raise RegistryError(f"{what} path {path!r} must look like 'package.module:attribute'")
    try:
        obj = importlib.import_module(module_name)
    except ImportError as e:
        raise RegistryError(f"cannot import module {module_name!r} for {what} {path!r}: {e}") from e
    for part in attr.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError as e:
            raise RegistryError(f"module {module_name!r} has no attribute {attr!r} (for {what} {path!r})") from e
    return obj


def _first_line(doc: str | None) -> str:
    return (doc or "").strip().splitlines()[0].strip() if (doc or "").strip() else ""
