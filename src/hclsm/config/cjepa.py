"""Config of the C-JEPA masked slot predictor, its CTT losses and its training on slot sequences.

C-JEPA trains on slot sequences from a frozen object model (``hclsm.models.cjepa``), not on video, so it
has its own config beside the video models' ``ModelConfig``. Every dataclass validates itself and names
the dotted key (``cjepa.masked``) of a bad value.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from hclsm.config.model import CausalConfig, check, check_heads, check_max, check_min, check_one_of, check_seed

GRAPHS = ("attention", "learned")  # where the CTT losses take their graph from (see hclsm.models.cjepa)


@dataclass
class CTTConfig:
    """The two CTT losses (invariance, sufficiency) and the graph they read. Weights 0 = off."""

    inv_weight: float = 0.0  # invariance: masking a slot that is not a parent of j leaves j's prediction unchanged
    suf_weight: float = 0.0  # sufficiency: a slot's parents alone (every other slot masked) suffice to predict it
    start_epoch: int = 0  # the losses act from this training epoch on (the first epoch is 0)
    graph: str = "attention"  # attention: the predictor's own attention, normalised per slot; learned: a causal graph
    # attention graph: j is a parent of i when i's future queries give j's tokens at least this multiple of the
    # uniform share among the other alive slots (1.0 = more than an even split)
    attention_threshold: float = 1.0

    def __post_init__(self) -> None:
        p = "cjepa.ctt"
        check_min(self, p, 0.0, "inv_weight", "suf_weight", "attention_threshold")
        check_min(self, p, 0, "start_epoch")
        check_one_of(self.graph, f"{p}.graph", GRAPHS)

    @property
    def enabled(self) -> bool:
        return self.inv_weight > 0 or self.suf_weight > 0


@dataclass
class CJEPAConfig:
    """Masked object-slot prediction in latent space (C-JEPA) over windows of ``history + future`` frames."""

    d_model: int = 128
    depth: int = 4
    heads: int = 4
    mlp: int = 256
    dropout: float = 0.0
    history: int = 4  # T_h: frames the predictor reads
    future: int = 6  # T_p: frames it predicts after them, all at once
    # history frames at the start of a window that are never hidden: 1 = the first frame only (C-JEPA); 2 also
    # shows a hidden object's velocity, so its hidden states follow from its motion and the other objects
    visible: int = 1
    masked: int = 2  # |M|: object slots hidden on history frames visible..T_h-1, drawn per sample and step; 0 = none
    # the last position_dims of a slot state are its position (our object model's (x, y)); in every loss they weigh
    # as much as all the other dims together, so the few numbers that say where an object is are not drowned
    # out by its appearance vector; the learned graph (graph_gate) reads each pair's geometry from them. 0: every dim
    # weighs the same, and the graph reads the slot vectors alone
    position_dims: int = 0
    action_dim: int = 0  # > 0: an action node per frame (PushT); read, never predicted, never masked
    proprio_dim: int = 0  # > 0: a proprioception node per frame; read on history frames, predicted on future ones
    # learned: a causal graph (hclsm.nn.causal) read from the visible history gates which slots each slot may
    # attend to; its sparsity / acyclicity terms and schedules come from ``causal``. none: full attention
    graph_gate: bool = False
    d_edge: int = 64  # width of the learned graph's pair features
    # l1 weight 0.001, a tenth of the video model's: at 0.01 the prediction loss here cannot hold an edge against it
    # and the graph empties (no edge on the development histories of ``hclsm bench cjepa``)
    causal: CausalConfig = field(default_factory=lambda: CausalConfig(sparsity_lambda=1e-3))
    ctt: CTTConfig = field(default_factory=CTTConfig)
    # training on slot windows (hclsm.models.cjepa.train_cjepa)
    epochs: int = 30
    batch_size: int = 64
    lr: float = 5e-4
    weight_decay: float = 0.01
    warmup_steps: int = 100
    grad_clip: float = 1.0
    seed: int = 0

    def __post_init__(self) -> None:
        p = "cjepa"
        if isinstance(self.causal, dict):
            self.causal = CausalConfig(**self.causal)
        if isinstance(self.ctt, dict):
            self.ctt = CTTConfig(**self.ctt)
        check_min(self, p, 1, "d_model", "depth", "heads", "mlp", "history", "future", "epochs", "batch_size",
                  "d_edge")
        check_min(self, p, 0, "masked", "position_dims", "action_dim", "proprio_dim", "warmup_steps")
        check_seed(self, p)
        check_max(self, p, 2**24, "the windows of one step are held in memory at once", "batch_size")
        check_min(self, p, 0.0, "dropout", "weight_decay", "grad_clip")
        check(self.dropout < 1.0, f"{p}.dropout", f"must be < 1, got {self.dropout}")
        check_min(self, p, 0.0, "lr")
        check(self.lr > 0, f"{p}.lr", f"must be > 0, got {self.lr}")
        check_max(self, p, 10.0, "AdamW moves every weight by about lr per step; far below this a run diverges",
                  "lr")
        check_heads(self.d_model, self.heads, p)
        check_min(self, p, 1, "visible")
        check(self.history > self.visible or self.masked == 0, f"{p}.history",
              f"must exceed cjepa.visible ({self.visible}) to mask history frames, got {self.history}")
        check(self.ctt.graph != "learned" or self.graph_gate, f"{p}.ctt.graph",
              "'learned' needs the learned graph: set cjepa.graph_gate=true")
        check(self.causal.inference == "step", f"{p}.causal.inference",
              f"must be 'step' (the episode graph serves HCLSM's dynamics only, for now), got {self.causal.inference!r}")

    @property
    def window(self) -> int:
        return self.history + self.future
