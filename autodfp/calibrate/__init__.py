"""Step 2: the data-free calibration of a pruned model.

``synthetic`` makes images from the unpruned model's BatchNorm statistics; ``refit`` refits the
pruned layers by least squares so that they reproduce the unpruned model's outputs on them.
"""
