"""Scale benchmark: coalora against peft + bitsandbytes QLoRA on a Qwen2.5-shaped model.

Run by ``make bench-scale``. A random-weight model with the real shape of Qwen2.5-0.5B or
Qwen2.5-1.5B is built from ``transformers.Qwen2Config`` (never downloaded), saved once with a
fixed seed, and every measurement loads it from that folder, so both sides hold identical
weights. Each measurement runs in its own subprocess, so each peak memory is its own.

Measured, on the same batch (random token ids, labels = input ids), rank and dtype:

- the error table of the target matrices with the sampled estimate (and the exact table's
  time, if ``--exact-table`` cached it before);
- per method (``coalora`` at k = 1 and 2, ``coalora-int8``, ``shared``, ``qlora``, and the
  peer ``peft+bnb``): model load and build time, mean and median step time after one warm-up
  step, peak resident memory (load and training), resident frozen target-weight bytes, and
  the time spent inside quantization and dequantization. Every method is measured in each of
  ``--rounds`` rounds, every other round in reverse order, so that a change of machine load
  hits all methods alike; ``--profile`` methods also profile one extra step (torch.profiler);
- one configuration-search round scored with the real model on a held-out batch, then the
  same round again from the same initial state with the recorded losses: the search's own
  time and added resident memory;
- serving a budget with ``Deployment.at(bits=...)``.

Results go to ``--out`` as ``results.csv``, ``results.json``, ``results.md`` and
``ratios.png`` (coalora / peft+bnb ratios, measured in the same run).

    python experiments/bench_scale.py --model qwen2.5-0.5b --device cpu --dtype bf16
    python experiments/bench_scale.py --exact-table   # once, in the background: exact table
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import gc
import inspect
import json
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"
DEFAULT_OUT = ROOT / "experiments" / "results" / "bench_scale"
WORK_ROOT = Path(tempfile.gettempdir()) / "coalora-bench-scale"
MIB = 2**20

QWEN25_COMMON = dict(
    vocab_size=151936,
    num_key_value_heads=2,
    tie_word_embeddings=True,
    rms_norm_eps=1e-6,
    rope_parameters={"rope_type": "default", "rope_theta": 1e6},
    hidden_act="silu",
    use_sliding_window=False,
)
MODEL_SHAPES: dict[str, dict[str, Any]] = {
    "qwen2.5-0.5b": QWEN25_COMMON
    | dict(
        hidden_size=896,
        intermediate_size=4864,
        num_hidden_layers=24,
        num_attention_heads=14,
        max_position_embeddings=32768,
    ),
    "qwen2.5-1.5b": QWEN25_COMMON
    | dict(
        hidden_size=1536,
        intermediate_size=8960,
        num_hidden_layers=28,
        num_attention_heads=12,
        max_position_embeddings=131072,
    ),
}
"""Transformers ``Qwen2Config`` fields of each model shape (keys are ``conf/model`` names)."""

DTYPES = {"fp32": "float32", "bf16": "bfloat16"}
PEER_TARGET_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
"""The 7 linear types of a Qwen2 block: coalora's default targets (every module type)."""

SAMPLE_FRACTION = 1 / 16
"""Share of each matrix's blocks the sampled error-table estimate quantizes."""
QLORA_BUDGET = 4.0
"""The budget whose allocation the ``qlora`` method keeps packed (one of ``eval.budgets``)."""
SERVE_BITS = 3.0
TARGETS = {
    "step_ratio": 1.3,
    "peak_ratio": 1.5,
    "table_s": 180.0,
    "search_s": 60.0,
    "search_added_gib": 0.5,
}
"""The bounds reported against (ratios are coalora / peft+bnb in the same run)."""
PEER = "peft+bnb"
QUANTIZE, DEQUANTIZE = "quantize (cache misses)", "dequantize"
"""Labels of the wall time inside quantization and dequantization (see ``Timers``)."""


@dataclass(frozen=True)
class Method:
    """One measured training setup.

    Attributes:
        name: the name in the report.
        conf_method: coalora's ``conf/method`` group, ``None`` for the peer.
        configs_per_step: k, configurations back-propagated per step.
        storage: ``quant.storage`` of the master copy (``dense`` or ``int8``).
    """

    name: str
    conf_method: str | None
    configs_per_step: int = 1
    storage: str = "dense"


METHODS: dict[str, Method] = {
    m.name: m
    for m in (
        Method(PEER, None),
        Method("coalora", "coalora"),
        Method("coalora-k2", "coalora", configs_per_step=2),
        Method("coalora-int8", "coalora", storage="int8"),
        Method("shared", "shared"),
        Method("qlora", "qlora"),
    )
}


# --- memory and timing ----------------------------------------------------------------------------


def proc_status_mib(field: str) -> float:
    """A ``/proc/self/status`` memory field (``VmHWM``, ``VmRSS``) in MiB; 0 where absent."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def reset_peak_memory(device: torch.device) -> None:
    """Restart the peak counters: the kernel's VmHWM (``clear_refs``) and CUDA's peak."""
    with contextlib.suppress(OSError):
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory(device: torch.device) -> dict[str, float | None]:
    """Peak resident memory (VmHWM) since the last reset, and CUDA's peak on a GPU (MiB)."""
    cuda = torch.cuda.max_memory_allocated(device) / MIB if device.type == "cuda" else None
    return {"rss_mib": proc_status_mib("VmHWM"), "cuda_mib": cuda}


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Timers:
    """Wall time spent inside wrapped functions (``with timers.wrap(module, "name"): ...``)."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self.calls: dict[str, int] = {}

    @contextlib.contextmanager
    def wrap(self, owner: Any, attribute: str, label: str) -> Iterator[None]:
        original = getattr(owner, attribute)

        def timed(*args: Any, **kwargs: Any) -> Any:
            start = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                self.seconds[label] = self.seconds.get(label, 0.0) + time.perf_counter() - start
                self.calls[label] = self.calls.get(label, 0) + 1

        setattr(owner, attribute, timed)
        try:
            yield
        finally:
            setattr(owner, attribute, original)


# --- the model and the data -----------------------------------------------------------------------


def model_folder(args: argparse.Namespace) -> Path:
    """The saved random-weight model of ``--model`` and ``--seed`` (built on first use)."""
    return WORK_ROOT / f"{args.model}-seed{args.seed}" / "model"


def build_model_folder(name: str, seed: int, folder: Path) -> float:
    """Build the random-weight model (fp32, seeded) and ``save_pretrained`` it; seconds taken.

    A folder finished by an earlier run (its ``complete`` marker names the same shape) is
    reused: the same seed and shape give the same weights."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    marker = folder / "complete"
    shape = json.dumps(MODEL_SHAPES[name], sort_keys=True)
    if marker.is_file() and marker.read_text() == shape:
        return 0.0
    start = time.perf_counter()
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(Qwen2Config(**MODEL_SHAPES[name]))
    model.save_pretrained(folder)
    marker.write_text(shape)
    return time.perf_counter() - start


def random_batch(
    vocab_size: int, batch: int, seq: int, seed: int, device: torch.device
) -> dict[str, torch.Tensor]:
    """Random token ids; ``labels`` = ``input_ids`` (the model shifts them: causal LM loss)."""
    ids = torch.randint(vocab_size, (batch, seq), generator=torch.Generator().manual_seed(seed))
    batch_ = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}
    return {k: v.to(device) for k, v in batch_.items()}


def compose_config(args: argparse.Namespace, method: Method | None = None):
    """The run configuration ``python -m coalora.run`` would use for this model and method,
    with the saved model folder as ``model.name_or_path``; defaults come from ``conf/``."""
    from hydra import compose, initialize_config_dir

    import coalora.run  # noqa: F401  (registers the config resolvers)

    conf_method = "coalora" if method is None or method.conf_method is None else method.conf_method
    overrides = [
        f"model={args.model}",
        f"model.name_or_path={model_folder(args)}",
        f"model.dtype={DTYPES[args.dtype]}",
        f"method={conf_method}",
        f"method.rank={args.rank}",
        f"quant.storage={'dense' if method is None else method.storage}",
        f"seed={args.seed}",
    ]
    if args.cache_bytes is not None:
        overrides.append(f"quant.cache_bytes={args.cache_bytes}")
    with initialize_config_dir(str(CONF), version_base="1.3"):
        return compose("train", overrides=overrides)


def load_coalora(cfg, device: torch.device):
    """The backbone wrapped as a run wraps it (``QuantizedLoRAModel.from_run_config``)."""
    from coalora.model.backbone import QuantizedLoRAModel
    from coalora.model.hub import load_backbone, quiet_transformers

    torch.manual_seed(cfg.seed)  # LoRA A's initialisation, as a run seeds it
    with quiet_transformers():
        backbone = load_backbone(cfg.model)
    return QuantizedLoRAModel.from_run_config(backbone, cfg).to(device)


def table_path(work: Path) -> Path:
    return work / "table.pt"


def exact_table_paths(args: argparse.Namespace) -> tuple[Path, Path]:
    """Where ``--exact-table`` caches the exact error table and its timing."""
    folder = WORK_ROOT / f"{args.model}-seed{args.seed}"
    return folder / f"exact_table_{args.dtype}.pt", folder / f"exact_table_{args.dtype}.json"


# --- child: the error table -----------------------------------------------------------------------


def sampled_table_kwargs(fraction: float) -> dict[str, float]:
    """``error_table``'s keyword for the sampled estimate, or ``{}`` where it has none."""
    from coalora.quant import error_table

    if "sample_fraction" in inspect.signature(error_table).parameters:
        return {"sample_fraction": fraction}
    return {}


def child_table(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    """Time the error table of the target matrices (sampled estimate) and save it."""
    from coalora.quant import ErrorTable, config_space, error_table

    device = torch.device(args.device)
    cfg = compose_config(args)
    model = load_coalora(cfg, device)
    weights = model.frozen_weights()
    kwargs = sampled_table_kwargs(args.sample_fraction)
    exact_pt, _ = exact_table_paths(args)
    options = config_space("nf")
    result: dict[str, Any] = {
        "matrices": len(weights),
        "options": len(options),
        "sampled": bool(kwargs),
    }
    if not kwargs and exact_pt.is_file():
        tqdm.write("error_table has no sample_fraction: using the cached exact table")
        table, result["seconds"] = ErrorTable.load(exact_pt), None
    else:
        if not kwargs:
            tqdm.write("error_table has no sample_fraction: computing the exact table (long)")
        synchronize(device)
        start = time.perf_counter()
        table = error_table(weights, options, **kwargs)
        synchronize(device)
        result["seconds"] = time.perf_counter() - start
        result["sample_fraction"] = kwargs.get("sample_fraction")
    table.save(table_path(work))
    if kwargs and exact_pt.is_file():
        exact = ErrorTable.load(exact_pt)
        result["allocation_vs_exact"] = compare_allocations(table, exact, cfg.eval.budgets)
    return result


def compare_allocations(sampled, exact, budgets: Sequence[float]) -> list[dict[str, float]]:
    """Exact total error of the sampled table's allocation over that of the exact table's
    (1.0: the estimate chose as well as the exact table), at each of ``budgets``, and the
    share of matrices given the same option."""
    from coalora.quant import ConfigSpace

    rows = []
    for budget in budgets:
        picks = {
            name: ConfigSpace.from_table(t).allocate(budget)
            for name, t in (("sampled", sampled), ("exact", exact))
        }
        totals = {
            name: float(exact.errors[range(len(choice)), list(choice)].sum())
            for name, choice in picks.items()
        }
        same = sum(a == b for a, b in zip(picks["sampled"], picks["exact"], strict=True))
        rows.append(
            {
                "budget": float(budget),
                "error_ratio": totals["sampled"] / totals["exact"],
                "same_options": same / len(picks["exact"]),
            }
        )
    return rows


def child_exact_table(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    """Compute the exact error table once and cache it (with its time) for later runs."""
    from coalora.quant import config_space, error_table

    device = torch.device(args.device)
    model = load_coalora(compose_config(args), device)
    weights = model.frozen_weights()
    start = time.perf_counter()
    table = error_table(weights, config_space("nf"))
    seconds = time.perf_counter() - start
    pt, info = exact_table_paths(args)
    table.save(pt)
    result = {"seconds": seconds, "threads": torch.get_num_threads(), "device": args.device}
    result["load_average_after"] = os.getloadavg()
    info.write_text(json.dumps(result, indent=1))
    return result


# --- child: training steps ------------------------------------------------------------------------


def training_run(cfg, table):
    """The method's plan and the fit it makes (per-budget methods: the fit of
    :data:`QLORA_BUDGET`)."""
    from hydra.utils import instantiate

    from coalora.quant import ConfigSpace

    plan = instantiate(cfg.method.plan)
    runs = plan.runs(ConfigSpace.from_table(table), cfg.eval.budgets)
    return plan, next(r for r in runs if r.budget in (None, QLORA_BUDGET))


def build_coalora(args: argparse.Namespace, method: Method, work: Path, device: torch.device):
    """coalora's model for ``method`` and its step function (what
    ``CoALoRAModule.training_step`` does); returns ``(model, step, info)``."""
    from hydra.utils import instantiate

    from coalora.quant import ErrorTable

    cfg = compose_config(args, method)
    table = ErrorTable.load(table_path(work))
    model = load_coalora(cfg, device)
    plan, run = training_run(cfg, table)
    configs = run.train_configs
    fixed = plan.fixed_configuration(run)
    if fixed is not None:  # QLoRA's memory: that allocation packed only
        model.keep_only(fixed)
    model.expect_configurations(configs)  # what CoALoRAModule does at every epoch start
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = instantiate(cfg.method.optimizer)(params=params)
    sampler = torch.Generator().manual_seed(cfg.seed)
    k = min(method.configs_per_step, len(configs))
    clip = cfg.method.gradient_clip_val

    def step(batch: dict[str, torch.Tensor]) -> float:
        picks = torch.randperm(len(configs), generator=sampler)[:k]  # CoALoRAModule's sampler
        loss = model.backward_over([configs[i] for i in picks.tolist()], batch)
        if clip is not None:
            torch.nn.utils.clip_grad_norm_(params, clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.item()

    info = {
        "configs_per_step": k,
        "training_configs": len(configs),
        "config_aware": bool(cfg.method.config_aware),
        "storage": model.layers[0].storage,
        "frozen_bytes": model.frozen_nbytes(),
        "trainable_parameters": model.trainable_parameter_counts()["total"],
        "lr": cfg.method.optimizer.lr,
        "cache_limit_bytes": model.cache.max_bytes,
    }
    return model, step, info


def bnb_frozen_nbytes(model: torch.nn.Module) -> int:
    """Bytes of the 4-bit target weights as bitsandbytes stores them: packed codes, 8-bit
    block scales, fp32 second-level scales and offset (the 16-entry code tables excluded, as
    coalora's count excludes its codebooks)."""
    import bitsandbytes as bnb

    total = 0
    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            state = module.weight.quant_state
            parts = [module.weight, state.absmax]
            if state.nested:
                parts += [state.state2.absmax, state.offset]
            total += sum(t.numel() * t.element_size() for t in parts)
    return total


def build_peer(args: argparse.Namespace, device: torch.device):
    """peft + bitsandbytes QLoRA (NF4, double quantization) on the same folder, rank, alpha,
    dropout, optimizer and clipping as coalora; returns ``(model, step, info)``."""
    from hydra.utils import instantiate
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from coalora.model.hub import quiet_transformers

    cfg = compose_config(args, METHODS["coalora"])
    dtype = getattr(torch, DTYPES[args.dtype])
    quantization = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=dtype,
    )
    torch.manual_seed(cfg.seed)
    with quiet_transformers():
        model = AutoModelForCausalLM.from_pretrained(
            model_folder(args), quantization_config=quantization, dtype=dtype, device_map=device
        )
    # prepare_model_for_kbit_training casts every bf16/fp16 parameter (embeddings, norms) to
    # fp32 and turns on gradient checkpointing by default: used only where it casts nothing,
    # without checkpointing (coalora runs without it).
    prepared = dtype == torch.float32
    if prepared:
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    lora = LoraConfig(
        r=cfg.method.rank,
        lora_alpha=cfg.method.alpha,
        lora_dropout=cfg.method.dropout,
        target_modules=list(PEER_TARGET_MODULES),
        task_type="CAUSAL_LM",
    )
    model = get_peft_model(model, lora)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = instantiate(cfg.method.optimizer)(params=params)
    clip = cfg.method.gradient_clip_val

    def step(batch: dict[str, torch.Tensor]) -> float:
        loss = model(**batch).loss
        loss.backward()
        if clip is not None:
            torch.nn.utils.clip_grad_norm_(params, clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.item()

    info = {
        "configs_per_step": 1,
        "frozen_bytes": bnb_frozen_nbytes(model),
        "trainable_parameters": sum(p.numel() for p in params),
        "lr": cfg.method.optimizer.lr,
        "prepare_model_for_kbit_training": prepared,
        "adapter_dtype": str(params[0].dtype),
    }
    return model, step, info


def child_train(args: argparse.Namespace, work: Path, method: Method) -> dict[str, Any]:
    """Load and build ``method``'s model, then time ``--steps`` steps after one warm-up."""
    device = torch.device(args.device)
    start = time.perf_counter()
    if method.conf_method is None:
        model, step, info = build_peer(args, device)
    else:
        model, step, info = build_coalora(args, method, work, device)
    synchronize(device)
    info["load_build_s"] = time.perf_counter() - start
    info["load_peak"] = peak_memory(device)
    batch = random_batch(
        MODEL_SHAPES[args.model]["vocab_size"], args.batch, args.seq, args.seed, device
    )
    reset_peak_memory(device)
    cache = getattr(model, "cache", None)
    timers = Timers()
    seconds, losses, misses, inside = [], [], [], []
    with contextlib.ExitStack() as stack:
        for owner, attribute, label in quantization_functions(method):
            stack.enter_context(timers.wrap(owner, attribute, label))
        for i in tqdm(range(args.steps + 1), desc=f"{method.name} steps", leave=False):
            before = (cache.misses if cache is not None else 0, dict(timers.seconds))
            start = time.perf_counter()
            losses.append(step(batch))
            synchronize(device)
            if i:  # the first step is the warm-up
                seconds.append(time.perf_counter() - start)
                misses.append(cache.misses - before[0] if cache is not None else 0)
                inside.append({k: v - before[1].get(k, 0.0) for k, v in timers.seconds.items()})
    labels = sorted({k for step_timers in inside for k in step_timers})
    info |= {
        "step_s": seconds,
        "step_mean_s": statistics.mean(seconds),
        "step_median_s": statistics.median(seconds),
        "losses": losses,
        "train_peak": peak_memory(device),
        "quantizations_per_step": statistics.mean(misses) if cache is not None else None,
        "timers_per_step_s": {k: statistics.mean(t.get(k, 0.0) for t in inside) for k in labels},
        "cache_bytes_held": cache.nbytes if cache is not None else None,
    }
    if method.name in args.profile and args.round == 0:
        info["profile"] = profile_step(args, method, step, batch, device)
    return info


# --- profiling ------------------------------------------------------------------------------------


def profile_step(
    args: argparse.Namespace,
    method: Method,
    step: Callable[[dict[str, torch.Tensor]], float],
    batch: dict[str, torch.Tensor],
    device: torch.device,
) -> dict[str, Any]:
    """One more step under ``torch.profiler`` with timers on quantization and dequantization;
    writes ``profile_<method>.txt`` and returns seconds by kind of work."""
    from torch.profiler import ProfilerActivity, profile

    timers = Timers()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with contextlib.ExitStack() as stack:
        for owner, attribute, label in quantization_functions(method):
            stack.enter_context(timers.wrap(owner, attribute, label))
        prof = stack.enter_context(profile(activities=activities, record_shapes=True))
        start = time.perf_counter()
        step(batch)
        synchronize(device)
        wall = time.perf_counter() - start
    averages = prof.key_averages(group_by_input_shape=True)
    vocab = MODEL_SHAPES[args.model]["vocab_size"]
    families = op_families(averages, vocab)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    table = averages.table(sort_by="self_cpu_time_total", row_limit=40, max_name_column_width=60)
    (Path(args.out) / f"profile_{safe_name(method.name)}.txt").write_text(table)
    return {
        "wall_s": wall,
        "timers_s": timers.seconds,
        "timer_calls": timers.calls,
        "op_self_s": families,
    }


def quantization_functions(method: Method) -> list[tuple[Any, str, str]]:
    """``(owner, attribute, label)`` of the functions whose wall time a profile reports."""
    if method.conf_method is None:
        import bitsandbytes.functional as bnb_functional

        return [(bnb_functional, "dequantize_4bit", DEQUANTIZE)]
    import coalora.model.layers as layers
    from coalora.quant import QuantizedTensor

    return [
        (layers, "quantize", QUANTIZE),
        (QuantizedTensor, "dequantize", DEQUANTIZE),
        (layers.QuantLoRALinear, "master", "master (int8: its dequantization)"),
    ]


def op_families(averages, vocab_size: int) -> dict[str, float]:
    """Self CPU seconds of the profiled step by op family: the vocabulary projection
    (logits, forward and backward), other matrix products, attention, loss, the rest."""
    families: dict[str, float] = {}
    for event in averages:
        name, shapes = event.key, str(event.input_shapes)
        if name in ("aten::mm", "aten::addmm", "aten::bmm", "aten::matmul"):
            family = "logits matmul" if str(vocab_size) in shapes else "other matmul"
        elif "scaled_dot_product" in name or "flash_attention" in name:
            family = "attention"
        elif any(k in name for k in ("log_softmax", "nll_loss", "cross_entropy")):
            family = "loss"
        elif "bitsandbytes" in name:
            family = "bitsandbytes kernels"
        elif any(k in name for k in ("index_select", "bitwise", "__rshift__", "__and__")):
            family = "gathers and bit ops (de/quantization)"
        else:
            family = "other"
        families[family] = families.get(family, 0.0) + event.self_cpu_time_total / 1e6
    return dict(sorted(families.items(), key=lambda kv: -kv[1]))


def safe_name(name: str) -> str:
    return name.replace("+", "_")


# --- child: search and serving --------------------------------------------------------------------


def child_search(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    """One search round scored with the model on a held-out batch, then the same round from
    the same initial state with the recorded losses: the search's own time and memory."""
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    from coalora.quant import ConfigSpace, ErrorTable

    device = torch.device(args.device)
    cfg = compose_config(args, METHODS["coalora"])
    table = ErrorTable.load(table_path(work))
    model = load_coalora(cfg, device).eval()
    configs = training_run(cfg, table)[1].train_configs
    space = ConfigSpace.from_table(table)
    search = instantiate(cfg.search.strategy, _partial_=True)(space, configs)
    replay_search = copy.deepcopy(search)
    vocab = MODEL_SHAPES[args.model]["vocab_size"]
    heldout = random_batch(vocab, args.batch, args.seq, args.seed + 1, device)
    recorded: dict[tuple[int, ...], float] = {}
    scoring = {"forward_passes": 0, "seconds": 0.0}

    @torch.no_grad()
    def loss_of(choice: tuple[int, ...]) -> float:
        start = time.perf_counter()
        model.set_configuration(choice)
        loss = model(**heldout).loss.item()
        scoring["seconds"] += time.perf_counter() - start
        scoring["forward_passes"] += 1
        return loss

    def score(choices: list[tuple[int, ...]]) -> list[float]:
        for c in tqdm(choices, desc="scoring", leave=False):
            recorded[c] = loss_of(c)
        return [recorded[c] for c in choices]

    start = time.perf_counter()
    first = search.step(score)
    first_s = time.perf_counter() - start
    scored = dict(scoring)

    def replay(choices: list[tuple[int, ...]]) -> list[float]:
        return [recorded[c] if c in recorded else loss_of(c) for c in choices]

    gc.collect()
    rss_before = proc_status_mib("VmRSS")
    reset_peak_memory(torch.device("cpu"))
    start = time.perf_counter()
    second = replay_search.step(replay)
    replay_s = time.perf_counter() - start
    return {
        "pool": first.pool_size,
        "proposals": len(first.configs) - first.pool_size,
        "kept": len(first.kept),
        "acquisition_evaluations": first.acquisition_evaluations,
        "round_s": first_s,
        "scoring_s": scored["seconds"],
        "scoring_forward_passes": scored["forward_passes"],
        "search_own_s": replay_s,
        "search_added_rss_mib": proc_status_mib("VmHWM") - rss_before,
        "replay_new_configs": scoring["forward_passes"] - scored["forward_passes"],
        "replay_same_result": second.configs == first.configs and second.kept == first.kept,
        "strategy": {
            k: v
            for k, v in OmegaConf.to_container(cfg.search.strategy, resolve=True).items()
            if k != "_target_"
        },
    }


def child_serve(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    """Time ``Deployment.at(bits=SERVE_BITS)``: a first call, then ``--serve-repeats`` more."""
    from omegaconf import OmegaConf

    from coalora.quant import ErrorTable
    from coalora.serve import Deployment

    device = torch.device(args.device)
    cfg = compose_config(args, METHODS["coalora"])
    table = ErrorTable.load(table_path(work))
    model = load_coalora(cfg, device)
    torch.nn.init.normal_(model.config_net.mlp[-1].weight, std=0.01)  # a non-zero θ to fold
    config = {k: OmegaConf.to_container(cfg[k], resolve=True) for k in ("model", "quant", "method")}
    dep = Deployment(model, table, config=config)
    times = []
    for _ in tqdm(range(1 + args.serve_repeats), desc=f"at(bits={SERVE_BITS:g})", leave=False):
        start = time.perf_counter()
        served = dep.at(bits=SERVE_BITS)
        synchronize(device)
        times.append(time.perf_counter() - start)
        del served
    start = time.perf_counter()
    choice = dep.space.allocate(SERVE_BITS)
    allocate_s = time.perf_counter() - start
    return {
        "bits": SERVE_BITS,
        "first_s": times[0],
        "repeat_s": times[1:],
        "allocate_s": allocate_s,
        **dep.describe(choice),
    }


# --- the parent: run the children, write the report -----------------------------------------------


def run_child(args: argparse.Namespace, work: Path, task: str, round_: int = 0) -> dict[str, Any]:
    """Run one measurement in a fresh interpreter and return its JSON result."""
    result = work / f"{safe_name(task)}.json"
    command = [sys.executable, str(Path(__file__).resolve()), *args.forwarded, "--child", task]
    command += ["--work", str(work), "--round", str(round_)]
    subprocess.run(command, check=True)
    return json.loads(result.read_text())


def merge_rounds(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    """One method's rounds as one result: the timed steps of all rounds pooled, the highest
    peaks, the median load time, the first round's profile; per-round means kept."""
    merged = dict(rounds[0])
    steps = [t for r in rounds for t in r["step_s"]]
    merged |= {
        "step_s": steps,
        "step_mean_s": statistics.mean(steps),
        "step_median_s": statistics.median(steps),
        "step_mean_s_by_round": [r["step_mean_s"] for r in rounds],
        "load_build_s": statistics.median(r["load_build_s"] for r in rounds),
        "load_build_s_by_round": [r["load_build_s"] for r in rounds],
    }
    for phase in ("load_peak", "train_peak"):
        merged[phase] = {
            key: None if rounds[0][phase][key] is None else max(r[phase][key] for r in rounds)
            for key in rounds[0][phase]
        }
    if rounds[0]["quantizations_per_step"] is not None:
        merged["quantizations_per_step"] = statistics.mean(
            r["quantizations_per_step"] for r in rounds
        )
    labels = {k for r in rounds for k in r["timers_per_step_s"]}
    merged["timers_per_step_s"] = {
        k: statistics.mean(r["timers_per_step_s"].get(k, 0.0) for r in rounds) for k in labels
    }
    return merged


def ratio_rows(methods: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per method with its numbers and its ratios to the peer."""
    peer = methods.get(PEER)
    rows = []
    for name, m in methods.items():
        peak = max(m["load_peak"]["rss_mib"], m["train_peak"]["rss_mib"])
        row = {
            "method": name,
            "k": m["configs_per_step"],
            "load_build_s": m["load_build_s"],
            "step_mean_s": m["step_mean_s"],
            "step_median_s": m["step_median_s"],
            "peak_rss_mib": peak,
            "train_peak_rss_mib": m["train_peak"]["rss_mib"],
            "peak_cuda_mib": m["train_peak"]["cuda_mib"],
            "frozen_mib": m["frozen_bytes"] / MIB,
            "quantizations_per_step": m.get("quantizations_per_step"),
            "quantize_s_per_step": m["timers_per_step_s"].get(QUANTIZE, 0.0),
            "dequantize_s_per_step": m["timers_per_step_s"].get(DEQUANTIZE, 0.0),
        }
        if peer is not None:
            peer_peak = max(peer["load_peak"]["rss_mib"], peer["train_peak"]["rss_mib"])
            row |= {
                "step_ratio": m["step_mean_s"] / peer["step_mean_s"],
                "step_median_ratio": m["step_median_s"] / peer["step_median_s"],
                "peak_ratio": peak / peer_peak,
                "train_peak_ratio": m["train_peak"]["rss_mib"] / peer["train_peak"]["rss_mib"],
                "frozen_ratio": m["frozen_bytes"] / peer["frozen_bytes"],
                "step_ratio_by_round": " ".join(
                    f"{a / b:.3f}"
                    for a, b in zip(
                        m["step_mean_s_by_round"], peer["step_mean_s_by_round"], strict=True
                    )
                ),
            }
        rows.append(row)
    return rows


def target_rows(results: dict[str, Any]) -> list[dict[str, Any]]:
    """Each bound with its measured value and whether it holds."""
    rows = []
    by_method = {r["method"]: r for r in results["rows"]}
    coalora = by_method.get("coalora", {})
    for key, label in (
        ("step_ratio", "coalora k=1 step / peft+bnb step"),
        ("peak_ratio", "coalora k=1 peak memory / peft+bnb peak memory"),
    ):
        if key in coalora:
            rows.append(target_row(label, coalora[key], TARGETS[key], "x"))
    table = results.get("table", {})
    if table.get("seconds") is not None and table.get("sampled"):
        rows.append(
            target_row("error table, sampled estimate", table["seconds"], TARGETS["table_s"], "s")
        )
    search = results.get("search")
    if search:
        rows.append(
            target_row("search's own work: time", search["search_own_s"], TARGETS["search_s"], "s")
        )
        rows.append(
            target_row(
                "search's own work: added resident memory",
                search["search_added_rss_mib"] / 1024,
                TARGETS["search_added_gib"],
                "GiB",
            )
        )
    return rows


def target_row(label: str, value: float, limit: float, unit: str) -> dict[str, Any]:
    return {"target": label, "measured": value, "limit": limit, "unit": unit, "met": value <= limit}


def markdown_report(results: dict[str, Any]) -> str:
    """The report: setup, the per-method table, the targets, table, search and serving."""
    s = results["setup"]
    lines = [
        f"# Scale benchmark: {s['model']} shape, {s['device']}, {s['dtype']}",
        "",
        f"Command: `{results['command']}`",
        "",
        f"Random-weight model built from `Qwen2Config` at {s['model']}'s shape "
        f"({s['parameters'] / 1e6:.0f} M parameters, {s['target_matrices']} target matrices, "
        f"seed {s['seed']}), loaded from one saved folder by every measurement. Batch "
        f"{s['batch']}x{s['seq']} random tokens (labels = inputs), rank {s['rank']}, "
        f"{s['steps']} timed steps after one warm-up in each of {s['rounds']} rounds (every "
        "other round in reverse order; steps pooled), each method in its own process, "
        f"{s['threads']} threads, load average at start {s['load_average']}; coalora's bound "
        f"on cached packed weights (quant.cache_bytes) {s.get('cache_limit_mib') or 0:.0f} MiB. "
        "Peer: "
        f"{s['peer']}.",
        "",
        "| method | k | load+build (s) | step mean (s) | step median (s) | step / peer | "
        "peak RSS (MiB) | peak / peer | train-phase peak (MiB) | frozen targets (MiB) | "
        "quantizations / step | in quantize (s/step) | in dequantize (s/step) | "
        "step / peer by round |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results["rows"]:
        q = r["quantizations_per_step"]
        lines.append(
            f"| {r['method']} | {r['k']} | {r['load_build_s']:.1f} | {r['step_mean_s']:.2f} | "
            f"{r['step_median_s']:.2f} | {r.get('step_ratio', float('nan')):.2f} | "
            f"{r['peak_rss_mib']:.0f} | {r.get('peak_ratio', float('nan')):.2f} | "
            f"{r['train_peak_rss_mib']:.0f} | {r['frozen_mib']:.1f} | "
            f"{'' if q is None else f'{q:.1f}'} | {r['quantize_s_per_step']:.2f} | "
            f"{r['dequantize_s_per_step']:.2f} | {r.get('step_ratio_by_round', '')} |"
        )
    lines += ["", "| target | measured | limit | met |", "|---|---|---|---|"]
    for t in results["targets"]:
        lines.append(
            f"| {t['target']} | {t['measured']:.3g} {t['unit']} | ≤ {t['limit']:g} {t['unit']} | "
            f"{'yes' if t['met'] else 'no'} |"
        )
    lines += ["", *section_lines(results), "", "![ratios](ratios.png)", ""]
    return "\n".join(lines)


def section_lines(results: dict[str, Any]) -> list[str]:
    """Error table, search, serving and profile paragraphs."""
    lines = []
    table, exact = results.get("table", {}), results.get("exact_table")
    if table:
        how = f"sampled estimate ({table.get('sample_fraction')})" if table["sampled"] else "exact"
        took = "cached" if table["seconds"] is None else f"{table['seconds']:.1f} s"
        size = f"{table['matrices']} matrices x {table.get('options', '?')} options"
        lines.append(f"Error table ({size}, {how}): {took}.")
    if exact:
        lines.append(
            f"Exact table (computed once by `--exact-table`, {exact['threads']} threads): "
            f"{exact['seconds']:.0f} s."
        )
    for row in table.get("allocation_vs_exact", []):
        lines.append(
            f"- budget {row['budget']:g}: exact error of the sampled table's allocation / the "
            f"exact table's = {row['error_ratio']:.4f}; same option on "
            f"{100 * row['same_options']:.0f}% of matrices"
        )
    search = results.get("search")
    if search:
        lines += [
            "",
            f"Search round (pool {search['pool']}, {search['proposals']} proposals, "
            f"{search['acquisition_evaluations']} acquisition evaluations, {search['kept']} kept): "
            f"{search['round_s']:.1f} s in all, of which scoring {search['scoring_s']:.1f} s "
            f"({search['scoring_forward_passes']} forward passes of the held-out batch). The "
            f"same round replayed with the recorded losses: {search['search_own_s']:.1f} s and "
            f"{search['search_added_rss_mib']:.0f} MiB added resident memory "
            f"({search['replay_new_configs']} configurations new to the replay; same result: "
            f"{search['replay_same_result']}).",
        ]
    serve = results.get("serve")
    if serve:
        repeat = ", ".join(f"{t:.1f}" for t in serve["repeat_s"])
        lines += [
            "",
            f"Serving: `Deployment.at(bits={serve['bits']:g})` first call "
            f"{serve['first_s']:.1f} s, then {repeat} s (allocation alone "
            f"{serve['allocate_s']:.2f} s; "
            f"{serve['avg_bits']:.3f} average bits, {serve['served_bytes'] / MIB:.0f} MiB served).",
        ]
    for name, m in results["methods"].items():
        if "profile" in m:
            p = m["profile"]
            timers = ", ".join(f"{k} {v:.2f} s" for k, v in p["timers_s"].items())
            ops = ", ".join(f"{k} {v:.2f} s" for k, v in p["op_self_s"].items())
            lines += [
                "",
                f"Profile of one {name} step ({p['wall_s']:.1f} s wall): timers "
                f"{timers or 'none'}; profiler self time by op family: {ops} "
                f"(top ops: profile_{safe_name(name)}.txt).",
            ]
    return lines


def plot_ratios(rows: list[dict[str, Any]], path: Path) -> None:
    """Bar chart of each coalora method's ratios to the peer, with the target lines."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import FuncFormatter

    rows = [r for r in rows if r["method"] != PEER and "step_ratio" in r]
    if not rows:
        return
    keys = (
        ("step_ratio", "step (mean)"),
        ("peak_ratio", "peak RSS"),
        ("train_peak_ratio", "train-phase peak RSS"),
        ("frozen_ratio", "frozen target bytes"),
    )
    fig = Figure(figsize=(8.5, 4.4))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    width = 0.8 / len(keys)
    for i, (key, label) in enumerate(keys):
        xs = [j + (i - (len(keys) - 1) / 2) * width for j in range(len(rows))]
        ax.bar(xs, [r[key] for r in rows], width, label=label)
    ax.axhline(1.0, color="black", lw=0.8)
    ax.axhline(TARGETS["step_ratio"], color="tab:blue", ls="--", lw=0.8, label="step target")
    ax.axhline(TARGETS["peak_ratio"], color="tab:orange", ls="--", lw=0.8, label="memory target")
    ax.set_xticks(range(len(rows)), [r["method"] for r in rows])
    ax.set_ylabel(f"ratio to {PEER}")
    ax.set_yscale("log")
    plain = FuncFormatter(lambda value, _: f"{value:g}")
    ax.yaxis.set_major_formatter(plain)
    ax.yaxis.set_minor_formatter(plain)
    ax.legend(fontsize=8)
    ax.grid(True, axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def write_results(results: dict[str, Any], out: Path) -> None:
    from bench_quant import write_csv

    out.mkdir(parents=True, exist_ok=True)
    write_csv(out / "results.csv", results["rows"])
    (out / "results.json").write_text(json.dumps(results, indent=1))
    (out / "results.md").write_text(markdown_report(results))
    plot_ratios(results["rows"], out / "ratios.png")
    print(f"wrote {out}/results.{{csv,json,md}} and ratios.png")


def setup_info(args: argparse.Namespace) -> dict[str, Any]:
    """The settings and the model's size, for the report."""
    from transformers import Qwen2Config

    config = Qwen2Config(**MODEL_SHAPES[args.model])
    h, i, n = config.hidden_size, config.intermediate_size, config.num_hidden_layers
    kv = config.num_key_value_heads * h // config.num_attention_heads
    per_block = 2 * h * h + 2 * h * kv + 3 * h * i
    return {
        "model": args.model,
        "device": args.device,
        "dtype": args.dtype,
        "batch": args.batch,
        "seq": args.seq,
        "rank": args.rank,
        "steps": args.steps,
        "rounds": args.rounds,
        "seed": args.seed,
        "threads": torch.get_num_threads(),
        "load_average": " ".join(f"{x:.2f}" for x in os.getloadavg()),
        "parameters": n * per_block + config.vocab_size * h,
        "target_matrices": 7 * n,
        "shape": MODEL_SHAPES[args.model],
        "peer": (
            "transformers BitsAndBytesConfig(load_in_4bit, nf4, double quant, compute dtype "
            f"{args.dtype}), peft LoraConfig(r={args.rank}, all 7 linear types); "
            "prepare_model_for_kbit_training (without gradient checkpointing) only in fp32, "
            "where it casts nothing"
        ),
    }


def parent(args: argparse.Namespace) -> None:
    """Build the model folder, run every measurement in its own process, write the report."""
    folder = model_folder(args)
    folder.parent.mkdir(parents=True, exist_ok=True)
    build_s = build_model_folder(args.model, args.seed, folder)
    print(f"model folder {folder} ({'reused' if not build_s else f'built in {build_s:.0f} s'})")
    if args.exact_table:
        work = Path(tempfile.mkdtemp(prefix="exact-", dir=WORK_ROOT))
        print(json.dumps(run_child(args, work, "exact-table"), indent=1))
        return
    results: dict[str, Any] = {"command": " ".join(map(shlex.quote, sys.argv)), "methods": {}}
    with tempfile.TemporaryDirectory(prefix="run-", dir=WORK_ROOT) as tmp:
        work = Path(tmp)
        results["setup"] = setup_info(args) | {"model_build_s": build_s}
        stages = [("table", 0)]
        for r in range(args.rounds):  # every other round in reverse: drift hits all alike
            stages += [(m, r) for m in (args.methods if r % 2 == 0 else args.methods[::-1])]
        stages += [(stage, 0) for stage in ("search", "serve") if getattr(args, stage)]
        rounds: dict[str, list[dict[str, Any]]] = {}
        for stage, r in tqdm(stages, desc="measurements"):
            tqdm.write(
                f"--- {stage}" + (f" (round {r + 1} of {args.rounds})" if stage in METHODS else "")
            )
            result = run_child(args, work, stage, r)
            if stage in METHODS:
                rounds.setdefault(stage, []).append(result)
            else:
                results[stage] = result
        results["methods"] = {name: merge_rounds(rounds[name]) for name in args.methods}
    limits = [
        m["cache_limit_bytes"] for m in results["methods"].values() if "cache_limit_bytes" in m
    ]
    results["setup"]["cache_limit_mib"] = limits[0] / MIB if limits else None
    _, exact_info = exact_table_paths(args)
    if exact_info.is_file():
        results["exact_table"] = json.loads(exact_info.read_text())
    results["rows"] = ratio_rows(results["methods"])
    results["targets"] = target_rows(results)
    write_results(results, Path(args.out))
    print(markdown_report(results))


CHILDREN: dict[str, Callable[[argparse.Namespace, Path], dict[str, Any]]] = {
    "table": child_table,
    "exact-table": child_exact_table,
    "search": child_search,
    "serve": child_serve,
} | {name: (lambda a, w, m=m: child_train(a, w, m)) for name, m in METHODS.items()}


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    parser.add_argument(
        "--model",
        choices=sorted(MODEL_SHAPES),
        default="qwen2.5-0.5b",
        help="model shape (random weights at that shape)",
    )
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument(
        "--dtype",
        choices=sorted(DTYPES),
        default="fp32",
        help="dtype of the model on both sides (and bitsandbytes' compute dtype)",
    )
    parser.add_argument("--batch", type=int, default=4, help="sequences per batch")
    parser.add_argument("--seq", type=int, default=128, help="tokens per sequence")
    parser.add_argument("--rank", type=int, default=16, help="LoRA rank on both sides")
    parser.add_argument("--steps", type=int, default=5, help="timed steps after one warm-up")
    parser.add_argument(
        "--rounds",
        type=int,
        default=2,
        help="times every method is measured, in alternating order (steps pooled)",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the weights and batches")
    parser.add_argument(
        "--methods",
        nargs="+",
        choices=list(METHODS),
        default=list(METHODS),
        help="training setups to measure",
    )
    parser.add_argument(
        "--profile",
        nargs="*",
        choices=list(METHODS),
        default=["coalora", PEER],
        help="methods that profile one extra step",
    )
    parser.add_argument(
        "--sample-fraction",
        type=float,
        default=SAMPLE_FRACTION,
        help="error_table's sampled estimate: share of blocks quantized",
    )
    parser.add_argument(
        "--cache-bytes",
        type=int,
        help="override quant.cache_bytes, coalora's bound on cached packed weights "
        "(default: conf/quant/nf.yaml's)",
    )
    parser.add_argument(
        "--no-search", dest="search", action="store_false", help="skip the search round"
    )
    parser.add_argument("--no-serve", dest="serve", action="store_false", help="skip Deployment.at")
    parser.add_argument(
        "--serve-repeats", type=int, default=1, help="Deployment.at calls timed after the first"
    )
    parser.add_argument(
        "--exact-table",
        action="store_true",
        help="only compute the exact error table and cache it for later runs",
    )
    parser.add_argument("--out", default=str(DEFAULT_OUT), help="results folder")
    parser.add_argument("--child", choices=list(CHILDREN), help=argparse.SUPPRESS)
    parser.add_argument("--work", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--round", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if min(args.batch, args.seq, args.rank, args.steps, args.rounds) < 1:
        parser.error("--batch, --seq, --rank, --steps and --rounds must be positive integers")
    if not 0 < args.sample_fraction <= 1:
        parser.error(f"--sample-fraction={args.sample_fraction} must be in (0, 1]")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is available")
    argv = sys.argv[1:] if argv is None else list(argv)
    args.forwarded = [a for a in argv if a not in ("--exact-table",)]
    return args


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    if args.child is None:
        parent(args)
        return
    result = CHILDREN[args.child](args, args.work)
    (args.work / f"{safe_name(args.child)}.json").write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
