"""Step 3: k-bit weight quantization with data-free compensation (``weights``)."""
