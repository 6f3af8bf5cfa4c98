"""Optional recovery with data after the data-free prune: the training-method interface
(``method``), fine-tuning and distillation (``finetune``), PDP soft masks (``pdp``) and the
REPrune loop (``reprune``)."""
