"""Training config: optimisation, schedule, the two-stage protocol, loss weights, logging, outputs.

Defaults are the ``tiny`` preset (CPU, fp32, minutes). The HCLSM protocol (seed, "Training"): stage 1
trains only the spatial broadcast decoder and slot diversity (SBD weight 5.0) for the first
``stage1_fraction`` of the steps; stage 2 switches on the full loss with the SBD weight lowered to 1.0.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

from hclsm.config.model import check, check_max, check_min, check_number, check_one_of, check_prob, check_seed

PRECISIONS = ("fp32", "bf16")
PARALLEL = ("ddp", "fsdp")  # how a torchrun job spreads the model: full copies, or sharded (FSDP2)
STAGES = (1, 2)
LOSS_NAMES = ("sbd", "diversity", "existence", "object_area", "jepa", "obj", "causal", "acyclicity", "event",
              "frame", "rollout", "ewc")  # what models may return (ewc: the training loop's, see hclsm.train.ewc)
_DEVICE_RE = re.compile(r"auto|cpu|mps|cuda(:\d+)?")
MAX_BATCH = 2**24  # clips per optimizer step
MAX_THREADS = 1024  # intra-op threads, or data-loader workers, per process
MAX_LR = 10.0
MAX_MINUTES = 1e6
MAX_REHEARSAL = 2**20  # replayed clips kept in memory


@dataclass
class LossWeights:
    """Weights of the named losses (seed, "Loss Functions")."""

    sbd_stage1: float = 5.0  # spatial broadcast decoder reconstruction, stage 1
    sbd_stage2: float = 1.0  # ... and stage 2
    diversity: float = 0.1  # slot diversity regulariser
    jepa: float = 1.0  # latent next-state prediction (stage 2)
    obj: float = 0.5  # object-level prediction (stage 2)
    causal: float = 0.1  # NOTEARS DAG constraint (augmented Lagrangian) + l1 sparsity (stage 2)
    acyclicity: float = 0.0  # h(A) itself: logged, and fed to the Lagrangian update (the penalty is in `causal`)
    event: float = 0.05  # event-rate hinge + contrastive event loss (stage 2)
    existence: float = 1.0  # slot existence prior (the model scales it by its own ramp)
    object_area: float = 0.01  # share of the frame drawn by object slots: the background is the default (ramped like existence)
    frame: float = 1.0  # pixel loss of a decoded next-step prediction (stage 2; the flat-SSM baseline's frames)
    rollout: float = 1.0  # open-loop loss: decoded frames of steps predicted from predictions (stage 2)
    # lambda of the EWC penalty 1/2 sum F (theta - theta*)^2 while training on a later task (hclsm train --continual).
    # With train.ewc_normalize (the default) F has mean 1 over the parameters, so lambda is the penalty per unit of
    # squared drift of a parameter of average importance. 700 = the raw-Fisher lambda hclsm bench memory's sweep
    # chose on a separate seed (1.4e9) times the raw Fisher's mean there (~5e-7); docs/benchmarks/history.md
    ewc: float = 700.0

    def __post_init__(self) -> None:
        check_min(self, "train.loss", 0.0, "sbd_stage1", "sbd_stage2", "diversity", "jepa", "obj", "causal",
                  "acyclicity", "event", "existence", "object_area", "frame", "rollout", "ewc")

    def weight(self, name: str, stage: int) -> float:
        """The weight of loss ``name`` (one of ``LOSS_NAMES``) in training stage ``stage`` (1 or 2).

        ``sbd`` has one weight per stage; every other loss has one field. An unknown name is a bug in the
        model that returned it, so it raises ``ValueError`` listing the known names.
        """
        if name == "sbd":
            return self.sbd_stage1 if stage == 1 else self.sbd_stage2
        if name not in LOSS_NAMES:
            raise ValueError(f"unknown loss {name!r}: train.loss has weights for {', '.join(LOSS_NAMES)}; "
                             f"add a weight for it to LossWeights or rename the model's loss")
        return float(getattr(self, name))


@dataclass
class TrainConfig:
    stage: int = 1  # stage to start in: 1 = stage 1 for stage1_fraction of the steps, then 2; 2 = full loss only
    steps: int = 2000  # optimizer steps in total (both stages)
    stage1_fraction: float = 0.4  # share of `steps` spent in stage 1 (seed: 40 %)
    batch_size: int = 16  # the global batch: summed over processes and micro-batches
    # micro-batches per optimizer step: each process runs its share of the batch in this many equal pieces
    # and sums their gradients (the same update with 1/accumulate of the activation memory)
    accumulate: int = 1
    lr: float = 8e-4  # peak learning rate
    weight_decay: float = 0.05  # AdamW decay (matrices only; not norms or biases)
    warmup_steps: int = 100  # linear warmup from 0, then cosine (capped at `steps` by the scheduler)
    min_lr_ratio: float = 0.01  # the cosine ends at lr * min_lr_ratio
    grad_clip: float = 1.0  # max global grad norm; 0 = off
    ema_tau: float = 0.996  # EMA target encoder: theta- <- tau * theta- + (1 - tau) * theta
    precision: str = "fp32"  # one of PRECISIONS (bf16 = autocast; numerically sensitive parts stay fp32)
    device: str = "auto"  # auto | cpu | cuda | cuda:N | mps
    # under torchrun: ddp = every rank holds the whole model; fsdp = parameters, gradients and optimizer
    # state sharded across ranks (for models that do not fit one GPU); ignored in a single process
    parallel: str = "ddp"
    seed: int = 0
    log_every: int = 25  # steps between log lines
    wandb: bool = False  # also log to Weights & Biases (the hclsm[wandb] extra; WANDB_MODE=offline needs no account)
    wandb_project: str = "hclsm"  # the W&B project the run is logged to
    eval_every: int = 500  # steps between evaluations; 0 = only at the end
    ckpt_every: int = 500  # steps between checkpoints; 0 = only at the end
    keep_last: int = 3  # checkpoints kept on disk
    num_workers: int = 0  # DataLoader worker processes
    # intra-op CPU threads per process; 0 = OMP_NUM_THREADS when set, else this process's share of the CPUs less
    # the cores other processes keep busy (1-minute load average), at least 1 (hclsm.train.distributed)
    threads: int = 0
    out_dir: str = "runs"  # runs are written to out_dir/run_name
    run_name: str | None = None  # None = derived from the model, preset and time
    max_minutes: float = 0.0  # wall-clock budget of the training loop; 0 = off (stop at `steps` only)
    val_fraction: float = 0.1  # share of the episodes held out for evaluation (at least one when possible)
    # where the model's progress-driven schedules (query noise, existence prior) start: a run that continues
    # another run's training (stage 2 of train_two_stages) starts them at the progress the first one reached
    progress_start: float = 0.0
    # training clips of a finished task whose squared loss gradients make its EWC Fisher (hclsm bench memory reports
    # how well two halves of them agree on the parameters' ranking)
    ewc_samples: int = 128
    ewc_normalize: bool = True  # divide each task's Fisher by its mean, so train.loss.ewc means the same for any model
    ewc_decay: float = 1.0  # online EWC: Fisher = decay * earlier tasks' + this task's (1 = sum, < 1 = older fade)
    # rehearsal (hclsm.train.rehearsal): clips kept from the finished tasks of hclsm train --continual, replayed in
    # every later task's batches (0 = off), and the share of each batch they fill. On by default: in hclsm bench
    # memory it keeps task A (forgetting 0.01x plain training's on the selection seed) where EWC cannot
    rehearsal_clips: int = 256
    rehearsal_fraction: float = 0.5
    loss: LossWeights = field(default_factory=LossWeights)

    def __post_init__(self) -> None:
        p = "train"
        check(self.stage in STAGES, f"{p}.stage", f"must be 1 or 2, got {self.stage!r}")
        check_max(self, p, MAX_BATCH, "the clips of one step are held in memory at once", "batch_size")
        check_max(self, p, MAX_THREADS, "threads beyond the machine's CPUs only slow training down; 0 picks them",
                  "threads")
        check_max(self, p, MAX_THREADS, "each worker is a process of its own", "num_workers")
        check_min(self, p, 1, "steps", "batch_size", "accumulate", "log_every", "keep_last", "ewc_samples")
        check_min(self, p, 0, "warmup_steps", "eval_every", "ckpt_every", "num_workers", "threads", "rehearsal_clips")
        check_max(self, p, MAX_REHEARSAL, "the buffer holds every replayed clip in memory", "rehearsal_clips")
        check_prob(self, p, "ewc_decay")
        check_number(self.rehearsal_fraction, f"{p}.rehearsal_fraction")
        check(0.0 < self.rehearsal_fraction < 1.0, f"{p}.rehearsal_fraction",
              f"must be in (0, 1): the share of each batch replayed from earlier tasks, got {self.rehearsal_fraction}")
        check(self.rehearsal_clips == 0 or self.batch_size >= 2, f"{p}.batch_size",
              f"must be >= 2 with train.rehearsal_clips (a batch mixes the task's clips with replayed ones), "
              f"got {self.batch_size}")
        check_seed(self, p)
        check(self.batch_size % self.accumulate == 0, f"{p}.batch_size",
              f"must be a multiple of train.accumulate ({self.accumulate}), got {self.batch_size}")
        check(isinstance(self.lr, (int, float)) and not isinstance(self.lr, bool), f"{p}.lr",
              f"must be a number, got {self.lr!r}")
        check(self.lr > 0 and math.isfinite(self.lr), f"{p}.lr", f"must be > 0 and finite, got {self.lr}")
        check_max(self, p, MAX_LR, "AdamW moves every weight by about lr per step; far below this a run diverges",
                  "lr")
        check_min(self, p, 0.0, "weight_decay", "grad_clip", "max_minutes")
        check_max(self, p, MAX_MINUTES, "about two years; 0 = no time limit", "max_minutes")
        check_prob(self, p, "min_lr_ratio", "ema_tau", "stage1_fraction", "val_fraction", "progress_start")
        check(self.warmup_steps <= self.steps, f"{p}.warmup_steps",
              f"must be <= train.steps ({self.steps}), got {self.warmup_steps}; lower it, e.g. "
              f"--set train.warmup_steps={self.steps // 10}")
        check_one_of(self.precision, f"{p}.precision", PRECISIONS)
        check_one_of(self.parallel, f"{p}.parallel", PARALLEL)
        check(isinstance(self.device, str) and _DEVICE_RE.fullmatch(self.device) is not None, f"{p}.device",
              f"must be auto, cpu, cuda, cuda:N or mps, got {self.device!r}")
        check(isinstance(self.wandb_project, str) and self.wandb_project.strip() != "", f"{p}.wandb_project",
              f"must be a non-empty W&B project name, got {self.wandb_project!r}")
        check(isinstance(self.out_dir, str) and self.out_dir.strip() != "", f"{p}.out_dir",
              f"must be a non-empty path, got {self.out_dir!r}")
        if self.run_name is not None:
            ok = isinstance(self.run_name, str) and self.run_name.strip() not in ("", ".", "..")
            check(ok and "/" not in self.run_name and "\\" not in self.run_name, f"{p}.run_name",
                  f"must be a plain directory name (no path separators) or null, got {self.run_name!r}")

    @property
    def stage1_steps(self) -> int:
        """Number of steps trained in stage 1 (0 when starting in stage 2)."""
        return 0 if self.stage == 2 else int(round(self.steps * self.stage1_fraction))

    def stage_at(self, step: int, progress: float | None = None) -> int:
        """The stage (1 or 2) that optimizer step ``step`` (0-based) belongs to.

        ``progress`` (the run's progress in [0, 1], see ``max_minutes``) ends stage 1 early once it
        reaches ``stage1_fraction``, so a run cut short by its time budget still gets its stage 2.
        """
        if step >= self.stage1_steps:
            return 2
        return 1 if progress is None or progress < self.stage1_fraction else 2
