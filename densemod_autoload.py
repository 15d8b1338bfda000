"""Registers DenseLoRA with PEFT as PEFT is imported, so that a saved DenseLoRA adapter loads without `import densemod`.

PEFT finds a method in its own tables (PEFT_TYPE_TO_CONFIG_MAPPING) and has no way to discover one that a package adds:
without densemod imported, loading stops with a bare `KeyError: 'DENSELORA'`. Installing densemod puts
densemod-autoload.pth into site-packages; Python runs its line at start-up, which calls install() below. That imports
nothing but the standard library: densemod itself is imported only once PEFT has been, by a program that uses PEFT.

DENSEMOD_AUTOLOAD=0 turns it off (PEFT then behaves as without densemod until `import densemod`).
"""

from __future__ import annotations

# Python imports this module at every start-up (densemod-autoload.pth): only what start-up has imported already, so it
# costs a fraction of a millisecond (importlib.abc and typing would cost about 10 ms).
import os
import sys
from importlib.machinery import ModuleSpec
from types import ModuleType

OFF = ("0", "false", "no", "off")


class RegisterAfterPeft:
    """A meta path finder: finds `peft` as the finders after it would, and has its loader import densemod right after
    peft's own code has run."""

    def find_spec(self, name: str, path: list[str] | None, target: ModuleType | None = None) -> ModuleSpec | None:
        if name != "peft":
            return None
        sys.meta_path.remove(self)  # once: peft is imported once, and the finders asked below must not include this
        for finder in sys.meta_path:
            spec = finder.find_spec(name, path, target) if hasattr(finder, "find_spec") else None
            if spec is not None:
                if spec.loader is not None:
                    spec.loader.exec_module = registering_after(spec.loader.exec_module)
                return spec
        return None


def registering_after(exec_module):  # noqa: ANN001, ANN201 (a loader's bound method, returned wrapped)
    def exec_then_register(module: ModuleType) -> None:
        exec_module(module)
        try:
            import densemod  # noqa: F401  (importing it registers DenseLoRA with PEFT)
        except Exception as error:  # a broken densemod must not break programs that only use PEFT
            import warnings

            warnings.warn(f"densemod could not register DenseLoRA with PEFT ({error!r}); `import densemod` to see why")

    return exec_then_register


def install() -> None:
    """Register DenseLoRA when PEFT is imported (now, if it already is), unless DENSEMOD_AUTOLOAD says not to."""
    if os.environ.get("DENSEMOD_AUTOLOAD", "1").lower() in OFF:
        return
    if "peft" in sys.modules:
        import densemod  # noqa: F401
    elif not any(isinstance(finder, RegisterAfterPeft) for finder in sys.meta_path):
        sys.meta_path.insert(0, RegisterAfterPeft())
