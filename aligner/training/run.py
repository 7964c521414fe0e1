"""What every trainer sets up the same way: config checks, distributed layout, tokenizer, model
(+ DDP, optimizer, schedule), initial weights, resume, loggers and checkpoint directory."""
from __future__ import annotations

import logging
import os
import sys
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig

from aligner.distributed import setup as dist_setup
from aligner.models.config import ModelConfig, parse_precision
from aligner.models.gpt import build_gpt, unwrap
from aligner.training import checkpoint
from aligner.training.config_check import check_config, to_plain
from aligner.training.metrics_log import MetricsLogger
from aligner.training.optim import OptimSettings, build_optimizer, load_scheduler_state, wrap_data_parallel

log = logging.getLogger("aligner")

# Keys of cfg.model that describe the network (NeMo-style: they sit directly under `model`).
ARCH_KEYS = ("arch", "vocab_size", "hidden_size", "ffn_hidden_size", "num_layers", "num_attention_heads",
             "num_query_groups", "max_position_embeddings", "rope_theta", "norm_eps", "tie_word_embeddings",
             "hidden_dropout", "attention_dropout", "init_method_std", "attention_backend", "num_experts",
             "moe_router_topk")


def configure_logging(rank: int) -> None:
    level = logging.INFO if rank == 0 else logging.WARNING
    logging.basicConfig(level=level, format=f"[%(asctime)s r{rank}] %(name)s: %(message)s", datefmt="%H:%M:%S",
                        stream=sys.stdout, force=True)
    import warnings

    # megatron logs every parameter name and its whole optimizer config at INFO.
    logging.getLogger("megatron").setLevel(logging.WARNING)

    warnings.filterwarnings("ignore", message=".*Apex is not installed.*")
    warnings.filterwarnings("ignore", message=".*Transformer Engine.*")
    warnings.filterwarnings("ignore", category=FutureWarning, module="megatron")
    warnings.filterwarnings("ignore", category=UserWarning, module="megatron")


def model_config_from(cfg_model: DictConfig, vocab_size: int | None) -> ModelConfig:
    values = {k: cfg_model[k] for k in ARCH_KEYS if k in cfg_model and cfg_model[k] is not None}
    if "vocab_size" not in values:
        if vocab_size is None:
            raise ValueError("model.vocab_size is null and no tokenizer gives one: set model.tokenizer.model")
        values["vocab_size"] = vocab_size
    return ModelConfig.from_mapping(values, key_prefix="model")


def resolve_pretrained(path: str | None):
    """Classify `pretrained_checkpoint.restore_from_path`: ('native', dir) | ('hf', dir) | (None, None)."""
    if not path:
        return None, None
    from aligner.models import pretrained

    return pretrained.detect_format(path)


def set_torch_threads(configured) -> None:
    """trainer.torch_threads, else env ALIGNER_NUM_THREADS, else torch's default (one per core).
    Processes sharing a machine (a PPO actor and its critic server) each take their share:
    two processes of one thread per core each run slower than one that has the cores."""
    value = configured if configured is not None else os.environ.get("ALIGNER_NUM_THREADS")
    if value is None or value == "":
        return
    try:
        threads = int(value)
    except (TypeError, ValueError):
        threads = 0
    if threads < 1:
        source = "trainer.torch_threads" if configured is not None else "env ALIGNER_NUM_THREADS"
        raise ValueError(f"{source}={value!r}: give a whole number of threads >= 1 (or null for torch's default)")
    torch.set_num_threads(threads)


class Run:
    """One training run's shared machinery; the trainer module owns the loop."""

    def __init__(self, cfg: DictConfig, algorithm: str, schema: str | Path, scalar_head: bool = False,
                 optimizer_steps: int | None = None, resume: bool = True):
        """`optimizer_steps`: length of the LR schedule when it is not trainer.<algorithm>.max_steps
        (PPO makes several optimizer steps per rollout step). `resume=False` defers resuming (and
        opening the loggers) to an explicit `resume_latest()`, for callers that must first capture
        the initial weights (e.g. a critic parking its reward model)."""
        check_config(cfg, schema)
        self.cfg = cfg
        self.algorithm = algorithm
        self.loop_cfg = cfg.trainer[algorithm]
        tp = int(cfg.model.tensor_model_parallel_size)
        pp = int(cfg.model.pipeline_model_parallel_size)
        self.layout = dist_setup.initialize(tp, pp, seed=int(cfg.model.seed), devices=cfg.trainer.get("devices"),
                                            num_nodes=cfg.trainer.get("num_nodes"),
                                            expert_parallel=int(cfg.model.get("expert_model_parallel_size", 1)))
        configure_logging(self.layout.rank)
        set_torch_threads(cfg.trainer.get("torch_threads"))
        self.dtype = parse_precision(cfg.trainer.precision)
        self.scalar_head = scalar_head

        from aligner.data.tokenizer import Tokenizer

        self.tokenizer = Tokenizer.from_pretrained(cfg.model.tokenizer.model)
        fmt, src = resolve_pretrained(cfg.pretrained_checkpoint.restore_from_path)
        self.pretrained_format, self.pretrained_path = fmt, src
        if fmt == "native":
            saved = checkpoint.read_trainer_state(src).get("model_config")
            self.model_config = ModelConfig(**saved) if saved else model_config_from(cfg.model, self.tokenizer.vocab_size)
        elif fmt == "hf":
            from aligner.models.hf import convert

            self.model_config = convert.model_config_from_hf(src)
        else:
            self.model_config = model_config_from(cfg.model, self.tokenizer.vocab_size)
        self.model_config.validate(tp)

        self.global_batch_size = int(cfg.model.global_batch_size)
        self.micro_batch_size = int(cfg.model.micro_batch_size)
        dp = self.layout.data_parallel
        if self.global_batch_size % (self.micro_batch_size * dp):
            raise ValueError(
                f"model.global_batch_size={self.global_batch_size} must be a multiple of "
                f"model.micro_batch_size ({self.micro_batch_size}) x data-parallel size ({dp})"
            )
        self.max_steps = int(self.loop_cfg.max_steps)
        settings = OptimSettings.from_config(to_plain(cfg.model.optim), optimizer_steps or self.max_steps,
                                             self.loop_cfg.get("gradient_clip_val"))
        model = build_gpt(self.model_config, self.dtype, tp, pp, scalar_head=scalar_head)
        self.init_weights(model)
        self.model = wrap_data_parallel(model, settings)
        self.optimizer, self.scheduler = build_optimizer(self.model, settings, self.dtype)

        self.log_dir = Path(cfg.exp_manager.explicit_log_dir)
        self.checkpoint_dir = self.log_dir / "checkpoints"
        self.step = 0
        self.resume_state: dict[str, Any] = {}
        self.metrics: MetricsLogger | None = None
        if resume:
            self.resume_latest()

    def resume_latest(self) -> dict:
        """Restore the latest complete checkpoint (if exp_manager.resume_if_exists), then open loggers."""
        em = self.cfg.exp_manager
        latest = checkpoint.latest_complete(self.checkpoint_dir) if bool(em.resume_if_exists) else None
        if latest is not None:
            self.resume_state = checkpoint.load(latest, self.model, self.optimizer)
            self.step = int(self.resume_state["step"])
            load_scheduler_state(self.scheduler, self.resume_state["scheduler"])
            log.info("resumed from %s at step %d", latest, self.step)
        self.metrics = MetricsLogger(
            self.log_dir, self.cfg.get("name", self.algorithm), csv=bool(em.create_csv_logger),
            tensorboard=bool(em.create_tensorboard_logger), wandb=bool(em.create_wandb_logger),
            wandb_kwargs=to_plain(em.wandb_logger_kwargs), hparams=_flatten(to_plain(self.cfg)), start_step=self.step,
        )
        return self.resume_state

    def init_weights(self, model) -> None:
        if self.pretrained_format == "native":
            skip = ("output_layer.",) if self.scalar_head else ()
            state = checkpoint.read_trainer_state(self.pretrained_path)
            if self.scalar_head and state.get("scalar_head"):
                skip = ()  # RM -> critic: keep the trained head
            checkpoint.load_weights_only(self.pretrained_path, model, skip_prefixes=skip)
            log.info("initialised weights from native checkpoint %s", self.pretrained_path)
        elif self.pretrained_format == "hf":
            from aligner.models.hf import convert

            convert.load_hf_weights(self.pretrained_path, model, self.model_config, scalar_head=self.scalar_head)
            log.info("initialised weights from Hugging Face directory %s", self.pretrained_path)

    @property
    def is_rank_zero(self) -> bool:
        return self.layout.rank == 0

    def trainer_state(self, extra: dict | None = None) -> dict:
        return {
            "algorithm": self.algorithm,
            "model_config": self.model_config.to_dict(),
            "scalar_head": self.scalar_head,
            "scheduler": self.scheduler.state_dict(),
            "tokenizer": str(self.cfg.model.tokenizer.model),
            **(extra or {}),
        }

    def save_checkpoint(self, extra: dict | None = None) -> Path:
        keep = self.cfg.exp_manager.checkpoint_callback_params.save_top_k
        return checkpoint.save(self.checkpoint_dir, self.step, self.model, self.optimizer,
                               self.trainer_state(extra), keep_last=int(keep) if keep else None)

    def base_model(self):
        return unwrap(self.model)

    def finish(self) -> None:
        if self.metrics is not None:
            self.metrics.close()
        dist_setup.shutdown()


def _flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    if isinstance(tree, dict):
        for key, value in tree.items():
            out.update(_flatten(value, f"{prefix}{key}."))
    else:
        out[prefix[:-1]] = tree if isinstance(tree, (int, float, str, bool)) or tree is None else str(tree)
    return out
