"""How the learners' models are made trainable: the one ordered function (STYLE.md habit 5).

`wrap(model, optim, ...)` applies, in this order:

1. LoRA adapters when asked for (`pipeline.flowmap.lora.add_adapters`: base weights frozen,
   adapters initialised from the given generator, the same as the reference's), then training
   mode with the trainable parameters: the adapters only, or every parameter without LoRA;
2. the EMA copy of the weights (adapters included), taken before sharding (ZeRO-3
   partitions the module in place);
3. the client optimiser and warm-up schedule: the reference's own objects
   (`pipeline.flowmap.optim.optimizer_from`: torch AdamW over the trainable parameters with
   the config's lr, betas and weight decay, and the linear warm-up LambdaLR), so the update
   rule is the same code;
4. the DeepSpeed engine: ZeRO stage 2 or 3, gradient clipping by DeepSpeed (same formula
   as `torch.nn.utils.clip_grad_norm_`: scale by clip / (norm + 1e-6) when above),
   `zero_allow_untested_optimizer` because the optimiser is a client torch AdamW.

Process group: gloo on CPU (with `DS_ACCELERATOR=cpu`, set here before DeepSpeed is
imported), NCCL on GPU; Ray Train creates it (`TorchConfig(backend=dist_backend(...))`)
and DeepSpeed reuses it (`deepspeed.initialize` finds torch.distributed initialised). Seen
working on CPU with torch 2.13, DeepSpeed 0.19.8, Ray 2.60: ZeRO-2 and ZeRO-3, one and two
workers; ZeRO-3's `all_gather_into_tensor` and `reduce_scatter_tensor` run on gloo in this
torch (with deprecation warnings only). With two or more CPU workers DeepSpeed JIT-builds its small
shared-memory all-reduce op on first use (cached under ~/.cache/torch_extensions); a single CPU worker
skips it (`_deepspeed`). DeepSpeed is imported only inside the
learner processes, never by the driver.
"""

from __future__ import annotations

import os
from contextlib import nullcontext

import torch

from pipeline.config import OptimConfig
from pipeline.flowmap.lora import LoraSettings, add_adapters, mark_trainable
from pipeline.flowmap.optim import EMA, optimizer_from


def dist_backend(use_gpu: bool) -> str:
    """The torch.distributed backend of the learner group."""
    return "nccl" if use_gpu else "gloo"


def _deepspeed():
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import deepspeed

    if (not torch.cuda.is_available() and torch.distributed.is_initialized()
            and torch.distributed.get_world_size() == 1):
        # one CPU learner all-reduces with nobody, but DeepSpeed would still JIT-compile its shared-memory
        # all-reduce op the first time (about a minute of a fresh 2-core machine's learner start-up)
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    return deepspeed


def ds_config(optim: OptimConfig, zero_stage: int, micro_batch: int) -> dict:
    """The DeepSpeed config of one engine: fp32, no accumulation, ZeRO stage, clipping."""
    return {
        "train_micro_batch_size_per_gpu": micro_batch,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": optim.grad_clip,
        "zero_optimization": {"stage": zero_stage},
        "zero_allow_untested_optimizer": True,
        "fp16": {"enabled": False},
        "bf16": {"enabled": False},
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
    }


def wrap(model: torch.nn.Module, optim: OptimConfig, zero_stage: int, micro_batch: int, keep_ema: bool,
         lora: LoraSettings | None = None,
         lora_init: torch.Generator | None = None) -> tuple[torch.nn.Module, EMA | None]:
    """(DeepSpeed engine, EMA of the weights or None): the ordered wrapping described above. With `lora`,
    `lora_init` draws the adapters' initialisation (`pipeline.flowmap.lora.init_generator`)."""
    deepspeed = _deepspeed()
    # 1. LoRA adapters (if asked for); training mode, the trainable parameters
    if lora is not None:
        model = add_adapters(model, lora, lora_init)
    model = mark_trainable(model)
    # 2. the EMA copy, before ZeRO-3 shards the parameters
    ema = EMA(model, optim.ema, optim.ema_start) if keep_ema else None
    # 3. the reference's optimiser and warm-up schedule
    opt, sched = optimizer_from(model.parameters(), optim)
    # 4. the DeepSpeed engine
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=opt, lr_scheduler=sched,
                                           config=ds_config(optim, zero_stage, micro_batch))
    return engine, ema


def full_params(engine, zero_stage: int, modifier_rank: int | None = None, frozen: bool = False):
    """Context in which `engine.module` holds its trained parameters in full (with `frozen`, the frozen
    ones too: LoRA's base weights; without LoRA every parameter is trained); a collective under ZeRO-3
    (every rank must enter it), nothing to do under ZeRO-2 (parameters are replicated). With
    `modifier_rank`, that rank's changes to the parameters are scattered back on exit."""
    if zero_stage < 3:
        return nullcontext()
    deepspeed = _deepspeed()
    params = [p for p in engine.module.parameters() if frozen or p.requires_grad]
    return deepspeed.zero.GatheredParameters(params, modifier_rank=modifier_rank)


def state_dict_of(engine) -> dict:
    """A detached CPU copy of the module's state (call inside `full_params(..., frozen=True)`)."""
    return {k: v.detach().to("cpu", copy=True) for k, v in engine.module.state_dict().items()}


def trained_state_of(engine) -> dict:
    """A detached CPU copy of the module's state without its frozen parameters (call inside
    `full_params`): every tensor without LoRA, the adapters and buffers with it."""
    frozen = {name for name, p in engine.module.named_parameters() if not p.requires_grad}
    return {k: v.detach().to("cpu", copy=True) for k, v in engine.module.state_dict().items() if k not in frozen}
