"""Causal language models end to end: a tiny LLaMA on WikiText-2, served and exported."""

import json
import math
from pathlib import Path

import pytest
import torch
from conftest import small_run_config, tiny_llama_config
from hydra import compose, initialize_config_dir
from peft import PeftModel
from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel, LlamaForCausalLM

from coalora.evaluation import read_results
from coalora.evaluation.report import perplexity_score
from coalora.model.backbone import QuantizedLoRAModel
from coalora.run import train
from coalora.serve import Deployment, load_dequantized_base, load_export

CONF = Path(__file__).resolve().parents[1] / "conf"
PRETRAIN_STEPS = 60


@pytest.fixture(scope="module")
def tiny_llama(minilm_dir, shared_data_dir, tmp_path_factory) -> Path:
    """A 2-block LLaMA with MiniLM's tokenizer, pre-trained for a few steps on WikiText-2's
    validation text (far better than uniform), saved as a local model."""
    text = shared_data_dir / "wikitext-2-raw" / "wiki.valid.raw"
    if not text.exists():
        pytest.skip("the shared WikiText-2 data is not available")
    out = tmp_path_factory.mktemp("tiny-llama")
    tokenizer = AutoTokenizer.from_pretrained(minilm_dir)
    torch.manual_seed(0)
    model = LlamaForCausalLM(tiny_llama_config(len(tokenizer), tie_word_embeddings=True))
    ids = tokenizer(text.read_text()[:200_000], add_special_tokens=False).input_ids
    blocks = torch.tensor(ids[: len(ids) // 64 * 64]).view(-1, 64)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(PRETRAIN_STEPS):
        batch = blocks[torch.randint(len(blocks), (16,))]
        model(input_ids=batch, labels=batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def lm_overrides(tiny_llama: Path, shared_data_dir: Path) -> list[str]:
    if not (shared_data_dir / "wikitext-2-raw").exists():
        pytest.skip("the shared WikiText-2 data is not available")
    return [
        "model=smollm2",
        "model.name=tiny-llama",
        f"model.name_or_path={tiny_llama}",
        "model.gguf_file=null",
        "task=wikitext2",
        f"task.data_dir={shared_data_dir}",
        "debug=fast",
    ]


def compose_config(overrides: list[str]):
    with initialize_config_dir(str(CONF), version_base="1.3"):
        return compose("train", overrides=overrides)


@pytest.fixture(scope="module")
def lm_run(tiny_llama, shared_data_dir, tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("lm-run")
    overrides = [
        *lm_overrides(tiny_llama, shared_data_dir),
        "callbacks.model_checkpoint.monitor=val/metric",  # the best (lowest) perplexity's epoch
        f"paths.output_dir={out}",
    ]
    cfg = compose_config(overrides)
    assert cfg.callbacks.model_checkpoint.mode == "min"  # perplexity improves downward
    return out, train(cfg)


def test_language_model_run_reports_perplexity_and_its_hypervolume(lm_run):
    out, summary = lm_run
    records = read_results(out / "eval" / "results.csv")
    assert len(records) == 12 and {r.metric for r in records} == {"perplexity"}
    assert summary["runs"][0]["best_epoch"] == 0 and summary["validation"]["hv"] > 0
    for r in records:
        assert 1.0 < r.value < 2000 and r.num_samples == 32
        assert r.loss == pytest.approx(math.log(r.value), rel=1e-4)  # ppl = exp(mean NLL)
    assert summary["metric"] == "perplexity" and 0.0 < summary["hv"] <= 1.0
    assert summary["hv_of"] == "1 - ln(perplexity) / ln(vocab_size)"
    assert 1.0 < summary["reference"]["unquantized"] < 2000
    # Evaluation and the reference ran where the model trained.
    assert summary["device"] == summary["reference_device"] == summary["runs"][0]["device"]
    values = summary["values"]
    assert values[6.0] < values[2.5]  # more bits, lower perplexity
    assert (out / "eval" / "accuracy_vs_bits.png").stat().st_size > 10_000


def test_perplexity_score_maps_uniform_to_zero_and_perfect_to_one():
    assert perplexity_score(1.0, 100) == 1.0
    assert perplexity_score(100.0, 100) == pytest.approx(0.0)
    assert perplexity_score(10.0, 100) == pytest.approx(0.5)
    assert perplexity_score(1000.0, 100) == pytest.approx(-0.5)  # worse than uniform
    with pytest.raises(ValueError, match="perplexity 0.5 is below 1"):
        perplexity_score(0.5, 100)


def test_language_model_serves_and_exports_with_tied_embeddings(lm_run, tmp_path):
    out, _ = lm_run
    dep = Deployment.from_run(out)
    choice = dep.choose(bits=4.0)
    batch = {"input_ids": torch.randint(100, 2000, (2, 16))}
    dep.model.set_configuration(choice)
    with torch.no_grad():
        in_run = dep.model(**batch).logits
    folder = dep.export(tmp_path / "lm-4bit", bits=4.0)
    adapter_config = json.loads((folder / "adapter_config.json").read_text())
    assert adapter_config["task_type"] == "CAUSAL_LM" and adapter_config["modules_to_save"] is None
    summary = json.loads((folder / "quantization.json").read_text())
    assert summary["tied"] == {"lm_head.weight": "model.embed_tokens.weight"}
    via_peft = PeftModel.from_pretrained(load_dequantized_base(folder), folder).eval()
    for model in (dep.at(bits=4.0), load_export(folder), via_peft):
        with torch.no_grad():
            assert torch.allclose(model(**batch).logits, in_run, atol=1e-4)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (
            ["task=sst2"],
            "task=sst2 is a classification task but model=tiny-llama has kind causal_lm",
        ),
        (
            ["model.kind=encoder"],
            "task=wikitext2 is a language_modeling task but model=tiny-llama has kind encoder",
        ),
    ],
)
def test_task_and_model_kinds_must_match(tiny_llama, shared_data_dir, tmp_path, overrides, message):
    cfg = compose_config(
        [*lm_overrides(tiny_llama, shared_data_dir), *overrides, f"paths.output_dir={tmp_path}"]
    )
    with pytest.raises(ValueError, match=message):
        train(cfg)


def test_a_model_without_target_linears_is_refused():
    gpt2 = GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=100))
    with pytest.raises(ValueError, match="GPT2LMHeadModel has no target linear layers"):
        QuantizedLoRAModel(gpt2)


def test_gradient_checkpointing_gives_the_same_loss_and_gradients(tiny_llama):
    batch = {"input_ids": torch.randint(100, 2000, (2, 16))}
    batch["labels"] = batch["input_ids"]
    grads = []
    for checkpointing in (False, True):
        torch.manual_seed(0)
        model = QuantizedLoRAModel.from_run_config(
            LlamaForCausalLM.from_pretrained(tiny_llama), small_run_config(checkpointing)
        )
        torch.nn.init.normal_(model.config_net.mlp[-1].weight, std=0.1)
        for layer in model.layers:
            torch.nn.init.normal_(layer.lora_B, std=0.1)
        model.set_configuration([201] * len(model.targets))
        model(**batch).loss.backward()
        grads.append([p.grad for p in model.parameters() if p.requires_grad])
        assert model.model.is_activation_checkpointing == checkpointing
    for plain, recomputed in zip(*grads, strict=True):
        assert torch.allclose(plain, recomputed, atol=1e-6)
