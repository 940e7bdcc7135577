"""The typed configuration of a ratpt run: schema, YAML + dotlist loading, and validation.

Defaults are the paper's RAT-1.3B recipe (100B tokens, AdamW 8e-4, cosine, 5% warmup, global
batch 512 × 4096, clip 1.0, bf16). YAML files under configs/ state only what differs.
Loading goes through omegaconf's structured configs, so an unknown key or a value of the wrong
type is rejected before anything runs; nothing in a config string is ever evaluated.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import yaml
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from ratpt.data.config import DataConfig
from ratpt.model.config import ModelConfig, validate_model_config

COMPILE_BACKENDS = ("inductor", "aot_eager")


class ConfigError(ValueError):
    """A configuration that cannot run; the message names the key and the fix."""


@dataclass
class TrainConfig:
    steps: int = 47684  # optimizer steps (47684 × 512 × 4096 ≈ 100B tokens)
    global_batch: int = 512  # sequences per optimizer step, over all data-parallel ranks
    micro_batch: int = 4  # sequences per forward/backward on one rank; the rest is accumulation
    precision: str = "auto"  # auto (bf16 autocast on CUDA, fp32 on CPU) | bf16 | fp32
    device: str = "auto"  # auto (cuda if available) | cpu | cuda
    activation_checkpointing: bool = False  # recompute each block in backward to save memory
    compile: str = "auto"  # torch.compile each block and the loss: auto (on CUDA) | true | false
    compile_backend: str = "inductor"  # inductor | aot_eager (traced but not code-generated: tells a compiler
    #                                    bug from a model bug, and compiles in seconds)
    compile_tuning: bool = False  # inductor times block sizes for each kernel it generates (coordinate descent):
    #                               ~1.5% faster compiled FP8 steps of RAT-1.3B for ~2 more minutes of compile
    fused_loss: bool = True  # head + loss chunk by chunk (ratpt.ops.linear_cross_entropy): no [tokens, vocab] logits
    seed: int = 0  # parameter init and any sampling; the data order has its own seed
    max_bad_steps: int = 5  # stop after this many consecutive non-finite steps (each is skipped)
    engine: str = "megatron"  # megatron (one process: plain PyTorch) | deepspeed (ZeRO, see `deepspeed`)
    fp8: str = "off"  # FP8 GEMMs in the blocks' projections (torchao float8, dynamic scaling; weights stay high
    #                   precision): off | tensorwise | rowwise. Needs a GPU of compute capability 8.9+ (rowwise: 9.0+)
    fp8_emulate: bool = False  # with train.fp8: cast to FP8 as on the GPU but multiply in fp32 (torchao's emulation),
    #                            so any device runs it, the CPU included; for tests, never faster


FP8_RECIPES = ("tensorwise", "rowwise")  # torchao's Float8LinearRecipeName values that train.fp8 selects
FP8_OFF = ("off", "false")  # YAML reads a bare `off` as false, which arrives as "False": compared lowercased
COMPILE_CHOICES = ("auto", "true", "false")  # YAML's true/false arrive as "True"/"False": compared lowercased


def compiles(train: TrainConfig, device_type: str) -> bool:
    """Whether train.compile asks for torch.compile on `device_type`: auto compiles on CUDA only (on
    the CPU, inductor's code generation costs more than the step saves on small models)."""
    choice = train.compile.lower()
    return choice == "true" or (choice == "auto" and device_type == "cuda")


def fp8_recipe(train: TrainConfig) -> Optional[str]:
    """The torchao float8 recipe that train.fp8 names (tensorwise | rowwise), or None when it is off."""
    choice = train.fp8.lower()
    return None if choice in FP8_OFF else choice


def micro_batches_per_step(train: TrainConfig, dp_size: int) -> int:
    """Micro-batches each data-parallel rank runs per optimizer step (validate_config checks it divides)."""
    return train.global_batch // (train.micro_batch * dp_size)


@dataclass
class OptimizerConfig:
    lr: float = 8e-4  # peak learning rate
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])  # AdamW (beta1, beta2)
    eps: float = 1e-8  # AdamW epsilon
    weight_decay: float = 0.1  # decoupled decay, applied to matrices only (not norms, gates, biases)
    grad_clip: float = 1.0  # max global grad norm; 0 disables clipping


@dataclass
class ScheduleConfig:
    kind: str = "cosine"  # cosine | wsd (warmup-stable-decay) | constant (after warmup)
    warmup_fraction: float = 0.05  # share of steps with linear warmup from 0
    min_lr_ratio: float = 0.1  # final lr as a fraction of the peak (cosine, wsd)
    decay_fraction: float = 0.2  # wsd: share of steps at the end spent decaying


@dataclass
class PasskeyConfig:
    lengths: list[int] = field(default_factory=list)  # prompt lengths (tokens) of passkey retrieval at every
    #                                                  evaluation, e.g. [4096, 32768]; [] = none
    depths: list[float] = field(default_factory=lambda: [0.0, 0.5, 1.0])  # where the key hides (0: first, 1: last)
    trials: int = 2  # random keys per (length, depth): the same keys at every evaluation (`evaluate-long --seed 0`)
    piece: int = 8192  # prompt tokens prefilled at a time (a multiple of model.chunk_size): bounds the memory


@dataclass
class EvalConfig:
    interval: int = 1000  # steps between evaluations (validation loss, and the tasks and passkey below); 0 disables
    max_samples: int = 512  # validation sequences per pass (over all ranks)
    tasks: list[str] = field(default_factory=list)  # lm-evaluation-harness tasks scored at every evaluation on
    #                                                 rank 0, e.g. [hellaswag, arc_easy]; [] = none
    task_limit: int = 200  # documents per task (0: all of them)
    task_batch_size: int = 8  # sequences per forward while scoring the tasks
    task_num_fewshot: Optional[int] = None  # few-shot examples per prompt (null: each task's own)
    task_include_path: str = ""  # a folder of task YAML files of your own (their data local: no download)
    passkey: PasskeyConfig = field(default_factory=PasskeyConfig)  # passkey retrieval accuracy (no download)


@dataclass
class CheckpointConfig:
    interval: int = 1000  # steps between checkpoints (one is always written at the end); 0 = end only
    keep: int = 3  # newest complete checkpoints kept on disk
    resume: str = "auto"  # auto (newest complete checkpoint in the run, if any) | never | a checkpoint path
    format: str = "gathered"  # gathered (rank 0 writes all) | distributed (every rank its own shards; megatron engine)
    async_save: bool = False  # distributed only: shards are written in the background while training goes on
    init_from: str = ""  # a checkpoint (or run folder: its newest) whose model weights start this run, with a new
    #                      optimizer, schedule and data position (e.g. a 4K run extended to 128K); once this run
    #                      has checkpoints of its own it resumes those


@dataclass
class LoggingConfig:
    interval: int = 10  # steps between console lines / TensorBoard points
    tensorboard: bool = True  # write TensorBoard events under <out_dir>/tensorboard
    peak_tflops: float = 0.0  # per-device peak for MFU; 0 = look up the GPU (H100/H200/A100), none on CPU


@dataclass
class ParallelConfig:
    tensor: int = 1  # tensor-parallel ranks (Megatron TP + sequence parallelism); divide the heads, FFN width and vocab
    pipeline: int = 1  # pipeline stages (layers split by FLOPs; 1F1B schedule)
    virtual_stages: int = 1  # model chunks per pipeline rank; > 1 selects the interleaved 1F1B schedule
    context: int = 1  # context-parallel ranks: each holds whole chunks of every sequence, cut by context_layout
    context_layout: str = "zigzag"  # zigzag (2·CP blocks, rank r holds r and 2·CP−1−r: equal work) | contiguous
    distributed_optimizer: bool = True  # shard the optimizer state over data-parallel ranks (ZeRO-1)
    overlap_communication: bool = True  # on GPU: gradient reduce-scatter during backward, parameter all-gather
    #                                     during the next forward (megatron DDP; DeepSpeed overlap_comm)
    bucket_size: int = 0  # parameters per gradient-reduction bucket when overlapping; 0: megatron's default
    # data parallelism takes the remaining ranks: world size / (tensor × pipeline × context)


@dataclass
class DeepSpeedConfig:
    zero_stage: int = 1  # ZeRO stage: 1 shards optimizer state, 2 also gradients, 3 also parameters
    offload_optimizer: bool = False  # keep optimizer state in CPU memory and step it there (CPU Adam on GPU)
    offload_params: bool = False  # stage 3 only: keep parameters in CPU memory between uses
    extra: dict[str, Any] = field(default_factory=dict)  # more DeepSpeed JSON keys, merged over the generated ones


# DeepSpeed JSON keys that the ratpt config sets (ratpt.engines.deepspeed_config) -> the ratpt key to use
DEEPSPEED_OWNED = {
    "train_batch_size": "train.global_batch",
    "train_micro_batch_size_per_gpu": "train.micro_batch",
    "gradient_accumulation_steps": "train.global_batch and train.micro_batch",
    "gradient_clipping": "optimizer.grad_clip",
    "optimizer.type": "(AdamW, as every ratpt engine)",
    "optimizer.params.lr": "optimizer.lr (and schedule.*)",
    "optimizer.params.betas": "optimizer.betas",
    "optimizer.params.eps": "optimizer.eps",
    "optimizer.params.weight_decay": "optimizer.weight_decay",
    "scheduler": "schedule.*",
    "fp16": "train.precision",
    "bf16.enabled": "train.precision",
    "zero_optimization.stage": "deepspeed.zero_stage",
    "zero_optimization.offload_optimizer.device": "deepspeed.offload_optimizer",
    "zero_optimization.offload_param.device": "deepspeed.offload_params",
    "zero_optimization.overlap_comm": "parallel.overlap_communication",
}


@dataclass
class Config:
    name: str = "rat_1p3b"  # run name
    out_dir: str = "runs/${name}"  # checkpoints, TensorBoard events and the resolved config go here
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)  # used when train.engine=deepspeed


def load_config(path: Optional[str | Path] = None, overrides: Optional[list[str]] = None) -> Config:
    """Schema defaults ← YAML file ← `key=value` overrides, then type- and combination-checked."""
    schema = OmegaConf.structured(Config)
    try:
        layers = [schema]
        if path is not None:
            path = Path(path)
            if not path.is_file():
                raise ConfigError(f"config file {path} does not exist (configs/ lists the shipped ones)")
            layers.append(_read_yaml(path))
        for item in overrides or []:
            if "=" not in item:
                raise ConfigError(f"override {item!r} is not of the form key=value (e.g. train.steps=100)")
        layers.append(OmegaConf.from_dotlist(list(overrides or [])))
        merged = OmegaConf.merge(*layers)
        cfg: Config = OmegaConf.to_object(merged)
    except OmegaConfBaseException as err:
        raise ConfigError(_explain(err, path)) from None
    except TypeError as err:  # OmegaConf's merge of a list into a section, e.g. a file that is a YAML list
        raise ConfigError(f"{path or 'the overrides'}: {err}: the config is a mapping of sections "
                          "(train:, model:, ...); overrides are key=value") from None
    validate_config(cfg)
    return cfg


def _read_yaml(path: Path):
    try:
        return OmegaConf.load(path)
    except yaml.YAMLError as err:
        raise ConfigError(f"config file {path} is not valid YAML: {' '.join(str(err).split())}") from None


def _explain(err: OmegaConfBaseException, path: Optional[Path]) -> str:
    key = getattr(err, "full_key", None) or "?"
    source = f"{path} or the overrides" if path is not None else "the overrides"
    reason = str(err).splitlines()[0]
    return f"config key '{key}' (from {source}): {reason} (every key is listed in ratpt/config.py)"


def to_yaml(cfg: Config) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def validate_config(cfg: Config, dp_size: int = 1) -> None:
    """Reject combinations that cannot run, naming the keys involved and how to fix them."""
    try:
        validate_model_config(cfg.model)
    except ValueError as err:
        raise ConfigError(str(err)) from None
    t, d, o, s = cfg.train, cfg.data, cfg.optimizer, cfg.schedule
    _require(t.steps > 0, f"train.steps must be positive, got {t.steps}")
    _require(t.micro_batch > 0, f"train.micro_batch must be positive, got {t.micro_batch}")
    per_step = t.micro_batch * dp_size
    _require(
        t.global_batch > 0 and t.global_batch % per_step == 0,
        f"train.global_batch ({t.global_batch}) must be a positive multiple of train.micro_batch "
        f"({t.micro_batch}) × data-parallel size ({dp_size}) = {per_step}",
    )
    _require(t.precision in ("auto", "bf16", "fp32"), f"train.precision must be auto|bf16|fp32, got {t.precision!r}")
    _require(t.device in ("auto", "cpu", "cuda"), f"train.device must be auto|cpu|cuda, got {t.device!r}")
    _require(t.compile.lower() in COMPILE_CHOICES, f"train.compile must be auto|true|false, got {t.compile!r}")
    _require(t.compile_backend in COMPILE_BACKENDS,
             f"train.compile_backend must be {'|'.join(COMPILE_BACKENDS)}, got {t.compile_backend!r}")
    _require(not t.compile_tuning or (t.compile.lower() != "false" and t.compile_backend == "inductor"),
             f"train.compile_tuning tunes the kernels inductor generates, but train.compile={t.compile} and "
             f"train.compile_backend={t.compile_backend}: set train.compile=auto|true with the inductor backend, "
             "or train.compile_tuning=false")
    _require(t.fp8.lower() in FP8_OFF + FP8_RECIPES, f"train.fp8 must be off|{'|'.join(FP8_RECIPES)}, got {t.fp8!r}")
    _require(not t.fp8_emulate or fp8_recipe(t) is not None,
             "train.fp8_emulate=true emulates FP8 GEMMs: set train.fp8=tensorwise|rowwise too, or drop train.fp8_emulate")
    _require(fp8_recipe(t) is None or cfg.parallel.tensor == 1,
             f"train.fp8={t.fp8} swaps the blocks' nn.Linear projections, which parallel.tensor={cfg.parallel.tensor} "
             "replaces by megatron's column/row-parallel layers: set parallel.tensor=1 (data, context and pipeline "
             "parallelism work with FP8) or train.fp8=off")
    _require(t.max_bad_steps >= 1, f"train.max_bad_steps must be >= 1, got {t.max_bad_steps}")
    _require(d.seq_len > 0, f"data.seq_len must be positive, got {d.seq_len}")
    _require(d.num_workers >= 0,
             f"data.num_workers must be >= 0 (0: load in the training process), got {d.num_workers}")
    _require(d.shuffle_window >= 1, f"data.shuffle_window must be >= 1, got {d.shuffle_window}")
    if "rat" in cfg.model.mixers:
        _require(
            d.seq_len % cfg.model.chunk_size == 0,
            f"data.seq_len ({d.seq_len}) must be a multiple of model.chunk_size ({cfg.model.chunk_size}) "
            "so training sequences hold whole chunks",
        )
    _require(len(d.streams) > 0, "data.streams is empty: list at least one data_prep output folder, "
             "e.g. data.streams=[{path: data/pydoc}]")
    for i, stream in enumerate(d.streams):
        _require(stream.weight > 0, f"data.streams[{i}].weight must be positive, got {stream.weight}")
        _require(stream.min_doc_tokens >= 0, f"data.streams[{i}].min_doc_tokens must be >= 0 (0 keeps every "
                 f"document), got {stream.min_doc_tokens}")
    _require(0 < o.lr < math.inf, f"optimizer.lr must be positive and finite, got {o.lr}")
    _require(0 < o.eps < math.inf, f"optimizer.eps must be positive and finite, got {o.eps}")
    _require(0 <= o.weight_decay < math.inf, f"optimizer.weight_decay must be >= 0 and finite, got {o.weight_decay}")
    _require(len(o.betas) == 2 and all(0 <= b < 1 for b in o.betas),
             f"optimizer.betas must be two numbers in [0, 1), got {o.betas}")
    _require(o.grad_clip >= 0, f"optimizer.grad_clip must be >= 0, got {o.grad_clip}")
    _require(s.kind in ("cosine", "wsd", "constant"), f"schedule.kind must be cosine|wsd|constant, got {s.kind!r}")
    _require(0 <= s.warmup_fraction < 1, f"schedule.warmup_fraction must be in [0, 1), got {s.warmup_fraction}")
    _require(0 <= s.min_lr_ratio <= 1, f"schedule.min_lr_ratio must be in [0, 1], got {s.min_lr_ratio}")
    _require(0 < s.decay_fraction <= 1 - s.warmup_fraction or s.kind != "wsd",
             f"schedule.decay_fraction ({s.decay_fraction}) must be in (0, 1 - warmup_fraction]")
    _require(cfg.eval.interval >= 0, f"eval.interval must be >= 0, got {cfg.eval.interval}")
    _require(cfg.eval.interval == 0 or cfg.eval.max_samples >= per_step,
             f"eval.max_samples ({cfg.eval.max_samples}) must be at least train.micro_batch × data-parallel size "
             f"= {per_step}, one validation micro-batch per rank (or set eval.interval=0 to skip validation)")
    validate_downstream_eval(cfg)
    _require(cfg.checkpoint.interval >= 0, f"checkpoint.interval must be >= 0, got {cfg.checkpoint.interval}")
    _require(cfg.checkpoint.keep >= 1, f"checkpoint.keep must be >= 1, got {cfg.checkpoint.keep}")
    validate_checkpoint_format(cfg)
    _require(cfg.logging.interval >= 1, f"logging.interval must be >= 1, got {cfg.logging.interval}")
    _require(cfg.logging.peak_tflops >= 0 and math.isfinite(cfg.logging.peak_tflops),
             f"logging.peak_tflops must be >= 0 and finite (0: look up the GPU), got {cfg.logging.peak_tflops}")
    validate_parallel_shape(cfg)
    _require(cfg.parallel.bucket_size >= 0, f"parallel.bucket_size must be >= 0 (0: megatron's default), "
             f"got {cfg.parallel.bucket_size}")
    micro_batches = micro_batches_per_step(t, dp_size)
    p = cfg.parallel
    _require(p.virtual_stages == 1 or micro_batches % p.pipeline == 0,
             f"the interleaved schedule runs micro-batches in groups of parallel.pipeline ({p.pipeline}): "
             f"train.global_batch / (train.micro_batch × data-parallel size) = {micro_batches} must be a "
             "multiple of it (or use parallel.virtual_stages=1)")
    _require(t.engine in ("megatron", "deepspeed"), f"train.engine must be megatron|deepspeed, got {t.engine!r}")
    if t.engine == "deepspeed":
        z, p = cfg.deepspeed, cfg.parallel
        _require(z.zero_stage in (1, 2, 3), f"deepspeed.zero_stage must be 1, 2 or 3, got {z.zero_stage}")
        _require(not z.offload_params or z.zero_stage == 3,
                 f"deepspeed.offload_params needs deepspeed.zero_stage=3 (got {z.zero_stage})")
        check_deepspeed_extra(z.extra)
        _require(p.tensor == 1 and p.pipeline == 1, "train.engine=deepspeed scales by data and context parallelism "
                 f"only: set parallel.tensor=1 and parallel.pipeline=1 (got {p.tensor}, {p.pipeline}), "
                 "or use train.engine=megatron")
    validate_engine_keys(cfg)


def validate_engine_keys(cfg: Config) -> None:
    """Refuse a key that only the other engine reads: the run would train without it, silently (e.g.
    deepspeed.zero_stage=3 with the default train.engine=megatron runs megatron's ZeRO-1)."""
    engine, p = cfg.train.engine, cfg.parallel
    if engine == "megatron":
        defaults = vars(DeepSpeedConfig())
        changed = [f"deepspeed.{key}" for key, default in defaults.items() if getattr(cfg.deepspeed, key) != default]
        _require(not changed, f"{', '.join(changed)} configure train.engine=deepspeed, but this run trains with "
                 "train.engine=megatron: set train.engine=deepspeed, or leave the deepspeed keys out")
        return
    _require(p.bucket_size == 0, f"parallel.bucket_size ({p.bucket_size}) sizes megatron's gradient buckets; "
             "train.engine=deepspeed has its own: set deepspeed.extra={zero_optimization: {reduce_bucket_size: N}} "
             "instead")
    _require(p.distributed_optimizer, "parallel.distributed_optimizer=false is megatron's; train.engine=deepspeed "
             "shards the optimizer state by deepspeed.zero_stage (1, 2 or 3): leave parallel.distributed_optimizer "
             "at true")


def check_deepspeed_extra(extra: dict[str, Any], prefix: str = "") -> None:
    """Reject `deepspeed.extra` keys that the ratpt config owns, naming the ratpt key to use; and a value other
    than a mapping for a section holding such keys (zero_optimization, bf16, ...), which would replace the
    section, and with it the owned keys, instead of merging into it."""
    for key, value in extra.items():
        path = f"{prefix}{key}"
        if path in DEEPSPEED_OWNED:
            raise ConfigError(f"deepspeed.extra.{path} is set from the ratpt config: use {DEEPSPEED_OWNED[path]}")
        if isinstance(value, dict):
            check_deepspeed_extra(value, f"{path}.")
            continue
        owned_inside = [owned for owned in DEEPSPEED_OWNED if owned.startswith(f"{path}.")]
        if owned_inside:
            raise ConfigError(f"deepspeed.extra.{path} must be a mapping of keys to merge into DeepSpeed's {path} "
                              f"section, got {value!r}: a value would replace the section, whose "
                              f"{', '.join(owned_inside)} the ratpt config sets")


def validate_downstream_eval(cfg: Config) -> None:
    """The checks on eval.tasks and eval.passkey that need neither lm-eval nor files (the tasks, their folder
    and the tokenizer are checked when the run starts: ratpt.train.downstream)."""
    e, p = cfg.eval, cfg.eval.passkey
    _require(not (e.tasks or p.lengths) or e.interval > 0, "eval.tasks and eval.passkey.lengths run at every "
             "evaluation: set eval.interval > 0, or leave them empty")
    _require(all(task.strip() for task in e.tasks) and len(set(e.tasks)) == len(e.tasks),
             f"eval.tasks must name each lm-eval task once, got {e.tasks}")
    _require(e.task_limit >= 0, f"eval.task_limit must be >= 0 (0: every document), got {e.task_limit}")
    _require(e.task_batch_size >= 1, f"eval.task_batch_size must be >= 1, got {e.task_batch_size}")
    _require(e.task_num_fewshot is None or e.task_num_fewshot >= 0,
             f"eval.task_num_fewshot must be >= 0 or null (each task's own), got {e.task_num_fewshot}")
    _require(all(length > 0 for length in p.lengths), f"eval.passkey.lengths must be positive, got {p.lengths}")
    _require(len(p.depths) > 0 and all(0 <= depth <= 1 for depth in p.depths),
             f"eval.passkey.depths must list depths in [0, 1], got {p.depths}")
    _require(p.trials >= 1, f"eval.passkey.trials must be >= 1, got {p.trials}")
    _require(p.piece > 0 and p.piece % cfg.model.chunk_size == 0, f"eval.passkey.piece ({p.piece}) must be a "
             f"positive multiple of model.chunk_size ({cfg.model.chunk_size})")


def validate_checkpoint_format(cfg: Config) -> None:
    c = cfg.checkpoint
    _require(c.format in ("gathered", "distributed"),
             f"checkpoint.format must be gathered|distributed, got {c.format!r}")
    _require(not c.async_save or c.format == "distributed", "checkpoint.async_save=true needs "
             "checkpoint.format=distributed (a gathered checkpoint is written by rank 0 in one piece)")
    _require(c.format == "gathered" or cfg.train.engine == "megatron",
             f"checkpoint.format=distributed is megatron's sharded format; train.engine={cfg.train.engine} writes its "
             "own sharded checkpoints: leave checkpoint.format=gathered")


def validate_parallel_shape(cfg: Config) -> None:
    """The checks on `parallel` that do not depend on the number of processes."""
    p, m = cfg.parallel, cfg.model
    for key in ("tensor", "pipeline", "virtual_stages", "context"):
        _require(getattr(p, key) >= 1, f"parallel.{key} must be >= 1, got {getattr(p, key)}")
    heads = m.d_model // m.head_dim
    _require(heads % p.tensor == 0, f"parallel.tensor ({p.tensor}) must divide the number of heads "
             f"model.d_model/model.head_dim = {heads}")
    _require("rat" not in m.mixers or (heads // p.tensor) % m.ngroups == 0,
             f"parallel.tensor ({p.tensor}) must leave a multiple of model.ngroups ({m.ngroups}) heads per rank "
             f"({heads} heads): RAT's q/k groups are replicated on every tensor-parallel rank and tiled over its heads")
    _require(m.vocab_size % p.tensor == 0, f"parallel.tensor ({p.tensor}) must divide model.vocab_size "
             f"({m.vocab_size}) for the vocab-parallel embedding; round the vocab up")
    hidden = round(m.ffn_mult * m.d_model)
    _require(hidden % p.tensor == 0, f"parallel.tensor ({p.tensor}) must divide the FFN width ({hidden})")
    _require(p.virtual_stages == 1 or p.pipeline > 1,
             f"parallel.virtual_stages ({p.virtual_stages}) interleaves model chunks over the pipeline stages, but "
             f"parallel.pipeline is {p.pipeline}: set parallel.pipeline > 1, or parallel.virtual_stages=1")
    chunks = p.pipeline * p.virtual_stages
    _require(m.n_layers >= chunks, f"model.n_layers ({m.n_layers}) must be >= parallel.pipeline × "
             f"parallel.virtual_stages = {chunks} (every stage holds at least one layer)")
    _require(p.context_layout in ("contiguous", "zigzag"),
             f"parallel.context_layout must be contiguous|zigzag, got {p.context_layout!r}")
    _require(p.context == 1 or "rnn" not in m.mixers,
             f"parallel.context ({p.context}) cuts every sequence over ranks, but the rnn layers of model.mixers "
             f"({m.mixers}) run one recurrence over the whole sequence, which cannot cross ranks: set "
             "parallel.context=1, or leave rnn out of model.mixers")
    seq = cfg.data.seq_len
    unit = m.chunk_size if "rat" in m.mixers else 1
    zigzag = p.context > 1 and p.context_layout == "zigzag"
    blocks = 2 * p.context if zigzag else p.context  # equal blocks of whole chunks per sequence
    factors = ["2"] * zigzag + [f"parallel.context ({p.context})"] + [f"model.chunk_size ({unit})"] * (unit > 1)
    fix = ("; parallel.context_layout=zigzag cuts every sequence into 2 × parallel.context blocks: change "
           "data.seq_len or parallel.context, or set parallel.context_layout=contiguous" if zigzag else "")
    held = "whole chunks" if unit > 1 else "equal blocks"
    _require(seq % (blocks * unit) == 0, f"data.seq_len ({seq}) must be a multiple of {' × '.join(factors)} = "
             f"{blocks * unit} so every context-parallel rank holds {held}{fix}")
    if p.context > 1 and "swa" in m.mixers:
        per_block = "(2 × parallel.context)" if zigzag else "parallel.context"
        _require(seq // blocks >= m.window, f"sliding-window layers need data.seq_len / {per_block} "
                 f"({seq // blocks}) >= model.window ({m.window}): a block exchanges one window with the block "
                 f"before it{fix}")
    _require(seq % (p.context * p.tensor) == 0,
             f"data.seq_len ({seq}) must be a multiple of parallel.context × parallel.tensor = {p.context} × "
             f"{p.tensor} = {p.context * p.tensor}: sequence parallelism cuts each context-parallel rank's "
             f"{seq // p.context} tokens into equal slices over the tensor-parallel ranks; change data.seq_len or "
             "parallel.tensor")


def data_parallel_size(cfg: Config, world_size: int) -> int:
    """World size / (tensor × pipeline × context), or a ConfigError saying why it does not divide."""
    p = cfg.parallel
    model_ranks = p.tensor * p.pipeline * p.context
    _require(world_size % model_ranks == 0,
             f"the world size ({world_size} processes) must be a multiple of parallel.tensor × parallel.pipeline "
             f"× parallel.context = {p.tensor} × {p.pipeline} × {p.context} = {model_ranks}; the remaining "
             "factor is the data-parallel size")
    return world_size // model_ranks
