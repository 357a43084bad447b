"""The training loop (the only one): packed sequences, square-averaged response loss, AdamW with
warm-up + cosine per stage, accumulation, clipping, fp32 or bf16 autocast, exact resume, FSDP2.

    internvl35 train CONFIG.yaml                       # one process
    torchrun --nproc_per_node=2 -m internvl35.train CONFIG.yaml
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, replace
from itertools import islice
from pathlib import Path

import torch
from torch import nn

from internvl35.config import get_config
from internvl35.data.sft import ImageSettings, Pack, pack_stream
from internvl35.data.template import get_template
from internvl35.data.tokenizer import Tokenizer, train_bpe
from internvl35.hardware import matmul_peak_flops
from internvl35.models.internvl import InternVLModel
from internvl35.models.moe import Qwen3MoE, load_balancing_loss
from internvl35.train import checkpoint
from internvl35.train.config import Stage, TrainConfig
from internvl35.train.data import ExampleSource, world_corpus
from internvl35.train.dense import DenseWarmup
from internvl35.train.heldout import HELDOUT_SEED_OFFSET, HeldOut
from internvl35.train.losses import pack_loss_sum, square_weights
from internvl35.train.parallel import Dist, parallelize
from internvl35.train.report import MetricsLog


def init_weights(model: InternVLModel) -> None:
    """Fresh weights for training from scratch (small normal init, unit norms, layer scale as configured)."""
    for name, p in model.named_parameters():
        if p.ndim == 1 and name.endswith(("ls1", "ls2")):
            nn.init.constant_(p, model.cfg.vision.layer_scale_init)
        elif name.endswith("bias"):
            nn.init.zeros_(p)
        elif p.ndim == 1:
            nn.init.ones_(p)
        else:
            nn.init.normal_(p, std=0.02)


def build(cfg: TrainConfig, device: torch.device = torch.device("cpu")) -> tuple[InternVLModel, Tokenizer, dict]:
    """Model + tokenizer from a checkpoint directory (fine-tuning) or a preset (from scratch), in fp32
    on `device`."""
    path = Path(cfg.model)
    if path.is_dir():
        from internvl35.weights.config_json import config_from_dict, read_config_json
        from internvl35.weights.loader import load_weights
        mcfg, fmt = config_from_dict(read_config_json(path), name=path.name)
        model = load_weights(path, mcfg, fmt, torch.float32, device=device)
        tok = Tokenizer.from_dir(Path(cfg.tokenizer) if cfg.tokenizer else path)
        origin = {"init": str(path)}
    else:
        tok = Tokenizer.from_dir(Path(cfg.tokenizer)) if cfg.tokenizer else train_bpe(world_corpus(), cfg.vocab_size)
        text = {**cfg.model_overrides.get("text", {}), "vocab_size": tok.vocab_size}
        mcfg = get_config(cfg.model, **{**cfg.model_overrides, "text": text})
        torch.manual_seed(cfg.seed)
        model = InternVLModel(mcfg)
        init_weights(model)  # on the CPU: the same weights for a seed whatever the device
        model.to(device)
        origin = {"init": f"preset {cfg.model}, seed {cfg.seed}"}
    model.image_token_id = tok.img_context_id
    return model, tok, origin


def freeze(model: InternVLModel, parts: list[str]) -> None:
    groups = {"vision": ["vision_model"], "projector": ["mlp1", "mlp2"], "llm": ["language_model"],
              "router": ["pooling_before_gating", "gating"]}
    unknown = set(parts) - set(groups)
    if unknown:
        raise ValueError(f"unknown freeze target(s) {sorted(unknown)}; use {sorted(groups)}")
    frozen = tuple(p for part in parts for p in groups[part])
    for name, p in model.named_parameters():
        p.requires_grad_(not name.startswith(frozen))


def make_optimizer(model: nn.Module, stage: Stage, cfg: TrainConfig):
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if p.ndim < 2 or "embedding" in name else decay).append(p)
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=stage.lr, betas=cfg.betas)

    def factor(step: int) -> float:
        if step < stage.warmup_steps:
            return (step + 1) / stage.warmup_steps
        t = (step - stage.warmup_steps) / max(1, stage.steps - stage.warmup_steps)
        return stage.min_lr_ratio + (1 - stage.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(t, 1.0)))

    return opt, torch.optim.lr_scheduler.LambdaLR(opt, factor)


def micro_step(model, p: Pack, weights: torch.Tensor, scale: float, cfg: TrainConfig, moe_coef: float) -> float:
    """Forward + backward of one pack; returns its unscaled sum(w * CE)."""
    loss_sum = pack_loss_sum(model, p, weights, cfg.precision == "bf16")
    loss = loss_sum * scale
    if moe_coef:
        moes = [m for m in model.modules() if isinstance(m, Qwen3MoE)]
        loss = loss + moe_coef * sum(load_balancing_loss(m.last_router_logits, m.moe.top_k) for m in moes)
    loss.backward()
    return float(loss_sum.detach())


def flop_weights(model: InternVLModel) -> tuple[int, int]:
    """FLOPs per token of the LLM (non-embedding) and per patch of the ViT under the current freezing:
    6 x parameters for a trained part, 2 x for a frozen ViT (nothing before it needs gradients), 4 x
    for a frozen LLM that still passes gradients back to a trained ViT or projector."""
    def trained(m: nn.Module) -> bool:
        return any(q.requires_grad for q in m.parameters())

    llm = sum(q.numel() for n, q in model.language_model.named_parameters() if "embed_tokens" not in n)
    vit = sum(q.numel() for q in model.vision_model.parameters())
    vision = trained(model.vision_model)
    upstream = vision or trained(model.mlp1)
    return (6 if trained(model.language_model) else 4 if upstream else 2) * llm, (6 if vision else 2) * vit


def flops_per_pack(flop_w: tuple[int, int], patches: int, p: Pack) -> float:
    llm, vit = flop_w
    tiles = 0 if p.pixel_values is None else p.pixel_values.shape[0]
    return llm * p.input_ids.numel() + vit * tiles * patches


@dataclass
class StepResult:
    loss: float  # mean loss of the optimizer step
    next_example: int  # data position after it
    tokens: int  # LLM tokens (language stages) or ViT patches (dense stages)
    samples: int
    flops: float


def lm_step(model, packs, cfg: TrainConfig, d: Dist, moe_coef: float, flop_w: tuple[int, int],
            patches: int) -> StepResult:
    """Forward + backward of one global batch of packs (this rank's share); gradients left in place."""
    step_packs = list(islice(packs, cfg.grad_accum))  # every rank builds the global batch
    ws = [square_weights(p.labels, p.segments) for _, p in step_packs]
    total_w = float(sum(w.sum() for w in ws))
    loss_sum = sum(micro_step(model, p.to(d.device), w.to(d.device), d.world / total_w, cfg, moe_coef)
                   for (_, p), w in zip(step_packs[d.rank::d.world], ws[d.rank::d.world]))
    return StepResult(loss=d.all_reduce_sum(loss_sum) / total_w, next_example=step_packs[-1][0],
                      tokens=sum(p.input_ids.numel() for _, p in step_packs),
                      samples=sum(p.num_examples for _, p in step_packs),
                      flops=sum(flops_per_pack(flop_w, patches, p) for _, p in step_packs))


def dense_step(warmup: DenseWarmup, source: ExampleSource, start: int, tiles: int, d: Dist,
               vit_flops: int) -> StepResult:
    """One global batch of the dense vision objective; every rank takes every world-th tile and the
    gradients are summed across ranks, so any process count computes the same step."""
    nxt, x, y = source.dense_batch(start, tiles)
    patches = y.shape[0] * y.shape[1]
    loss = warmup(x[d.rank::d.world].to(d.device), y[d.rank::d.world].to(d.device), 1.0 / patches)
    loss.backward()
    d.all_reduce_grads(warmup)
    return StepResult(loss=d.all_reduce_sum(float(loss.detach())), next_example=nxt, tokens=patches,
                      samples=nxt - start, flops=vit_flops * x.shape[0] * (y.shape[1] + 1))


def peak_flops(d: Dist, cfg: TrainConfig) -> float:
    """The matmul peak of all processes, in the compute dtype (bf16 autocast only changes it on GPUs:
    CPUs here run bf16 matmuls far below fp32)."""
    gpu = d.device.type == "cuda"
    dtype = torch.bfloat16 if gpu and cfg.precision == "bf16" else torch.float32
    return matmul_peak_flops(8192 if gpu else 1024, dtype, d.device) * d.world


def heldout_for(stage: Stage, cfg: TrainConfig, tok: Tokenizer, template, settings: ImageSettings,
                model: InternVLModel, d: Dist) -> HeldOut:
    source = ExampleSource(stage, tok, template, settings, cfg.seed + HELDOUT_SEED_OFFSET,
                           model.cfg.system_message, model.cfg.vision.patch_size)
    return HeldOut(source, stage.objective == "dense", cfg.max_tokens, d.device, cfg.precision == "bf16")


def stage_module(model: InternVLModel, stage: Stage, d: Dist, seed: int) -> nn.Module:
    """What a stage trains: the (sharded) model, or for a dense stage the ViT with its label heads."""
    if stage.objective not in ("lm", "dense"):
        raise ValueError(f"stage {stage.name!r}: unknown objective {stage.objective!r} (use 'lm' or 'dense')")
    freeze(model, stage.freeze)
    if stage.objective == "lm":
        return parallelize(model, d)
    if getattr(model, "_fsdp_applied", False):
        raise ValueError("with several processes, dense stages must come before the language stages")
    return DenseWarmup(model.vision_model, model.cfg.vision.hidden_size, model.cfg.select_layer, seed).to(d.device)


def train(cfg: TrainConfig, resume: bool = True) -> Path:
    """Run every stage of `cfg`; returns the final checkpoint directory."""
    d = Dist.init(cfg.device)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    ckpt = checkpoint.latest(out) if resume else None
    if ckpt is not None:
        cfg = replace(cfg, model=str(ckpt), tokenizer=str(ckpt))
    model, tok, origin = build(cfg, d.device)
    state = {"step": 0, "stage": 0, "stage_step": 0, "next_example": 0, **origin}
    blobs = None
    if ckpt is not None:
        state, blobs = checkpoint.load_state(ckpt)
        checkpoint.restore_rng(blobs)
    model.train()
    settings = ImageSettings(model.cfg.vision.image_size, cfg.max_tiles or model.cfg.max_dynamic_patch,
                             model.cfg.num_image_token, model.cfg.use_thumbnail)
    template = get_template(model.cfg.template)
    moe_coef = model.cfg.text.moe.router_aux_loss_coef if model.cfg.text.moe else 0.0
    peak = peak_flops(d, cfg)
    log = MetricsLog(out, cfg.total_steps, d.rank == 0)
    (out / "train_config.json").write_text(json.dumps(asdict(cfg), indent=2, default=str))
    final = out / "checkpoint"
    for si in range(state["stage"], len(cfg.stages)):
        stage = cfg.stages[si]
        dense = stage.objective == "dense"
        wrapped = stage_module(model, stage, d, cfg.seed)
        flop_w = flop_weights(model)
        opt, sched = make_optimizer(wrapped, stage, cfg)
        if blobs is not None and state["stage_step"] > 0:
            # mid-stage: continue the stage's optimizer; at a stage boundary the new stage starts
            # with a fresh optimizer and schedule, exactly as an uninterrupted run does
            checkpoint.restore_optimizer(wrapped, opt, blobs["optimizer"])
            sched.load_state_dict(blobs["scheduler"])
            if dense:
                wrapped.heads.load_state_dict(blobs["aux"])
        blobs = None
        source = ExampleSource(stage, tok, template, settings, cfg.seed, model.cfg.system_message,
                               model.cfg.vision.patch_size, cfg.data_workers)
        packs = None if dense else pack_stream(source.stream(state["next_example"]), cfg.max_tokens)
        heldout = heldout_for(stage, cfg, tok, template, settings, model, d) if cfg.eval_every else None
        while state["stage_step"] < stage.steps:
            t0 = time.perf_counter()
            if dense:
                step = dense_step(wrapped, source, state["next_example"], stage.batch_tiles, d, flop_w[1])
            else:
                step = lm_step(wrapped, packs, cfg, d, moe_coef, flop_w, model.cfg.vision.grid**2 + 1)
            gnorm = torch.nn.utils.clip_grad_norm_([q for q in wrapped.parameters() if q.requires_grad],
                                                   cfg.grad_clip)
            gnorm = float(gnorm.full_tensor() if hasattr(gnorm, "full_tensor") else gnorm)
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            state.update(step=state["step"] + 1, stage_step=state["stage_step"] + 1,
                         next_example=step.next_example, stage=si)
            dt = time.perf_counter() - t0
            measured = heldout.measure(wrapped) if heldout and state["step"] % cfg.eval_every == 0 else {}
            log.step(state["step"], stage=stage.name, loss=step.loss, lr=sched.get_last_lr()[0],
                     grad_norm=gnorm, tokens=step.tokens, tok_s=step.tokens / dt, samples=step.samples,
                     mfu=step.flops / dt / peak, dt=dt, **measured)
            last = state["stage_step"] == stage.steps
            if state["step"] % cfg.save_every == 0 or last:
                # a checkpoint at the end of a stage resumes at the start of the next one
                saved = {**state, "stage": si + 1, "stage_step": 0, "next_example": 0} if last else state
                params, opt_state = checkpoint.full_state(model, opt, owner=wrapped)
                aux = wrapped.heads.state_dict() if dense else None
                final = d.save(lambda: checkpoint.save(out, model, tok, params, opt_state, sched, saved, aux))
                log.plot()
        source.close()
        state.update(stage=si + 1, stage_step=0, next_example=0)
    log.close()
    d.barrier()
    return final
