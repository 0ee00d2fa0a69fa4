"""How many tokens a model's position embeddings cover, and the check of a ``max_length``
against it (before any work: a longer input fails only when one occurs)."""

from __future__ import annotations

from transformers import PretrainedConfig

PADDING_OFFSET_MODELS = (
    "camembert",
    "data2vec-text",
    "ibert",
    "longformer",
    "mpnet",
    "roberta",
    "roberta-prelayernorm",
    "xlm-roberta",
    "xlm-roberta-xl",
)
"""Model types whose position ids start after the padding index (``pad_token_id + 1``), so
``max_position_embeddings`` holds that many positions more than a sequence can use (RoBERTa:
514 for 512 tokens)."""


def model_positions(config: PretrainedConfig) -> int | None:
    """The longest token sequence the model's positions cover; None when its configuration
    records no limit."""
    positions = getattr(config, "max_position_embeddings", None)
    if isinstance(positions, bool) or not isinstance(positions, int):
        return None
    if config.model_type in PADDING_OFFSET_MODELS:
        positions -= (config.pad_token_id or 0) + 1
    return positions


def check_max_length(
    max_length: object, config: PretrainedConfig, setting: str, model: str | None = None
) -> int:
    """``max_length`` as an int: a positive integer no longer than the model's positions.

    Args:
        max_length: tokens per example (or block) of a run or a prediction.
        config: the model's transformers configuration.
        setting: the name the message gives ``max_length`` (``data.max_length``).
        model: the model's name in the message (default: its model type).
    """
    if isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 1:
        raise ValueError(f"{setting}={max_length!r} must be a positive integer")
    positions = model_positions(config)
    if positions is not None and max_length > positions:
        raise ValueError(
            f"{setting}={max_length} is longer than the {positions} token positions of "
            f"{model or config.model_type}: use at most {positions}"
        )
    return max_length
