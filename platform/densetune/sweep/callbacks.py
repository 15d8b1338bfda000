"""The base of the sweep's Tune callbacks (its progress line, its MLflow record)."""

from __future__ import annotations

from ray import tune


class RestorableCallback(tune.Callback):
    """A Tune callback whose public attributes are its settings and whose private ones are rebuilt by `_reset`.

    Tune pickles its callbacks with the experiment state: only the settings travel, and the caches (a client, what was
    seen of the trials) are rebuilt where the sweep is restored.
    """

    def __getstate__(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if not k.startswith("_")}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._reset()

    def _reset(self) -> None:
        raise NotImplementedError
