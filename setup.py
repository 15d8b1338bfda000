"""Installs densemod-autoload.pth beside the packages (pyproject.toml holds everything else): Python runs it at
start-up, so that PEFT finds DenseLoRA without `import densemod` (densemod_autoload.py says how and why).

setuptools has no setting for a file at the top of site-packages: the wheel gets it from build_py, and an editable
install from the strategy that writes the editable wheel's own .pth.
"""

from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py
from setuptools.command.editable_wheel import editable_wheel

PTH = "densemod-autoload.pth"


class BuildPyWithPth(build_py):
    def run(self) -> None:
        super().run()
        self.copy_file(PTH, str(Path(self.build_lib, PTH)))

    def get_outputs(self, include_bytecode: bool = True) -> list:
        return [*super().get_outputs(include_bytecode), str(Path(self.build_lib, PTH))]


class EditableWheelWithPth(editable_wheel):
    def _select_strategy(self, name, tag, build_lib):  # noqa: ANN001, ANN202 (setuptools' own signature)
        return WithPth(super()._select_strategy(name, tag, build_lib))


class WithPth:
    """The editable strategy setuptools chose, which also writes densemod-autoload.pth into the editable wheel."""

    def __init__(self, strategy) -> None:  # noqa: ANN001
        self.strategy = strategy

    def __call__(self, wheel, files, mapping) -> None:  # noqa: ANN001
        self.strategy(wheel, files, mapping)
        wheel.writestr(PTH, Path(PTH).read_bytes())

    def __enter__(self) -> "WithPth":
        self.strategy.__enter__()
        return self

    def __exit__(self, *exc) -> object:  # noqa: ANN002
        return self.strategy.__exit__(*exc)


setup(cmdclass={"build_py": BuildPyWithPth, "editable_wheel": EditableWheelWithPth})
