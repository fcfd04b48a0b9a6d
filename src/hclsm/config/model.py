"""Configs of the model components (HCLSM layers; the other models reuse the same blocks).

Defaults are the ``tiny`` preset (a CPU-sized HCLSM). Every dataclass validates itself in
``__post_init__`` and raises ``ConfigError`` naming the dotted key (``model.slots.num_slots``), so a bad
value fails when the config is built, not deep inside a module.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

from hclsm.errors import ConfigError

# cnn: small conv stack (CPU presets); vit: patch ViT (the seed's encoder); dinov2: a frozen pretrained DINOv2
ENCODERS = ("cnn", "vit", "dinov2")
PRETRAINED_PATCH = {"dinov2": 14}  # the frozen backbones (hclsm.nn.encoders.DINOv2Encoder) and their patch sides
STEMS = ("patch", "conv")  # how the cnn encoder reaches its token grid (see hclsm.nn.encoders.CNNEncoder)
# features = encoder patch features (DINOSAUR-style): the frozen backbone's, else an EMA copy of the encoder's
DECODER_TARGETS = ("pixels", "features")
UPSAMPLERS = ("subpixel", "smooth", "transposed")  # how the decoder reaches its resolution (hclsm.nn.decoders)
CAUSAL_INFERENCE = ("step", "episode")  # model.causal.inference: how the dynamics' graph is read (hclsm.nn.causal,
# hclsm.nn.graph_inference)
MODEL_NAMES = ("hclsm", "flat_ssm", "slotssm", "oc_slotssm", "cjepa")  # flat_ssm: the no-slot baseline


INT64_MAX = 2**63 - 1  # torch and NumPy count in 64-bit integers
SEED_MAX = 2**32 - 1  # NumPy's seeds are 32-bit


def check(cond: bool, key: str, msg: str) -> None:
    """Raise ``ConfigError("key: msg")`` unless ``cond``."""
    if not cond:
        raise ConfigError(f"{key}: {msg}")


def show(v: object) -> str:
    """A value for an error message: huge integers by their size, not their 400 digits."""
    if isinstance(v, int) and not isinstance(v, bool) and abs(v) > 10**18:
        return f"a {len(str(abs(v)))}-digit number"
    return repr(v) if isinstance(v, str) else str(v)


def check_number(v: object, key: str) -> None:
    """``v`` must be a finite int or float (an int is compared exactly: never converted to a float)."""
    check(isinstance(v, (int, float)) and not isinstance(v, bool), key, f"must be a number, got {v!r}")
    if isinstance(v, float):
        check(math.isfinite(v), key, f"must be a finite number, got {v}")


def check_int64(v: object, key: str) -> None:
    """An int must fit in 64 bits: Python's are unbounded, torch and NumPy count in int64."""
    if isinstance(v, int) and not isinstance(v, bool):
        check(-INT64_MAX - 1 <= v <= INT64_MAX, key, f"must fit in a 64-bit integer (|v| < 2^63), got {show(v)}")


def check_min(obj: object, prefix: str, minimum: float, *names: str) -> None:
    """Each named field of ``obj`` must be a number >= ``minimum`` (and an int within 64 bits). A field with an
    upper bound too is checked against it first (``check_max``), so that its message says why."""
    for name in names:
        v = getattr(obj, name)
        check_number(v, f"{prefix}.{name}")
        check(v >= minimum, f"{prefix}.{name}", f"must be >= {minimum}, got {show(v)}")
        check_int64(v, f"{prefix}.{name}")


def check_max(obj: object, prefix: str, maximum: float, why: str, *names: str) -> None:
    """Each named field of ``obj`` must be a number <= ``maximum``; ``why`` says what the bound protects."""
    for name in names:
        v = getattr(obj, name)
        check_number(v, f"{prefix}.{name}")
        check(v <= maximum, f"{prefix}.{name}", f"must be <= {maximum} ({why}), got {show(v)}")


def check_seed(obj: object, prefix: str, name: str = "seed") -> None:
    """A seed: an integer in [0, 2^32 - 1], NumPy's range."""
    v = getattr(obj, name)
    check(isinstance(v, int) and not isinstance(v, bool) and 0 <= v <= SEED_MAX, f"{prefix}.{name}",
          f"must be an integer in [0, {SEED_MAX}] (seeds are 32-bit, NumPy's range), got {show(v)}")


def check_prob(obj: object, prefix: str, *names: str) -> None:
    """Each named field of ``obj`` must be a probability in [0, 1]."""
    for name in names:
        v = getattr(obj, name)
        check_number(v, f"{prefix}.{name}")
        check(0.0 <= v <= 1.0, f"{prefix}.{name}", f"must be in [0, 1], got {show(v)}")


def check_one_of(value: object, key: str, choices: tuple) -> None:
    check(value in choices, key, f"must be one of {', '.join(map(repr, choices))}, got {value!r}")


def check_heads(d: int, heads: int, prefix: str, d_name: str = "d_model") -> None:
    check(d % heads == 0, f"{prefix}.heads", f"must divide {prefix}.{d_name} ({d}), got {heads}")


@dataclass
class PerceptionConfig:
    """Frame encoder: (B,T,C,H,W) -> (B,T,M,d_world) tokens, M = (image_size / patch_size)^2.

    ``encoder=dinov2`` reads a frozen pretrained DINOv2 from ``weights`` (its patch side, 14, is ``patch_size``;
    ``d_model``, ``layers``, ``heads`` and ``max_frames`` are the trained encoders' and go unused)."""

    encoder: str = "cnn"  # one of ENCODERS
    image_size: int = 64  # frames are resized to image_size x image_size
    channels: int = 3
    # ViT patch side; for the cnn, its total downsampling factor (a power of two). The tiny default keeps a 32 x 32
    # token grid at 64 px: at 16 x 16 (patch 4, 3x faster per stage-1 step) held-out ball FG-ARI fell from 0.94 to
    # 0.84 after 4000 steps (docs/benchmarks/history.md#throughput); PushT's recipe uses the faster layout
    patch_size: int = 2
    stem: str = "conv"  # cnn only, one of STEMS: stride-2 5x5 convs, or one patch_size-stride conv ("patch")
    d_model: int = 32  # encoder width
    layers: int = 4  # ViT blocks, or conv layers of the cnn
    heads: int = 4  # ViT attention heads (must divide d_model)
    d_world: int = 64  # width of the fused token space the slots read from
    max_frames: int = 32  # size of the learned temporal position embedding
    dropout: float = 0.0
    # encoder=dinov2: a directory saved by transformers' save_pretrained, or a hub id already in the local
    # Hugging Face cache (nothing is downloaded)
    weights: str | None = None

    def __post_init__(self) -> None:
        p = "model.perception"
        check_one_of(self.encoder, f"{p}.encoder", ENCODERS)
        check_one_of(self.stem, f"{p}.stem", STEMS)
        self._check_pretrained(p)
        check_max(self, p, 2048, "every frame is resized to image_size x image_size when the data is loaded; the "
                  "largest preset uses 224", "image_size")
        check_min(self, p, 1, "image_size", "channels", "patch_size", "d_model", "layers", "heads", "d_world",
                  "max_frames")
        check(self.channels == 3, f"{p}.channels",
              f"must be 3: every hclsm dataset reader serves RGB frames, got {self.channels}")
        check(self.image_size % self.patch_size == 0, f"{p}.patch_size",
              f"must divide model.perception.image_size ({self.image_size}), got {self.patch_size}")
        check_heads(self.d_model, self.heads, p)
        check_prob(self, p, "dropout")
        if self.encoder == "cnn":
            check(self.patch_size & (self.patch_size - 1) == 0, f"{p}.patch_size",
                  f"must be a power of two for the cnn encoder (its stride-2 layers), got {self.patch_size}")

    def _check_pretrained(self, p: str) -> None:
        """A frozen backbone needs its weights and its own patch side; the trained encoders take no weights."""
        patch = PRETRAINED_PATCH.get(self.encoder)
        if patch is None:
            check(self.weights is None, f"{p}.weights",
                  f"only a pretrained encoder ({', '.join(PRETRAINED_PATCH)}) loads weights; drop it or set "
                  f"{p}.encoder=dinov2, got {self.weights!r} with encoder {self.encoder!r}")
            return
        check(isinstance(self.weights, str) and self.weights.strip() != "", f"{p}.weights",
              f"the {self.encoder} encoder is a frozen pretrained backbone: set it to a directory saved by "
              f"transformers' save_pretrained (see the README, 'Pretrained perception'), got {self.weights!r}")
        check(self.patch_size == patch, f"{p}.patch_size",
              f"must be {patch} for the {self.encoder} encoder (its patch side), got {self.patch_size}; "
              f"set {p}.patch_size={patch}")
        check(isinstance(self.image_size, int) and self.image_size % patch == 0, f"{p}.image_size",
              f"must be a multiple of {self.encoder}'s patch ({patch}), e.g. {4 * patch} or {16 * patch}, "
              f"got {self.image_size!r}")

    @property
    def pretrained(self) -> bool:
        """Whether the encoder is a frozen pretrained backbone (its features are the feature target)."""
        return self.encoder in PRETRAINED_PATCH

    @property
    def grid_size(self) -> int:
        """Side of the token grid (tokens per frame = grid_size ** 2)."""
        return self.image_size // self.patch_size


@dataclass
class SlotConfig:
    """Slot attention over ``num_slots`` object proposals (+ a background slot), with existence and birth.

    Frame 0 runs ``iterations`` from learned per-slot queries; every later frame starts from the previous
    frame's slots and runs ``video_iterations``. Each object slot has an existence probability p_alive; a
    slot is alive when p_alive > ``alive_threshold``. Dead slots are re-armed as birth proposals seeded
    from what the alive slots failed to reconstruct on the previous frame; at evaluation the first frame
    gets ``settle_rounds`` such birth rounds on itself, so objects its initial slots missed are picked up
    before the clip starts instead of one per frame over its first frames.
    """

    num_slots: int = 7  # N_max object proposals (the background slot is extra)
    d_slot: int = 64
    iterations: int = 3  # slot-attention iterations on the first frame
    video_iterations: int = 1  # iterations on every later frame (slots carried over from the previous frame)
    mlp_hidden: int = 128  # hidden width of the residual slot MLP
    dynamic: bool = True  # existence gate + birth/death; False = every slot always alive (fixed-slot baseline)
    background: bool = True  # one extra always-alive slot for the background (not counted as an object)
    spatial_prior: bool = True  # slots start at learned positions; attention favours tokens near a slot
    query_noise: float = 1.0  # initial noise on the learned queries (x |query|), annealed to 0 ...
    noise_anneal: float = 0.3  # ... over this fraction of training (cosine)
    alive_threshold: float = 0.3  # (evaluation) a slot is alive when p_alive exceeds this ...
    min_area: float = 0.002  # ... and it is the top alpha on >= this share of the pixels (0 = no area rule)
    birth_min_new: float = 0.8  # (evaluation) share of a newborn slot's pixels that must come from the background layer
    settle_rounds: int = 3  # (evaluation) extra birth rounds on the first frame, one placed proposal each; 0 = off
    birth_threshold: float = 0.05  # mean squared residual of a pixel above which it counts as unexplained
    existence_sparsity: float = 0.02  # weight of the prior -log(1 - p_alive), averaged over the object slots
    existence_start: float = 0.5  # training progress at which existence gating and its prior switch on
    existence_ramp: float = 0.2  # progress over which the prior's weight ramps from 0 to existence_sparsity
    # a proprioception cue for the agent: the first object slot sits, on every frame, where the state's first two
    # dims put the agent (scaled by this to [-1, 1]; PushT: 512, its canvas) and stays alive; 0 = no cue
    cue_scale: float = 0.0

    def __post_init__(self) -> None:
        p = "model.slots"
        check_max(self, p, 100, "each iteration is one attention pass over every frame's tokens; slot attention "
                  "settles in 3 to 7", "iterations", "video_iterations", "settle_rounds")
        check_min(self, p, 1, "num_slots", "d_slot", "iterations", "video_iterations", "mlp_hidden")
        check_prob(self, p, "alive_threshold", "birth_threshold", "birth_min_new", "min_area", "noise_anneal",
                   "existence_start", "existence_ramp")
        check_min(self, p, 0.0, "existence_sparsity", "query_noise", "settle_rounds", "cue_scale")


@dataclass
class DecoderConfig:
    """Spatial broadcast decoder: each slot -> a (resolution x resolution) target map + an alpha logit.

    A slot is broadcast to a ``grid_size`` grid with its (x, y) coordinates (relative to the slot's
    attention centroid when ``relative_positions``, with ``fourier_octaves`` octaves of sin/cos features),
    run through ``layers`` layers of width ``hidden`` and ``kernel`` (1 = a per-cell MLP), then brought to
    ``resolution`` by ``upsample``: ``subpixel`` (each cell emits its own block of output pixels; cheap) or
    ``transposed`` (stride-2 transposed convolutions; the original layout). Pixel targets are the frames
    resized to ``resolution``; feature targets are a frozen pretrained backbone's patch features
    (``perception.encoder=dinov2``), else the EMA target encoder's tokens (either way ``resolution`` must equal
    the perception grid).
    """

    target: str = "pixels"  # one of DECODER_TARGETS
    hidden: int = 32
    layers: int = 3
    kernel: int = 1  # 1 = per-pixel MLP (cheapest), 3 = 3x3 convolutions
    grid_size: int = 16  # side of the grid each slot is broadcast to
    resolution: int = 32  # side of the decoded maps (a power-of-two multiple of grid_size)
    relative_positions: bool = True  # broadcast slot-relative coordinates (translation-equivariant decoding)
    upsample: str = "subpixel"  # one of UPSAMPLERS
    fourier_octaves: int = 0  # sin/cos octaves of the relative coordinates (0 = the coordinates alone)
    # object content squashed into [0, 1] like the pixels (pixel targets): a half-transparent object cannot make up for
    # the background showing through, so the reconstruction asks for opaque objects and sharp masks
    bounded_content: bool = True
    # the background slot paints the training frames' per-pixel median (the static scene) plus its own constant,
    # instead of a constant alone; set from the data when training starts
    static_background: bool = False
    # reconstruction weight of the pixels that differ from the static scene (the moving objects), relative to the
    # rest: w = 1 + foreground_weight * min(1, |target - static| / 0.1), normalised to mean 1; 0 = plain MSE
    foreground_weight: float = 0.0

    def __post_init__(self) -> None:
        p = "model.decoder"
        check_one_of(self.target, f"{p}.target", DECODER_TARGETS)
        check_one_of(self.upsample, f"{p}.upsample", UPSAMPLERS)
        check_min(self, p, 1, "hidden", "layers", "kernel", "grid_size", "resolution")
        check_min(self, p, 0, "fourier_octaves")
        check_min(self, p, 0.0, "foreground_weight")
        check(self.foreground_weight == 0 or self.static_background, f"{p}.foreground_weight",
              f"weighs pixels by how far they are from the static scene: it needs {p}.static_background=true")
        check(not self.static_background or self.target == "pixels", f"{p}.static_background",
              f"is a picture of the scene: it needs {p}.target=pixels, got {self.target!r}")
        check(self.fourier_octaves == 0 or self.relative_positions, f"{p}.fourier_octaves",
              f"needs {p}.relative_positions=true (the features are of slot-relative coordinates), "
              f"got {self.fourier_octaves}")
        check(self.kernel % 2 == 1, f"{p}.kernel", f"must be odd, got {self.kernel}")
        ratio = self.resolution // self.grid_size
        check(self.resolution % self.grid_size == 0 and ratio & (ratio - 1) == 0, f"{p}.resolution",
              f"must be grid_size ({self.grid_size}) times a power of two, got {self.resolution}")


@dataclass
class L0Config:
    """Level 0: per-object selective SSM (weight-shared across objects) plus a global track."""

    d_state: int = 16
    blocks: int = 1
    d_conv: int = 4  # causal depthwise conv width inside a block
    expand: int = 2  # inner width = expand * d_slot

    def __post_init__(self) -> None:
        check_min(self, "model.dynamics.l0", 1, "d_state", "blocks", "d_conv", "expand")


@dataclass
class L1Config:
    """Level 1: sparse event transformer over the timesteps the event detector fires on."""

    d_model: int = 64
    layers: int = 1
    heads: int = 4
    event_threshold_init: float = 0.7  # initial learned event threshold, strictly inside (0, 1)
    event_rate_min: float = 0.1  # the event-rate hinge keeps the mean event probability in [min, max]
    event_rate_max: float = 0.5
    event_temperature: float = 1.0  # tau of the straight-through gate sigmoid((logit - threshold_logit) / tau)
    event_target_quantile: float = 0.9  # the self-supervised event target is divided by this per-sequence quantile
    max_events: int = 32  # each step reads the most recent this many event steps (a rollout step's cost is bounded)

    def __post_init__(self) -> None:
        p = "model.dynamics.l1"
        check_min(self, p, 1, "d_model", "layers", "heads", "max_events")
        check_heads(self.d_model, self.heads, p)
        check_min(self, p, 0.0, "event_temperature")
        check(self.event_temperature > 0, f"{p}.event_temperature", f"must be > 0, got {self.event_temperature}")
        check_prob(self, p, "event_target_quantile")
        check(self.event_target_quantile > 0, f"{p}.event_target_quantile",
              f"must be in (0, 1], got {self.event_target_quantile}")
        # 0 and 1 have no logit: the reference crashed on exactly these (its two "ablations")
        check(0.0 < self.event_threshold_init < 1.0, f"{p}.event_threshold_init",
              f"must be strictly between 0 and 1, got {self.event_threshold_init}")
        check_prob(self, p, "event_rate_min", "event_rate_max")
        check(self.event_rate_min <= self.event_rate_max, f"{p}.event_rate_min",
              f"must be <= {p}.event_rate_max ({self.event_rate_max}), got {self.event_rate_min}")


@dataclass
class L2Config:
    """Level 2: learned summary queries compress past events into abstract goal-level tokens."""

    d_model: int = 64
    layers: int = 1
    heads: int = 4
    n_summary: int = 4  # number of abstract state tokens
    max_events: int = 32  # the summary at step t compresses the most recent this many event steps s <= t

    def __post_init__(self) -> None:
        p = "model.dynamics.l2"
        check_min(self, p, 1, "d_model", "layers", "heads", "n_summary", "max_events")
        check_heads(self.d_model, self.heads, p)


@dataclass
class DynamicsConfig:
    l0: L0Config = field(default_factory=L0Config)
    l1: L1Config = field(default_factory=L1Config)
    l2: L2Config = field(default_factory=L2Config)
    # stage 2's open-loop loss (``rollout``): the first rollout_context frames of a training clip are given,
    # then the dynamics runs rollout_horizon steps on its own predictions (fewer when the clip is shorter;
    # a fixed window, so its cost does not grow with the clip); rollout_context = 0 turns it off
    rollout_context: int = 3
    rollout_horizon: int = 5
    # frames per clip that the decoded terms (``frame`` and ``rollout``) decode and score: a random subset of
    # their steps, drawn anew every training step (an unbiased estimate at a fraction of the cost); 0 = all
    decoded_frames: int = 2
    # the position head's prior: the next position is the current one moved by velocity_prior x its velocity, plus
    # the learned correction. 1 = constant velocity (inertia: bouncing balls); 0 = objects stay put unless the
    # correction moves them (quasi-static scenes such as PushT, where the block stops when the push stops)
    velocity_prior: float = 1.0

    def __post_init__(self) -> None:
        check_min(self, "model.dynamics", 0, "rollout_context", "decoded_frames")
        check_min(self, "model.dynamics", 2, "rollout_horizon")
        check_prob(self, "model.dynamics", "velocity_prior")


@dataclass
class GNNConfig:
    """Relation graph over slots: all-pairs edge MLP and weighted message passing."""

    d_edge: int = 32
    rounds: int = 1
    chunk_size: int = 0  # receiver slots per chunk of the pair tensor; 0 = dense (all pairs at once)
    # edges also read the pair's geometry: the sender's position and velocity relative to the receiver's and their
    # distance (interaction networks' relative state), so a contact can be read off the edge directly instead of
    # from two LayerNormed tokens
    relative_geometry: bool = False

    def __post_init__(self) -> None:
        check_min(self, "model.gnn", 1, "d_edge", "rounds")
        check_min(self, "model.gnn", 0, "chunk_size")


@dataclass
class EpisodeGraphConfig:
    """Per-episode graph inference (``hclsm.nn.graph_inference``): an NRI-style encoder over the history, relaxed
    gates, a Huber likelihood of the state change, an ungated contact channel, penalties after a ranking exists.
    ``hclsm bench causal-states`` trains it on true states; ``model.causal.inference=episode`` puts its encoder in
    HCLSM's dynamics (``model.causal.episode``)."""

    d_hidden: int = 64
    temperature: float = 0.5  # binary-concrete temperature of the training gates
    logit_bound: float = 6.0  # logits = bound * tanh(raw / bound) (0 = unbounded)
    huber_delta: float = 0.1  # Huber's quadratic zone, in the target's units (px / frame^2 for velocity changes)
    # px: pairs whose gap is below this exchange ungated contact messages (the surface gap on true states, whose
    # radii are known; the centre distance in HCLSM's dynamics, whose slots have none: set it about two radii
    # larger there). 0 = no contact channel (the dynamics only; the states' decoder always has one)
    contact_reach: float = 3.0
    kl_weight: float = 0.01  # weight of the KL of each edge to a Bernoulli(prior), on from step 0
    prior: float = 0.1  # the prior probability of an edge
    sparsity_lambda: float = 0.0  # l1 of the edge probabilities, with the acyclicity after penalty_start
    rho_init: float = 0.1
    rho_max: float = 10.0
    rho_mult: float = 1.5
    update_every: int = 50
    penalty_start: int = 600  # training steps before the sparsity and acyclicity terms switch on
    penalty_ramp: int = 200
    # semi-amortised inference (``EpisodeGraph.refine``): Adam steps on each episode's logits against the decoder's
    # error on its history, from the encoder's graph (0 = the encoder's graph as is)
    refine_steps: int = 300
    refine_lr: float = 0.1
    refine_rho: float = 1000.0  # the least weight of h^2 while refining (10: the same edges, mean h 1.5e-4 > 1e-4)

    def __post_init__(self) -> None:
        p = "model.causal.episode"
        check_min(self, p, 1, "d_hidden", "update_every")
        check_min(self, p, 0, "refine_steps", "refine_lr", "refine_rho")
        check_min(self, p, 0, "penalty_start", "penalty_ramp", "sparsity_lambda", "kl_weight", "contact_reach",
                  "logit_bound")
        check(0.0 < self.prior < 1.0, f"{p}.prior", f"must be in (0, 1), got {self.prior}")
        check(self.temperature > 0, f"{p}.temperature", f"must be > 0, got {self.temperature}")
        check(self.huber_delta > 0, f"{p}.huber_delta", f"must be > 0, got {self.huber_delta}")
        check(self.rho_init > 0, f"{p}.rho_init", f"must be > 0, got {self.rho_init}")
        check(self.rho_max >= self.rho_init, f"{p}.rho_max", f"must be >= {p}.rho_init, got {self.rho_max}")
        check(self.rho_mult >= 1.0, f"{p}.rho_mult", f"must be >= 1, got {self.rho_mult}")


@dataclass
class CausalConfig:
    """Learned causal adjacency: Gumbel-sigmoid edges, l1 sparsity, NOTEARS augmented Lagrangian."""

    # tiny: off (as the seed's tiny); the GPU presets turn it on. On, every message between objects in the
    # dynamics is gated by the graph (see hclsm.nn.causal)
    enabled: bool = False
    sparsity_lambda: float = 0.01
    rho_init: float = 0.1  # initial quadratic DAG-penalty weight
    rho_max: float = 10.0
    rho_mult: float = 1.5  # rho *= rho_mult when h(A) did not drop enough
    temperature_init: float = 1.0  # Gumbel-sigmoid temperature, annealed towards temperature_min
    temperature_min: float = 0.1
    anneal_steps: int = 1000  # graph training steps over which the temperature falls to temperature_min
    update_every: int = 50  # optimizer steps between augmented-Lagrangian updates (alpha, rho)
    # the sparsity and acyclicity terms switch on after penalty_start graph training steps and ramp to full
    # weight over penalty_ramp more (the prediction loss alone shapes the graph before). Counted in the
    # graph's own steps (stage 2), not the run's progress: see hclsm.nn.causal
    penalty_start: int = 300
    penalty_ramp: int = 200
    # step: the graph above (a running mean of per-step evidence, hard straight-through gates: hclsm.nn.causal);
    # episode: the episode-graph encoder (hclsm.nn.graph_inference.DynamicsEpisodeGraph: evidence pooled over the
    # history so far, relaxed gates, a contact channel, the KL prior and penalties of ``episode``, whose fields
    # replace the ones above)
    inference: str = "step"
    episode: EpisodeGraphConfig = field(default_factory=EpisodeGraphConfig)

    def __post_init__(self) -> None:
        p = "model.causal"
        if isinstance(self.episode, dict):
            self.episode = EpisodeGraphConfig(**self.episode)
        check_one_of(self.inference, f"{p}.inference", CAUSAL_INFERENCE)
        check_min(self, p, 0.0, "sparsity_lambda")
        check_min(self, p, 1, "update_every")
        check_min(self, p, 0, "penalty_start", "penalty_ramp", "anneal_steps")
        check(self.rho_init > 0, f"{p}.rho_init", f"must be > 0, got {self.rho_init}")
        check(self.rho_max >= self.rho_init, f"{p}.rho_max",
              f"must be >= {p}.rho_init ({self.rho_init}), got {self.rho_max}")
        check(self.rho_mult >= 1.0, f"{p}.rho_mult", f"must be >= 1, got {self.rho_mult}")
        check(self.temperature_min > 0, f"{p}.temperature_min", f"must be > 0, got {self.temperature_min}")
        check(self.temperature_init >= self.temperature_min, f"{p}.temperature_init",
              f"must be >= {p}.temperature_min ({self.temperature_min}), got {self.temperature_init}")


@dataclass
class SlotWorldConfig:
    """The SlotSSM family as world models (``model.name`` ``slotssm`` / ``oc_slotssm``, ``hclsm.models.slot_world``): the
    sizes of the paper's models beside what they share with HCLSM (slot width and count from ``model.slots``, the SSM's
    state size and expansion from ``model.dynamics.l0``, OC-SlotSSM's CNN from ``model.perception``)."""

    layers: int = 2  # SlotSSM layers (each: slot read, per-slot SSM, slot mixer)
    heads: int = 4  # slot-mixer attention heads; must divide model.slots.d_slot
    patch: int = 4  # slotssm: side of the pixel patches each frame is cut into (its input tokens)

    def __post_init__(self) -> None:
        check_min(self, "model.slot_world", 1, "layers", "heads", "patch")


@dataclass
class MemoryConfig:
    """Episodic modern-Hopfield memory of object states, read by the dynamics at every step (seed Layer 5,
    ``hclsm.nn.memory``): one memory per sequence, empty at its start, written by novelty."""

    # tiny: off (it changes the dynamics, and the recorded tiny benchmarks were trained without it); the GPU
    # presets turn it on. On, every object's L0 state reads the memory of the earlier steps
    enabled: bool = False
    size: int = 64  # most entries a sequence's memory holds; when full, the least recently used one is replaced
    d_memory: int = 32  # width of the read's query / key / value space
    # a state is written only when its best cosine similarity to the stored entries is below this
    write_threshold: float = 0.9
    beta: float = 8.0  # inverse temperature of the Hopfield softmax: the read's initial value (then learned)

    def __post_init__(self) -> None:
        p = "model.memory"
        check_min(self, p, 1, "size", "d_memory")
        check(isinstance(self.write_threshold, (int, float)) and -1.0 <= self.write_threshold <= 1.0,
              f"{p}.write_threshold", f"must be a cosine similarity in [-1, 1], got {self.write_threshold!r}")
        check(isinstance(self.beta, (int, float)) and math.isfinite(self.beta) and self.beta > 0, f"{p}.beta",
              f"must be a finite number > 0, got {self.beta!r}")


@dataclass
class ModelConfig:
    name: str = "hclsm"  # one of MODEL_NAMES
    d_action: int = 2  # action width (PushT: 2); 0 = no action conditioning
    # the dynamics read each action as a / action_scale * 2 - 1 (PushT: 512, its action box [0, 512] -> [-1, 1]), so
    # the action's embedding starts at the scale of the other inputs; 0 = read as given
    action_scale: float = 0.0
    perception: PerceptionConfig = field(default_factory=PerceptionConfig)
    slots: SlotConfig = field(default_factory=SlotConfig)
    decoder: DecoderConfig = field(default_factory=DecoderConfig)
    dynamics: DynamicsConfig = field(default_factory=DynamicsConfig)
    gnn: GNNConfig = field(default_factory=GNNConfig)
    causal: CausalConfig = field(default_factory=CausalConfig)
    memory: MemoryConfig = field(default_factory=MemoryConfig)
    slot_world: SlotWorldConfig = field(default_factory=SlotWorldConfig)

    def __post_init__(self) -> None:
        check_one_of(self.name, "model.name", MODEL_NAMES)
        if self.name in ("slotssm", "oc_slotssm"):
            d, heads = self.slots.d_slot, self.slot_world.heads
            check(d % heads == 0, "model.slot_world.heads", f"must divide model.slots.d_slot ({d}), got {heads}")
        if self.name == "slotssm":
            size, patch = self.perception.image_size, self.slot_world.patch
            check(size % patch == 0, "model.slot_world.patch",
                  f"must divide model.perception.image_size ({size}), got {patch}")
        check_min(self, "model", 0, "d_action", "action_scale")
        grid = self.perception.grid_size
        check(self.slots.num_slots <= grid * grid, "model.slots.num_slots",
              f"must be <= the {grid * grid} tokens per frame ((model.perception.image_size / patch_size) ** 2 = "
              f"{grid}x{grid}) the slots compete for, got {self.slots.num_slots}")
        if self.decoder.target == "features":
            check(self.decoder.resolution == grid, "model.decoder.resolution",
                  f"must equal the perception grid ({grid}: model.perception.image_size / patch_size) for feature "
                  f"targets, got {self.decoder.resolution}; set model.decoder.resolution={grid} and "
                  f"model.decoder.grid_size to it or a power-of-two fraction of it")
