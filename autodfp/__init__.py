"""AutoDFP: data-free pruning and reconstruction of pretrained CNNs.

Layer 1 of the project: pure PyTorch + scikit-learn + numpy, no Ray.
"""

from autodfp.errors import AutoDFPError

__all__ = ["AutoDFPError"]
__version__ = "0.1.0"
