"""The interface a recovery method implements around the training loop of
:func:`autodfp.recover.finetune.train` (its own module, so the methods and the loop import it
without importing each other)."""


class TrainingMethod:
    """What a method does around each optimiser step, at the end, and in a checkpoint; the
    ``plain`` method does nothing (:class:`autodfp.recover.pdp.PDPMasks` and
    :class:`autodfp.recover.reprune.REPruneLoop` override these)."""

    def before_step(self, step: int, total: int) -> None:
        pass

    def after_step(self, step: int, total: int) -> None:
        pass

    def finish(self) -> dict:
        return {}

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass
