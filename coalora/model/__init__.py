"""The model: target layers, quantized LoRA layers, the configuration-aware network θ."""

from coalora.model.targets import MODULE_TYPES, Target, find_targets, num_blocks, target_weights

__all__ = ["MODULE_TYPES", "Target", "find_targets", "num_blocks", "target_weights"]
