"""LoRA adapters on the diffusers Wan and AnyFlow transformers: add, select, move, merge.

A network with adapters keeps its base weights frozen and trains only the low-rank pairs
`W x + (alpha / rank) B A x` on the target linear layers. The adapters are peft's
(`diffusers.loaders.PeftAdapterMixin.add_adapter` with a `peft.LoraConfig`, the way diffusers
trains LoRA), so the forward pass is the library's own. What this module adds:

- a deterministic initialisation from a seed (`A` uniform in +-1/sqrt(fan_in), `B = 0`, so
  the adapted network starts exactly at its base), the same in every process that builds it;
- the adapter-only state dict (what a weight sync sends) and its strict loading;
- the merged plain state dict (`W + (alpha / rank) B A`, peft's keys mapped back to the base
  model's), so exported networks load in diffusers with no peft involved.

Pure torch + diffusers + peft: no Ray, DeepSpeed or MLflow (tests/test_layering.py).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from . import draws

ADAPTER = "default"
"""peft's adapter name; one adapter per network"""
DEFAULT_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "ffn.net.0.proj", "ffn.net.2")
"""every block's self- and cross-attention projections and both FFN linears (Wan and AnyFlow name them alike)"""
_STREAMS = {"student": 100, "critic": 101}
"""draw streams of the adapters' initialisation (apart from every training draw's)"""


@dataclass(frozen=True)
class LoraSettings:
    rank: int
    alpha: float
    """the scale of `B A` is alpha / rank"""
    targets: tuple[str, ...] = DEFAULT_TARGETS
    """module names; a linear layer is adapted if its name equals one or ends with "." + one (peft's rule)"""


def matches(name: str, targets) -> bool:
    """Whether the module `name` is a LoRA target (peft's rule for a list of target names)."""
    return any(name == t or name.endswith("." + t) for t in targets)


def target_layers(model: torch.nn.Module, targets) -> list[str]:
    """Names of the linear layers of `model` that `targets` selects; ValueError if a selected module is
    not a linear layer, or if nothing is selected."""
    layers = []
    for name, module in model.named_modules():
        if matches(name, targets):
            if not isinstance(module, torch.nn.Linear):
                raise ValueError(f"LoRA targets select {name}, a {type(module).__name__}, not a linear layer")
            layers.append(name)
    if not layers:
        raise ValueError(f"LoRA targets {list(targets)} select no layer of {type(model).__name__}")
    return layers


def unmatched_targets(model: torch.nn.Module, targets) -> list[str]:
    """The targets that select no module of `model` (a typo, or a layer only the other network has)."""
    names = [name for name, _ in model.named_modules()]
    return [t for t in targets if not any(matches(name, [t]) for name in names)]


def init_generator(seed: int, stage: str, network: str) -> torch.Generator:
    """The generator of a network's adapter initialisation (`network`: student or critic)."""
    return draws.generator(seed, stage, 0, stream=_STREAMS[network])


def add_adapters(model: torch.nn.Module, settings: LoraSettings, generator: torch.Generator) -> torch.nn.Module:
    """Add LoRA adapters to `model` in place (initialised from `generator` on the CPU, so on any device
    they are the same), freeze every base parameter and leave only the adapters trainable."""
    from peft import LoraConfig

    if has_adapters(model):
        raise ValueError(f"{type(model).__name__} has LoRA adapters already")
    layers = target_layers(model, settings.targets)
    config = LoraConfig(r=settings.rank, lora_alpha=settings.alpha, target_modules=layers, lora_dropout=0.0,
                        bias="none", init_lora_weights=True)
    with torch.random.fork_rng(devices=[]):  # peft's own initialisation would draw from the global RNG
        model.add_adapter(config, adapter_name=ADAPTER)
    with torch.no_grad():
        for name, p in sorted(adapter_parameters(model).items()):
            if ".lora_A." in name:
                bound = 1.0 / math.sqrt(p.shape[1])
                p.copy_((torch.rand(p.shape, generator=generator, dtype=torch.float64) * 2 - 1) * bound)
            else:
                p.zero_()
    mark_trainable(model)
    return model


def has_adapters(model: torch.nn.Module) -> bool:
    return any(".lora_" in name for name, _ in model.named_parameters())


def adapter_parameters(model: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    """The adapters' parameters by name (peft's names: `<layer>.lora_A.default.weight`, ...)."""
    return {name: p for name, p in model.named_parameters() if ".lora_A." in name or ".lora_B." in name}


def mark_trainable(model: torch.nn.Module) -> torch.nn.Module:
    """Training mode; only the adapters trainable if the network has any, else every parameter."""
    model.train()
    adapters = has_adapters(model)
    for name, p in model.named_parameters():
        p.requires_grad_(not adapters or ".lora_A." in name or ".lora_B." in name)
    return model


def describe(model: torch.nn.Module) -> dict | None:
    """The adapters' rank, alpha and adapted layers (for checkpoints), or None without adapters."""
    from peft.tuners.lora import LoraLayer

    config = getattr(model, "peft_config", {}).get(ADAPTER)
    if config is None or not has_adapters(model):
        return None
    layers = sorted(name for name, m in model.named_modules() if isinstance(m, LoraLayer))
    return {"rank": int(config.r), "alpha": float(config.lora_alpha), "layers": layers}


def adapter_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A detached CPU copy of the adapters' weights: all a weight sync needs to send."""
    return {k: v.detach().to("cpu", copy=True) for k, v in adapter_parameters(model).items()}


@torch.no_grad()
def load_adapter_state_dict(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Copy adapter weights into `model`; its adapters and `state` must have the same names and shapes."""
    params = adapter_parameters(model)
    if set(state) != set(params):
        extra, missing = sorted(set(state) - set(params)), sorted(set(params) - set(state))
        raise ValueError(f"adapter state does not fit the model: unexpected {extra[:3]}, missing {missing[:3]}")
    for name, p in params.items():
        if state[name].shape != p.shape:
            raise ValueError(f"adapter {name}: shape {tuple(state[name].shape)}, the model's is {tuple(p.shape)}")
        p.copy_(state[name])


@torch.no_grad()
def merged_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The plain state dict (the base model's keys) with every adapter merged into its layer's weight,
    as detached CPU tensors; without adapters, the state dict itself."""
    from peft.tuners.lora import LoraLayer

    state = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()
             if ".lora_A." not in k and ".lora_B." not in k}
    for name, module in model.named_modules():
        if isinstance(module, LoraLayer) and ADAPTER in module.lora_A:
            key = f"{name}.base_layer.weight"
            delta = module.get_delta_weight(ADAPTER).detach().to("cpu")
            state[key] = (state[key].float() + delta.float()).to(state[key].dtype)
    return {k.replace(".base_layer.", "."): v for k, v in state.items()}


def merged(model: torch.nn.Module) -> torch.nn.Module:
    """A new plain diffusers model (on the CPU) of `model`'s class and config with the adapters merged in:
    no peft layers, so `save_pretrained` writes a folder that loads without peft. `model` is unchanged."""
    from accelerate import init_empty_weights

    with init_empty_weights():  # parameters on the meta device: no random initialisation to pay for
        plain = type(model).from_config(model.config)
    plain.load_state_dict(merged_state_dict(model), strict=True, assign=True)
    return plain
