"""Typed config: the dataclass schemas Hydra composes into, and their checks.

Hydra stays at the edge: `launch.py` composes YAML from `conf/` onto these schemas and calls
`OmegaConf.to_object` once, which builds these dataclasses and runs every `__post_init__`
check before any model is loaded. From there only dataclasses travel, so the core can be
driven from Python without Hydra (tests, notebooks): `Config(model=ModelConfig(...), ...)`.

Closed choices are Enums (OmegaConf validates them at compose time); a wrong type or an
unknown key fails in Hydra with its own message. Cross-field and range checks raise
`UserError` naming the key, the value and the fix.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import List, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, OmegaConf

from sd_lora.errors import UserError


class Attention(Enum):
    """U-Net attention backend."""

    sdp = "sdp"  # torch.nn.functional.scaled_dot_product_attention (fused / flash / mem-efficient)
    eager = "eager"  # plain matmul-softmax-matmul, materialises the attention matrix


class SdpKernel(Enum):
    """The fused attention kernel torch tries first for `attention: sdp` (it falls back in its own order)."""

    auto = "auto"  # torch's own order (cuDNN first on an H100 with torch 2.11: report.json's sdp_priority_order)
    flash = "flash"
    efficient = "efficient"
    cudnn = "cudnn"  # cuDNN's fused attention (NVIDIA); see docs/performance.md for when it wins
    math = "math"


class BasePrecision(Enum):
    """The storage of the U-Net's frozen Linear weights (`model.base_precision`; null = the precision's dtype)."""

    fp8 = "fp8"  # float8_e4m3fn with a per-tensor scale, forward and input-gradient matmuls in fp8 (sd_lora/fp8.py)


class ModelFamilyName(Enum):
    """The model family (sd_lora/families/): what to load and how a caption conditions the U-Net."""

    sd = "sd"  # Stable Diffusion 1.x / 2.x: one CLIP text encoder (families/sd.py)
    sdxl = "sdxl"  # Stable Diffusion XL: two CLIP text encoders, pooled embedding and size conditioning (families/sdxl.py)


class PredictionType(Enum):
    epsilon = "epsilon"
    v_prediction = "v_prediction"


class MixedPrecision(Enum):
    no = "no"
    fp16 = "fp16"
    bf16 = "bf16"


class DeviceType(Enum):
    auto = "auto"
    cpu = "cpu"
    cuda = "cuda"
    gcu = "gcu"


class OptimizerName(Enum):
    """The optimizer class (sd_lora/optim.py builds it; the packages an option needs are extras in pyproject.toml)."""

    adamw = "adamw"  # torch.optim.AdamW
    adamw8bit = "adamw8bit"  # bitsandbytes' AdamW8bit (8-bit moments; CUDA only; pip install -e ".[adamw8bit]")
    prodigy = "prodigy"  # prodigyopt's Prodigy: estimates its own step size; lr is a multiplier of it, keep ~1.0
    adafactor = "adafactor"  # transformers' Adafactor: factored second moment; relative step off by default
    lion = "lion"  # lion-pytorch's Lion: sign updates; lr 3-10x below AdamW's, weight decay as much above


class LrScheduler(Enum):
    """Names understood by `diffusers.optimization.get_scheduler` (each after its linear warm-up, if any)."""

    linear = "linear"  # linear decay to 0
    cosine = "cosine"  # half a cosine down to 0
    cosine_with_restarts = "cosine_with_restarts"  # optimizer.lr_num_cycles cosines, each restarting at lr
    polynomial = "polynomial"  # (1 - progress) ** optimizer.lr_power, down to 1e-7
    constant = "constant"  # lr throughout (no warm-up: use constant_with_warmup)
    constant_with_warmup = "constant_with_warmup"  # warm-up, then lr


class LoraInit(Enum):
    """How peft initialises the LoRA matrices (`model.lora.init_lora_weights`)."""

    gaussian = "gaussian"  # A ~ N(0, 1/rank), B = 0: starts as the base model (diffusers' choice)
    kaiming = "kaiming"  # A Kaiming-uniform, B = 0 (peft's default)
    pissa = "pissa"  # A, B from the frozen weight's principal singular vectors (the weight keeps the residual)
    olora = "olora"  # A, B from a QR decomposition of the frozen weight (the weight keeps the residual)


class LoraFormat(Enum):
    """A LoRA file layout written beside the diffusers one (sd_lora/export.py)."""

    kohya = "kohya"  # lora_unet_*.lora_down/lora_up/alpha: ComfyUI, AUTOMATIC1111/Forge, kohya's tools


class OnFailure(Enum):
    """What the run does with a bad sample (`dataset.on_bad_image`) or step (`trainer.on_nonfinite_loss`)."""

    error = "error"  # stop with one message naming the row / step and the likely fix
    skip = "skip"  # leave it out, log it and count it in report.json


class Alpha(Enum):
    """What a transparent image (RGBA, LA, a palette with transparency) trains on: the model sees no alpha."""

    white = "white"  # composited on white, as a viewer shows it
    black = "black"  # composited on black
    ignore = "ignore"  # alpha dropped: the colours of transparent pixels as stored (often hidden garbage)


class Tracker(Enum):
    """An experiment tracker that accelerate drives (`trainer.report_to`); each but tensorboard is an optional extra."""

    tensorboard = "tensorboard"  # <run dir>/tensorboard/ (installed with sd-lora); the only one that gets validation images
    wandb = "wandb"  # Weights & Biases (pip install -e ".[wandb]"); WANDB_* variables pick the account and mode
    mlflow = "mlflow"  # MLflow (".[mlflow]"); MLFLOW_TRACKING_URI picks the server, else files under <run dir>/tensorboard
    aim = "aim"  # Aim (".[aim]"); its repository under <run dir>/tensorboard
    comet_ml = "comet_ml"  # Comet (".[comet]"); COMET_* variables pick the account


def _check(ok: bool, key: str, value, fix: str) -> None:
    if not ok:
        raise UserError(f"{key}={value!r} is invalid: {fix}")


@dataclass
class LoraSettings:
    rank: int = 4  # LoRA rank r (peft `r`)
    alpha: Optional[float] = None  # LoRA alpha (peft `lora_alpha`); null = rank, i.e. scale 1
    dropout: float = 0.0  # dropout on the LoRA branch input
    target_modules: List[str] = field(
        default_factory=lambda: ["to_k", "to_q", "to_v", "to_out.0"]
    )  # U-Net module names (suffixes) that get a LoRA adapter
    init_lora_weights: LoraInit = LoraInit.gaussian  # peft init; pissa/olora move part of the frozen weight into the LoRA, and the saved file is converted to a plain LoRA of rank 2 x rank that loads on the unchanged base
    use_dora: bool = False  # peft's DoRA: a learned magnitude per output channel besides the LoRA direction (diffusers loads it; no kohya file)
    init_from: Optional[str] = None  # start from this LoRA (a file in diffusers' or kohya's layout, or a run dir); its rank, alpha and modules must be the configured ones
    train_text_encoder: bool = False  # LoRA on the text encoder(s) too (trained with optimizer.text_encoder_lr)
    text_encoder_rank: Optional[int] = None  # the text encoder LoRA's rank; null = rank
    text_encoder_alpha: Optional[float] = None  # the text encoder LoRA's alpha; null = alpha (null there: its rank)
    text_encoder_target_modules: List[str] = field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "out_proj"]
    )  # text encoder module names (suffixes) that get a LoRA adapter (diffusers' DreamBooth LoRA scripts' choice)
    fused_matmul: bool = False  # the U-Net's LoRA projections as one matmul against W + s·B·A merged each step, with their own backward (sd_lora/fused_lora.py): fewer kernels, same parameters and files; perf=throughput sets it. Where a layer does not qualify (dropout, DoRA, model.base_precision=fp8) it keeps peft's path, and the log says why; the text encoder's LoRA keeps peft's path

    def __post_init__(self):
        _check(self.rank >= 1, "model.lora.rank", self.rank, "use a positive integer such as 4")
        _check(
            self.alpha is None or self.alpha > 0,
            "model.lora.alpha",
            self.alpha,
            "use a positive number, or null for alpha = rank",
        )
        _check(0.0 <= self.dropout < 1.0, "model.lora.dropout", self.dropout, "use 0 <= dropout < 1")
        _check(not (self.use_dora and self.init_lora_weights in (LoraInit.pissa, LoraInit.olora)),
               "model.lora.init_lora_weights", self.init_lora_weights.value,
               "DoRA is trained from gaussian or kaiming here: use one of them, or model.lora.use_dora=false")
        _check(not (self.train_text_encoder and (self.use_dora or self.init_lora_weights in (LoraInit.pissa,
                                                                                               LoraInit.olora))),
               "model.lora.train_text_encoder", self.train_text_encoder,
               "the text encoder's LoRA is a plain LoRA (gaussian or kaiming start) here: leave use_dora and "
               "pissa/olora out, or train the U-Net's LoRA alone")
        _check(not (self.init_from and self.init_lora_weights in (LoraInit.pissa, LoraInit.olora)),
               "model.lora.init_lora_weights", self.init_lora_weights.value,
               "model.lora.init_from gives the LoRA's start, which pissa/olora would compute from the frozen weight: "
               "use gaussian, or leave init_from out")
        _check(
            len(self.target_modules) > 0,
            "model.lora.target_modules",
            self.target_modules,
            "name at least one module, e.g. [to_q,to_k,to_v,to_out.0]",
        )

        _check(self.text_encoder_rank is None or self.text_encoder_rank >= 1, "model.lora.text_encoder_rank",
               self.text_encoder_rank, "use a positive integer, or null for model.lora.rank")
        _check(self.text_encoder_alpha is None or self.text_encoder_alpha > 0, "model.lora.text_encoder_alpha",
               self.text_encoder_alpha, "use a positive number, or null for model.lora.alpha")
        _check(len(self.text_encoder_target_modules) > 0, "model.lora.text_encoder_target_modules",
               self.text_encoder_target_modules, "name at least one module, e.g. [q_proj,k_proj,v_proj,out_proj]")

    @property
    def lora_alpha(self) -> float:
        return float(self.rank if self.alpha is None else self.alpha)

    @property
    def text_rank(self) -> int:
        return self.text_encoder_rank or self.rank

    @property
    def text_lora_alpha(self) -> float:
        alpha = self.text_encoder_alpha if self.text_encoder_alpha is not None else self.alpha
        return float(self.text_rank if alpha is None else alpha)


@dataclass
class ModelConfig:
    pretrained_model_name_or_path: str = MISSING  # diffusers pipeline folder, or a hub id read from the local cache
    family: ModelFamilyName = ModelFamilyName.sd  # sd = SD 1.x/2.x (sd_lora/families/)
    source_repo: Optional[str] = None  # hub id the folder is a copy of: named in the download hint
    revision: Optional[str] = None  # hub revision (hub ids only)
    variant: Optional[str] = None  # weight file variant, e.g. fp16
    vae_path: Optional[str] = None  # another VAE (diffusers folder), e.g. SDXL's fp16-fixed one; null = the pipeline's (SDXL's kept fp32)
    prediction_type: Optional[PredictionType] = None  # null = the scheduler config's
    attention: Attention = Attention.sdp  # U-Net attention backend, kept through LoRA injection
    sdp_kernel: SdpKernel = SdpKernel.auto  # attention=sdp: the kernel tried first (torch.nn.attention.sdpa_kernel)
    base_precision: Optional[BasePrecision] = None  # fp8: the U-Net's frozen Linear weights in float8, their matmuls too (CUDA compute capability >= 8.9, or the CPU); null = in the precision's dtype
    lora: LoraSettings = field(default_factory=LoraSettings)

    def __post_init__(self):
        _check(self.sdp_kernel is SdpKernel.auto or self.attention is Attention.sdp, "model.sdp_kernel",
               self.sdp_kernel.value, f"it picks a kernel of attention=sdp, but model.attention={self.attention.value}: "
               "set model.attention=sdp or model.sdp_kernel=auto")
        _check(not (self.base_precision is BasePrecision.fp8 and self.lora.use_dora), "model.base_precision", "fp8",
               "DoRA reads the frozen weight itself (its norm per output channel), which fp8 keeps scaled in float8: "
               "set model.base_precision=null, or model.lora.use_dora=false")


@dataclass
class DatasetConfig:
    path: str = MISSING  # hub-layout folder (parquet/images), imagefolder with metadata.jsonl, save_to_disk folder, or a cached hub id
    source_repo: Optional[str] = None  # hub id the folder is a copy of: named in the download hint
    missing_hint: Optional[str] = None  # said when the folder is missing, in place of a download command (a withdrawn source)
    split: str = "train"  # split to train on
    image_column: str = "image"
    caption_column: str = "text"
    resolution: int = 512  # training images are resized and cropped to resolution x resolution, px
    center_crop: bool = False  # centre crop (else random crop)
    random_flip: bool = False  # random horizontal flip with p=0.5
    max_train_samples: Optional[int] = None  # keep only the first N samples (after a seeded shuffle)
    num_workers: int = 0  # DataLoader worker processes
    validation_split: float = 0.0  # fraction of the split held out for the validation loss (never trained on)
    validation_source: Optional[str] = None  # or: a split of the same data set to validate on, e.g. test
    max_validation_samples: Optional[int] = None  # keep only the first N held-out samples
    drop_last: bool = False  # drop each epoch's last, smaller batch (keeps shapes static under torch.compile)
    cache: bool = False  # encode every image (and its mirror image) and caption once; the VAE and text encoder then leave the accelerator
    cache_dir: Optional[str] = None  # where caches are kept; null = $SD_LORA_CACHE/embeddings
    on_bad_image: OnFailure = OnFailure.error  # an image that cannot be decoded: error, or skip (the next good row takes its place)
    alpha: Alpha = Alpha.white  # transparent images: composited on white, on black, or ignore (alpha dropped)
    buckets: bool = False  # aspect-ratio buckets: each image resized to the bucket (about resolution² px) nearest its aspect ratio, cropped only by the rounding; each batch one bucket
    bucket_step: int = 64  # buckets: their edges are multiples of this, px
    bucket_min_edge: Optional[int] = None  # buckets: the shortest edge, px; null = half the resolution
    bucket_max_edge: Optional[int] = None  # buckets: the longest edge, px; null = twice the resolution
    caption_files: bool = False  # path is a folder of images, each with its caption in a text file beside it (kohya's layout: a.png + a.txt)
    caption_extension: str = ".txt"  # caption_files: the caption file's suffix
    caption_dropout: float = 0.0  # probability that a sample trains with the empty caption (for classifier-free guidance)
    shuffle_tags: bool = False  # shuffle a caption's comma-separated tags anew for each sample and epoch
    keep_tags: int = 0  # shuffle_tags: the first N tags stay in place (kohya's keep_tokens)

    def __post_init__(self):
        _check(
            self.resolution >= 8 and self.resolution % 8 == 0,
            "dataset.resolution",
            self.resolution,
            "the VAE downsamples by 8; use a multiple of 8 such as 512 or 768",
        )
        _check(
            self.max_train_samples is None or self.max_train_samples >= 1,
            "dataset.max_train_samples",
            self.max_train_samples,
            "use a positive integer or null for all samples",
        )
        _check(self.num_workers >= 0, "dataset.num_workers", self.num_workers, "use 0 or more")
        _check(0.0 <= self.validation_split < 1.0, "dataset.validation_split", self.validation_split,
               "use a fraction in [0, 1), e.g. 0.1")
        _check(not (self.validation_split and self.validation_source), "dataset.validation_source",
               self.validation_source, "give either dataset.validation_split or dataset.validation_source, not both")
        _check(0.0 <= self.caption_dropout < 1.0, "dataset.caption_dropout", self.caption_dropout,
               "use a probability in [0, 1), e.g. 0.1")
        _check(self.keep_tags >= 0, "dataset.keep_tags", self.keep_tags, "use 0 or more")
        _check(not (self.shuffle_tags and self.cache), "dataset.shuffle_tags", self.shuffle_tags,
               "a shuffled caption differs every epoch, and the embedding cache holds one text embedding per row: "
               "set dataset.cache=false to shuffle tags, or dataset.shuffle_tags=false to cache")
        if self.buckets:
            _check(self.bucket_step >= 8 and self.bucket_step % 8 == 0, "dataset.bucket_step", self.bucket_step,
                   "the VAE downsamples by 8; use a multiple of 8 such as 64")
            lo, hi = self.bucket_edges()
            _check(lo <= self.resolution <= hi and lo >= self.bucket_step, "dataset.bucket_min_edge",
                   self.bucket_min_edge, f"with dataset.bucket_max_edge={self.bucket_max_edge} the edges must "
                   f"enclose dataset.resolution={self.resolution} and be at least dataset.bucket_step={self.bucket_step}")
            _check(not self.cache or self.center_crop, "dataset.center_crop", self.center_crop, "the embedding "
                   "cache keeps one crop of each image, so with dataset.buckets it needs the centred one: set "
                   "dataset.center_crop=true, or dataset.cache=false")
        _check(self.caption_extension.startswith(".") and len(self.caption_extension) > 1, "dataset.caption_extension",
               self.caption_extension, "give a file suffix with its dot, e.g. .txt or .caption")

    def bucket_edges(self) -> tuple[int, int]:
        """(shortest, longest) bucket edge in px, the defaults worked out and rounded to bucket_step."""
        step = self.bucket_step
        lo = self.bucket_min_edge if self.bucket_min_edge is not None else max(step, self.resolution // 2 // step * step)
        hi = self.bucket_max_edge if self.bucket_max_edge is not None else 2 * self.resolution // step * step
        return lo, hi


@dataclass
class ProdigySettings:
    """optimizer=prodigy only (prodigyopt.Prodigy's own keys)."""

    d_coef: float = 1.0  # multiplies the step size Prodigy estimates (>1 bolder, <1 more careful)
    use_bias_correction: bool = False  # Adam-style bias correction of the estimate (kohya's SD recipes turn it on)
    safeguard_warmup: bool = False  # keep the lr warm-up out of the estimate (advised with a warm-up)
    decouple: bool = True  # AdamW-style decoupled weight decay

    def __post_init__(self):
        _check(self.d_coef > 0, "optimizer.prodigy.d_coef", self.d_coef, "use a positive factor such as 1.0")


@dataclass
class AdafactorSettings:
    """optimizer=adafactor only (transformers' Adafactor's own keys; optimizer.betas and eps are not used)."""

    relative_step: bool = False  # Adafactor's own time-dependent step size instead of optimizer.lr (then lr_scheduler=constant)
    scale_parameter: bool = False  # scale each step by the parameter's RMS
    warmup_init: bool = False  # relative_step=true only: Adafactor's own warm-up
    clip_threshold: float = 1.0  # clip the update's RMS at this
    decay_rate: float = -0.8  # exponent of the second-moment decay rate
    beta1: Optional[float] = None  # first-moment decay; null = no first moment (Adafactor's memory saving)

    def __post_init__(self):
        _check(self.beta1 is None or 0.0 <= self.beta1 < 1.0, "optimizer.adafactor.beta1", self.beta1,
               "use a number in [0, 1) or null")
        _check(not self.warmup_init or self.relative_step, "optimizer.adafactor.warmup_init", self.warmup_init,
               "it is the warm-up of Adafactor's relative step: set optimizer.adafactor.relative_step=true too, or "
               "warm up with optimizer.lr_warmup_steps")


@dataclass
class OptimizerConfig:
    name: OptimizerName = OptimizerName.adamw  # the optimizer class: adamw, adamw8bit, prodigy, adafactor, lion
    lr: float = 1e-4  # peak learning rate (prodigy: a multiplier of its own estimate, keep ~1.0)
    scale_lr: bool = False  # multiply lr by batch size x accumulation x processes (diffusers' --scale_lr)
    betas: List[float] = field(default_factory=lambda: [0.9, 0.999])  # adamw, adamw8bit, prodigy, lion
    weight_decay: float = 1e-2  # decoupled weight decay
    eps: float = 1e-8  # adamw, adamw8bit, prodigy
    lr_scheduler: LrScheduler = LrScheduler.constant
    lr_warmup_steps: int = 0  # optimizer steps of linear warm-up
    lr_warmup_fraction: Optional[float] = None  # or: warm-up as this fraction of the run's optimizer steps
    lr_num_cycles: int = 1  # cosine_with_restarts: the number of cosine cycles
    lr_power: float = 1.0  # polynomial: the decay's power (1 = linear)
    max_grad_norm: Optional[float] = 1.0  # clip the LoRA gradients' global norm; null = no clipping
    fused: Optional[bool] = None  # adamw: fused AdamW kernel; null = where the device supports it
    text_encoder_lr: Optional[float] = None  # model.lora.train_text_encoder: the text encoder LoRA's lr; null = lr
    prodigy: ProdigySettings = field(default_factory=ProdigySettings)
    adafactor: AdafactorSettings = field(default_factory=AdafactorSettings)

    def __post_init__(self):
        # every number the optimizer computes with is finite: inf or NaN here would reach every LoRA weight
        _check(math.isfinite(self.lr) and self.lr > 0, "optimizer.lr", self.lr,
               "use a positive, finite learning rate such as 1e-4")
        _check(self.text_encoder_lr is None or (math.isfinite(self.text_encoder_lr) and self.text_encoder_lr > 0),
               "optimizer.text_encoder_lr", self.text_encoder_lr,
               "use a positive, finite learning rate such as 5e-5, or null for optimizer.lr")
        _check(
            len(self.betas) == 2 and all(0.0 <= b < 1.0 for b in self.betas),
            "optimizer.betas",
            list(self.betas),
            "give two numbers in [0, 1), e.g. [0.9,0.999]",
        )
        _check(math.isfinite(self.weight_decay) and self.weight_decay >= 0, "optimizer.weight_decay",
               self.weight_decay, "use a finite number, 0 or more")
        _check(math.isfinite(self.eps) and self.eps > 0, "optimizer.eps", self.eps,
               "use a small positive number such as 1e-8")
        _check(self.lr_warmup_steps >= 0, "optimizer.lr_warmup_steps", self.lr_warmup_steps, "use 0 or more")
        _check(self.lr_warmup_fraction is None or 0.0 <= self.lr_warmup_fraction < 1.0, "optimizer.lr_warmup_fraction",
               self.lr_warmup_fraction, "use a fraction in [0, 1) of the run's steps, e.g. 0.05, or null")
        _check(self.lr_warmup_fraction is None or self.lr_warmup_steps == 0, "optimizer.lr_warmup_fraction",
               self.lr_warmup_fraction, f"optimizer.lr_warmup_steps={self.lr_warmup_steps} gives the warm-up too; "
               "give one of them (the other 0 / null)")
        warms_up = self.lr_warmup_steps > 0 or bool(self.lr_warmup_fraction)
        _check(not (warms_up and self.lr_scheduler is LrScheduler.constant), "optimizer.lr_scheduler",
               self.lr_scheduler.value, "constant has no warm-up (diffusers ignores it): use "
               "optimizer.lr_scheduler=constant_with_warmup, or no warm-up")
        _check(self.lr_num_cycles >= 1, "optimizer.lr_num_cycles", self.lr_num_cycles, "use 1 or more")
        _check(self.lr_power > 0, "optimizer.lr_power", self.lr_power, "use a positive power such as 1.0")
        _check(
            self.max_grad_norm is None or (math.isfinite(self.max_grad_norm) and self.max_grad_norm > 0),
            "optimizer.max_grad_norm",
            self.max_grad_norm,
            "use a positive, finite norm, or null to turn clipping off",
        )
        _check(not self.fused or self.name is OptimizerName.adamw, "optimizer.fused", self.fused,
               f"only adamw has a fused kernel here, and optimizer.name={self.name.value}: set optimizer.fused=null")
        _check(not (self.scale_lr and self.name is OptimizerName.prodigy), "optimizer.scale_lr", self.scale_lr,
               "Prodigy's lr multiplies the step size it estimates itself (keep it ~1.0), so it is not scaled by "
               "the batch size: set optimizer.scale_lr=false")
        _check(not (self.name is OptimizerName.prodigy and self.text_encoder_lr is not None
                    and self.text_encoder_lr != self.lr), "optimizer.text_encoder_lr", self.text_encoder_lr,
               "Prodigy takes one lr for every parameter group (it raises at the first step otherwise): set "
               "optimizer.text_encoder_lr=null")
        relative = self.name is OptimizerName.adafactor and self.adafactor.relative_step
        _check(not relative or (self.lr_scheduler is LrScheduler.constant and not warms_up),
               "optimizer.adafactor.relative_step", True, "Adafactor then sets its own step size, which no lr "
               "schedule scales: set optimizer.lr_scheduler=constant without warm-up, or relative_step=false")


@dataclass
class PrecisionConfig:
    mixed_precision: MixedPrecision = MixedPrecision.no  # autocast dtype; frozen weights are stored in it, LoRA weights stay fp32


@dataclass
class DeviceConfig:
    type: DeviceType = DeviceType.auto  # auto = cuda if present, else gcu if torch_gcu 2.x reports a device, else cpu
    num_processes: int = 1  # worker processes (one per accelerator) on all machines together, as accelerate counts them
    num_machines: int = 1  # machines taking part; each starts num_processes / num_machines workers
    machine_rank: int = 0  # this machine's rank, 0 .. num_machines-1 (torchrun's --node_rank)
    main_process_ip: Optional[str] = None  # address of machine 0 (torchrun's --master_addr); needed when num_machines > 1
    main_process_port: Optional[int] = None  # rendezvous port on machine 0; null = 29500 on several machines, any free port on one
    transfer_to_gcu: bool = True  # gcu only: turn on torch_gcu.transfer_to_gcu so accelerate's CUDA path drives the GCU

    def __post_init__(self):
        _check(self.num_processes >= 1, "device.num_processes", self.num_processes, "use 1 or more")
        _check(self.num_machines >= 1, "device.num_machines", self.num_machines, "use 1 or more")
        _check(0 <= self.machine_rank < self.num_machines, "device.machine_rank", self.machine_rank,
               f"use 0 .. device.num_machines-1 ({self.num_machines - 1})")


@dataclass
class TrainerConfig:
    train_batch_size: int = 1  # samples per process per forward pass
    num_train_epochs: int = 1  # ignored when max_train_steps is set
    max_train_steps: Optional[int] = None  # optimizer steps; null = num_train_epochs x steps per epoch
    gradient_accumulation_steps: int = 1
    gradient_checkpointing: bool = False  # recompute U-Net activations in backward: less memory, ~40% slower
    checkpointing_steps: Optional[int] = 500  # save a resumable checkpoint every N optimizer steps (and always at the end); null = only at the end
    checkpoints_total_limit: Optional[int] = None  # keep at most N checkpoints; null = all
    resume_from_checkpoint: Optional[str] = None  # "latest", "latest_valid" (the newest intact one, passing over damaged ones) or a checkpoint folder
    validation_prompts: List[str] = field(default_factory=list)  # prompts rendered to samples/ and tensorboard
    validation_epochs: int = 1  # render validation prompts every N epochs and at the end
    num_validation_images: int = 4  # images per validation prompt
    num_inference_steps: int = 30  # denoising steps for validation images
    report_to: List[Tracker] = field(default_factory=lambda: [Tracker.tensorboard])  # trackers that get loss, lr, throughput and the config: tensorboard, wandb, mlflow, aim, comet_ml ([] = none)
    export_formats: List[LoraFormat] = field(default_factory=lambda: [LoraFormat.kohya])  # LoRA layouts written beside lora/pytorch_lora_weights.safetensors (always written: generate and resume read it); kohya -> lora/<run dir name>.safetensors
    seed: int = 0  # seeds python, numpy, torch and every device generator
    skip_steps: int = 10  # optimizer steps left out of the report's timing (warm-up)
    profile_steps: int = 0  # torch.profiler over this many optimizer steps after skip_steps: <run dir>/profile/ (0 = off)
    snr_gamma: Optional[float] = None  # Min-SNR weighting gamma (5.0 is the paper's); null = plain MSE
    noise_offset: float = 0.0  # scale of per-channel offset noise; 0 = off
    log_every_n_steps: int = 1  # loss/lr/throughput to tensorboard and the progress bar every N steps
    validation_loss_steps: Optional[int] = None  # validation loss every N optimizer steps (and at the end); needs held-out data
    validation_loss_timesteps: int = 8  # fixed timesteps, spread over the schedule, per held-out sample
    validation_loss_seed: int = 0  # seeds the held-out split and the fixed noise; keep it equal across a sweep
    allow_tf32: bool = False  # TF32 matmuls on Ampere+ CUDA
    kernel_autotune: bool = False  # time the convolution algorithms on the first step and keep the fastest (CUDA: cudnn.benchmark); needs fixed shapes (dataset.drop_last)
    gc_every_n_steps: Optional[int] = None  # Python's garbage collector off in the loop, one collection every N steps on every process alike (null: Python's automatic collection)
    channels_last: bool = False  # U-Net and VAE weights and activations in NHWC memory format (faster convolutions on GPUs)
    compile: bool = False  # torch.compile the U-Net (through accelerate); its time is the report's compile_s (and is in first_step_s)
    compile_encoders: bool = False  # dataset.cache=false: also torch.compile the VAE encoder, which then runs every step
    compile_mode: Optional[str] = None  # torch.compile mode: null (default), reduce-overhead, max-autotune, max-autotune-no-cudagraphs, or auto (reduce-overhead on CUDA with dataset.cache and no gradient accumulation, else the default)
    compile_cache: Optional[str] = None  # file of torch's portable compile-cache artifacts: loaded before the first step, written (main process) after it and at the end when this run compiled something new; a relative path is read from the directory the run was started in; needs trainer.compile or compile_encoders (null = Inductor's own on-disk cache only, TORCHINDUCTOR_CACHE_DIR)
    compile_ddp_split: bool = False  # several processes, compiled U-Net: split its graph at DDP's gradient buckets so the all-reduce overlaps the backward (torch's DDPOptimizer); off: one graph, and the LoRA's gradients (a few MB) all-reduced after the backward
    ema: bool = False  # keep an exponential moving average of the LoRA weights: validated and saved in their place (checkpoints keep both)
    ema_decay: float = 0.9999  # the EMA's decay; it ramps up as (1+n)/(10+n) to this (diffusers' EMAModel)
    ema_start_step: int = 0  # optimizer steps before the EMA starts averaging (until then it copies the weights)
    on_nonfinite_loss: OnFailure = OnFailure.error  # NaN/Inf loss or gradient norm: error (stop; checkpoints stay good) or skip the optimizer step (one host sync per step)

    def __post_init__(self):
        for key in ("train_batch_size", "num_train_epochs", "gradient_accumulation_steps", "validation_epochs",
                    "num_inference_steps", "log_every_n_steps"):
            value = getattr(self, key)
            _check(value >= 1, f"trainer.{key}", value, "use a positive integer")
        _check(self.validation_loss_timesteps >= 1, "trainer.validation_loss_timesteps",
               self.validation_loss_timesteps, "use a positive integer such as 8")
        for key in ("max_train_steps", "checkpointing_steps", "checkpoints_total_limit", "validation_loss_steps",
                    "gc_every_n_steps"):
            value = getattr(self, key)
            _check(value is None or value >= 1, f"trainer.{key}", value, "use a positive integer or null")
        _check(self.num_validation_images >= 0, "trainer.num_validation_images", self.num_validation_images,
               "use 0 or more")
        _check(self.skip_steps >= 0, "trainer.skip_steps", self.skip_steps, "use 0 or more")
        _check(self.profile_steps >= 0, "trainer.profile_steps", self.profile_steps, "use 0 (off) or more")
        if self.profile_steps and self.max_train_steps is not None:  # one warm-up step precedes the profiled ones
            last = max(self.skip_steps, 1) + self.profile_steps
            _check(last <= self.max_train_steps, "trainer.profile_steps", self.profile_steps,
                   f"with trainer.skip_steps={self.skip_steps} it would profile up to optimizer step {last}, past "
                   f"trainer.max_train_steps={self.max_train_steps}; lower trainer.profile_steps or trainer.skip_steps")
        _check(self.snr_gamma is None or self.snr_gamma > 0, "trainer.snr_gamma", self.snr_gamma,
               "use a positive gamma such as 5.0, or null to turn Min-SNR weighting off")
        _check(self.noise_offset >= 0, "trainer.noise_offset", self.noise_offset, "use 0 or more")
        _check(0.0 < self.ema_decay < 1.0, "trainer.ema_decay", self.ema_decay, "use a decay in (0, 1), e.g. 0.9999")
        _check(self.ema_start_step >= 0, "trainer.ema_start_step", self.ema_start_step, "use 0 or more")
        modes = (None, "default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs", "auto")
        _check(self.compile_mode in modes, "trainer.compile_mode", self.compile_mode, f"use one of {list(modes)}")
        _check(self.compile_cache is None or self.compile_cache.strip() != "", "trainer.compile_cache",
               self.compile_cache, "give a file path, or null")
        _check(self.compile_cache is None or self.compile or self.compile_encoders, "trainer.compile_cache",
               self.compile_cache, "it holds compiled graphs and nothing is compiled: set trainer.compile=true "
               "(or trainer.compile_encoders=true), or trainer.compile_cache=null")


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    dataset: DatasetConfig = field(default_factory=DatasetConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    precision: PrecisionConfig = field(default_factory=PrecisionConfig)
    device: DeviceConfig = field(default_factory=DeviceConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)


def global_batch_size(cfg: Config, num_processes: int) -> int:
    """Samples one optimizer step consumes: batch x processes x accumulation (the README's batch rule)."""
    return cfg.trainer.train_batch_size * num_processes * cfg.trainer.gradient_accumulation_steps


def register_configs() -> None:
    """Register the schemas in Hydra's ConfigStore; YAML options extend `base_<group>`."""
    cs = ConfigStore.instance()
    cs.store(name="base_config", node=Config)
    for group, node in (
        ("model", ModelConfig),
        ("dataset", DatasetConfig),
        ("optimizer", OptimizerConfig),
        ("precision", PrecisionConfig),
        ("device", DeviceConfig),
        ("trainer", TrainerConfig),
    ):
        cs.store(group=group, name=f"base_{group}", node=node)


def cache_dir() -> Path:
    """Where built-in artefacts (the tiny model) are kept: $SD_LORA_CACHE or ~/.cache/sd_lora."""
    return Path(os.environ.get("SD_LORA_CACHE") or Path.home() / ".cache" / "sd_lora")


def _tiny_model_resolver(layout: str = "sd21") -> str:
    from sd_lora.demo import ensure_tiny_model  # imports torch: only when the tiny model is asked for

    return str(ensure_tiny_model(cache_dir(), layout or "sd21"))


def _asset_resolver(name: str) -> str:
    return str(Path(__file__).parent / "assets" / name)


def register_resolvers() -> None:
    """`${sd_lora.tiny_model:}` (`${sd_lora.tiny_model:sd15}`, `${sd_lora.tiny_model:sdxl}`) builds (once) and returns the tiny pipeline folder; `${sd_lora.asset:x}` a bundled
    file. (`${sd_lora.job_name:}`, a sweep job's folder name, is registered by sd_lora.sweep, which launch.py
    imports: the config sits below the sweep machinery and does not import it.)"""
    OmegaConf.register_new_resolver("sd_lora.tiny_model", _tiny_model_resolver, replace=True)
    OmegaConf.register_new_resolver("sd_lora.asset", _asset_resolver, replace=True)


def model_config_from(saved: dict) -> ModelConfig:
    """The model section of a run config saved as JSON (a LoRA file's `sd_lora_config`) as a typed ModelConfig;
    keys added since that run take their defaults."""
    return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(ModelConfig), saved["model"]))


def to_config(cfg) -> Config:
    """DictConfig composed by Hydra -> validated `Config` (runs every check above)."""
    from omegaconf.errors import MissingMandatoryValue

    if isinstance(cfg, Config):
        return cfg
    try:
        return OmegaConf.to_object(cfg)
    except MissingMandatoryValue as exc:
        key = exc.full_key or "a required key"
        raise UserError(f"{key} has no value (???): give it on the command line, e.g. {key}=...") from None


register_configs()
register_resolvers()

