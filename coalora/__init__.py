"""coalora: configuration-aware LoRA, one fine-tuning run for every quantization of a model."""

import os

# Idle OpenMP threads sleep instead of spinning. With spinning threads, any other busy process
# on the machine made the many small tensor ops of quantization up to 20x slower; this must be
# set before torch is first imported.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
