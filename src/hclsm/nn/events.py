"""Level 1 of the HCLSM dynamics: an event detector and a sparse transformer over the detected events.

``EventDetector`` scores every step of a (B, T, d) state sequence from causal multi-scale temporal
differences (first differences at scales 1, 2, 4, the second difference, and their norms), a stack of
causal dilated convolutions (dilations 1, 2, 4, left padding only) and an MLP head. Its gate is hard 0/1 in
value but carries a straight-through gradient to both the event logit and a **learnable threshold**::

    soft = sigmoid((logit - threshold_logit) / tau)
    gate = (soft > 0.5) + (soft - soft.detach())

(the reference compared against its threshold, so the threshold never learned). The head's output bias
starts at the threshold logit, where the soft gate is steepest. ``losses`` keeps both the mean event
probability and the fraction of steps that fire (the gate, straight-through: this trains the threshold at
every step, even while nothing fires) inside [rate_min, rate_max], and fits the probability to a
self-supervised target: the dynamics' own surprise when given, otherwise the size of the state change,
normalised per sequence.

``EventTransformer`` lets every step attend to the **past event steps** (gate == 1, time <= t), across
time and objects: the query for object n at step t reads the tokens of every object at every event step
s <= t (the reference attended only within one event frame, never across events). Attention scores get
two learned per-head biases, one for the same object (so an object finds its own history) and a recency
slope ``-slope_h * (t - s)``; values are scaled by the gate value, so the downstream loss reaches the gate
(and through it the detector and its threshold) at the event steps. Non-event steps are not gathered, so
they get no such gradient: they learn to fire through ``losses`` and the threshold. A learned null
key/value is always attendable, so a step with no past event reads a learned context instead of an
all-masked softmax. With a causal graph (B, T, N, N) [receiver, sender], object i at step t reads only its
own and its parents' tokens.

Sparsity: the K <= T event steps of each sample are gathered (vectorised, padded to the batch's K_max),
and per layer only the event tokens are keys, so attention costs O(T N x K N). The layers form a causal
stack: the keys of layer l are the layer-(l-1) outputs at the event steps, which depend on events <= s
only. ``forward_last`` runs the stack on the event steps plus the last step alone (one rollout step).
The softmax is in fp32 even under bf16 autocast.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

from hclsm.config.model import L1Config

SCALES = (1, 2, 4)  # temporal difference scales, and the conv dilations


def shift_back(x: torch.Tensor, s: int) -> torch.Tensor:
    """x[:, max(t - s, 0)] for every t of a (B, T, ...) tensor: causal lag, the first frame repeated."""
    idx = (torch.arange(x.shape[1], device=x.device) - s).clamp_min(0)
    return x[:, idx]


def gather_events(gate: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Event steps of a (B, T) gate (value > 0.5), in time order: indices (B, K_max) and valid (B, K_max).

    Padding entries point at step 0 and are invalid; K_max = the batch's largest event count (may be 0).
    """
    hard = (gate.detach() > 0.5).to(torch.int8)
    k_max = int(hard.sum(1).max()) if gate.numel() else 0
    order = torch.sort(hard, dim=1, descending=True, stable=True)  # events first, each group in time order
    valid = order.values[:, :k_max].bool()  # (B, K)
    return order.indices[:, :k_max].masked_fill(~valid, 0), valid


def gather_steps(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """x (B, T, *rest) at step indices idx (B, K) -> (B, K, *rest)."""
    index = idx.reshape(*idx.shape, *([1] * (x.dim() - 2))).expand(*idx.shape, *x.shape[2:])
    return torch.gather(x, 1, index)


def recency_slopes(heads: int) -> nn.Parameter:
    """Per-head recency slopes, parametrised by softplus and initialised at 1/2, 1/4, ... (ALiBi-like)."""
    slopes = torch.tensor([2.0 ** -(h + 1) for h in range(heads)])
    return nn.Parameter(torch.log(torch.expm1(slopes)))  # inverse softplus


def event_bias(q_times: torch.Tensor, ev_times: torch.Tensor, ev_valid: torch.Tensor, slope_param: torch.Tensor,
               max_events: int = 0) -> torch.Tensor:
    """Additive attention bias (B, H, Q, K): ``-slope_h * (t - s)`` for events s <= t, -inf elsewhere.

    q_times (B, Q) query steps, ev_times (B, K) event steps in time order (``gather_events``), ev_valid (B, K)
    real (not padding) events. With ``max_events`` > 0 a query reads only the most recent ``max_events`` events
    s <= t, so a rollout step's cost is bounded whatever the history's length.
    """
    dt = (q_times[:, :, None] - ev_times[:, None, :]).float()  # (B, Q, K)
    allowed = (dt >= 0) & ev_valid[:, None, :]
    if max_events > 0:  # an event is readable while at most max_events - 1 readable events come after it
        after = allowed.flip(-1).cumsum(-1).flip(-1)  # (B, Q, K) readable events at or after each one
        allowed &= after <= max_events
    bias = -F.softplus(slope_param)[None, :, None, None] * dt.clamp_min(0)[:, None]  # (B, H, Q, K)
    return bias.masked_fill(~allowed[:, None], float("-inf"))


class MemoryBlock(nn.Module):
    """Pre-LN cross-attention from query tokens to memory tokens plus one learned null token, then an MLP.

    Both are residual. ``bias`` (B, H, Q, M) is added to the scores (-inf masks a memory token);
    ``weight`` (B, M) scales the memory values (the event gate: its straight-through gradient flows here).
    Scores, softmax and the weighted sum run in fp32 with autocast off.
    """

    def __init__(self, d: int, heads: int, mlp_ratio: int = 2):
        super().__init__()
        self.heads = heads
        self.norm_q, self.norm_m, self.norm_mlp = nn.LayerNorm(d), nn.LayerNorm(d), nn.LayerNorm(d)
        self.q = nn.Linear(d, d)
        self.kv = nn.Linear(d, 2 * d)
        self.null_kv = nn.Parameter(torch.randn(2, d) * 0.02)  # key and value of the always-valid null token
        self.out = nn.Linear(d, d)
        self.mlp = nn.Sequential(nn.Linear(d, mlp_ratio * d), nn.GELU(), nn.Linear(mlp_ratio * d, d))

    def forward(self, x: torch.Tensor, mem: torch.Tensor, bias: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """x (B, Q, d), mem (B, M, d), bias (B, H, Q, M), weight (B, M) -> (B, Q, d)."""
        B, Q, d = x.shape
        H = self.heads
        q = self.q(self.norm_q(x)).view(B, Q, H, d // H).transpose(1, 2)  # (B, H, Q, dh)
        k, v = self.kv(self.norm_m(mem)).chunk(2, dim=-1)  # (B, M, d) each
        v = v * weight[..., None].to(v.dtype)
        null_k, null_v = self.null_kv.to(k.dtype).view(2, 1, 1, d).expand(2, B, 1, d)  # (B, 1, d) each
        k = torch.cat([null_k, k], dim=1).view(B, -1, H, d // H).transpose(1, 2)  # (B, H, 1 + M, dh)
        v = torch.cat([null_v, v], dim=1).view(B, -1, H, d // H).transpose(1, 2)
        bias = F.pad(bias.float(), (1, 0))  # the null column: bias 0, never masked
        with torch.autocast(x.device.type, enabled=False):
            scores = q.float() @ k.float().transpose(-1, -2) / math.sqrt(d // H) + bias  # (B, H, Q, 1 + M)
            y = scores.softmax(-1) @ v.float()  # (B, H, Q, dh)
        x = x + self.out(y.transpose(1, 2).reshape(B, Q, d).to(x.dtype))
        return x + self.mlp(self.norm_mlp(x))


@dataclass
class EventMemory:
    """A rollout's most recent event steps (at most ``capacity``): all that L1 and L2 read of the past, so a
    rollout step costs the same whatever the history's length.

    One row per event stream (the batch, or batch x objects when each object has its own events). Entries are in
    time order and right-aligned: valid ones last, the oldest dropped when a new event comes to a full memory. The
    memory starts empty and grows by one entry per step that has an event somewhere, up to ``capacity`` (a short
    rollout never pays for a long memory). For each entry: L1's block inputs at that step (a KV cache: they depend
    on the steps <= it only), L2's memory token, the objects' alive flags, the event gate and the step index."""

    capacity: int  # most entries kept
    keys: list[torch.Tensor]  # per L1 block: (R, M, N, d1)
    summary: torch.Tensor  # (R, M, d2) L2's memory tokens
    alive: torch.Tensor | None  # (R, M, N)
    gate: torch.Tensor  # (R, M) the event gate (0 where no entry)
    time: torch.Tensor  # (R, M) int64
    valid: torch.Tensor  # (R, M) bool

    @staticmethod
    def empty(rows: int, capacity: int, n: int, d1: int, layers: int, d2: int, alive: bool = True,
              device: torch.device | None = None, dtype: torch.dtype = torch.float32) -> EventMemory:
        z = functools.partial(torch.zeros, device=device)
        return EventMemory(capacity, [z(rows, 0, n, d1, dtype=dtype) for _ in range(layers)],
                           z(rows, 0, d2, dtype=dtype), z(rows, 0, n, dtype=dtype) if alive else None,
                           z(rows, 0, dtype=dtype), z(rows, 0, dtype=torch.long), z(rows, 0, dtype=torch.bool))

    @staticmethod
    def recent(gate: torch.Tensor, capacity: int, keys: list[torch.Tensor], summary: torch.Tensor,
               alive: torch.Tensor | None) -> EventMemory:
        """The memory a whole sequence leaves: its last ``capacity`` event steps of ``gate`` (R, T), with L1's block
        inputs (R, T, N, d1), L2's tokens (R, T, d2) and alive (R, T, N) gathered there."""
        hard = (gate.detach() > 0.5).to(torch.int8)
        width = min(capacity, int(hard.sum(1).max()) if hard.numel() else 0)  # no wider than the events need
        pos = torch.sort(hard, dim=1, stable=True).indices[:, hard.shape[1] - width:]  # the events last, in order
        valid = hard.gather(1, pos).bool()
        return EventMemory(capacity, [gather_steps(k, pos) for k in keys], gather_steps(summary, pos),
                           None if alive is None else gather_steps(alive, pos), gather_steps(gate, pos) * valid, pos,
                           valid)

    def with_step(self, time: torch.Tensor, gate: torch.Tensor, alive: torch.Tensor | None
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Times, valid flags, gates (R, M + 1) and alive (R, M + 1, N) of the entries followed by the current
        step (time (R,), gate (R,), alive (R, N)), which is an event entry when its gate fires."""
        return (torch.cat([self.time, time[:, None]], 1), torch.cat([self.valid, gate[:, None].detach() > 0.5], 1),
                torch.cat([self.gate, gate[:, None]], 1),
                None if alive is None else torch.cat([self.alive, alive[:, None]], 1))

    def push(self, keys: list[torch.Tensor], summary: torch.Tensor, alive: torch.Tensor | None, gate: torch.Tensor,
             time: torch.Tensor) -> EventMemory:
        """The memory after a step (its L1 block inputs [(R, N, d1)], L2 token (R, d2), alive, gate, time (R,)):
        where the step is an event, every entry moves one place left (the oldest drops out) and it comes last."""
        event = gate.detach() > 0.5  # (R,)
        if not bool(event.any()):
            return self
        grow = self.valid.shape[1] < self.capacity  # room left: one more entry (empty in the rows without an event)

        def shift(buf: torch.Tensor, new: torch.Tensor) -> torch.Tensor:
            moved = torch.cat([buf[:, 1 - grow:], new[:, None].to(buf.dtype)], dim=1)
            kept = torch.cat([buf.new_zeros(buf.shape[0], 1, *buf.shape[2:]), buf], dim=1) if grow else buf
            return torch.where(event.view(-1, *([1] * (buf.dim() - 1))), moved, kept)

        return EventMemory(self.capacity, [shift(k, n) for k, n in zip(self.keys, keys)], shift(self.summary, summary),
                           None if alive is None else shift(self.alive, alive), shift(self.gate, gate),
                           shift(self.time, time), shift(self.valid, event))


@dataclass
class EventOutput:
    logit: torch.Tensor  # (B, T) event logit
    prob: torch.Tensor  # (B, T) sigmoid(logit), in (0, 1)
    gate: torch.Tensor  # (B, T) hard 0/1 value, straight-through gradient to logit and threshold
    threshold: torch.Tensor  # () sigmoid(threshold_logit): the learned event threshold


@dataclass
class DetectorState:
    """What the event detector carries from step to step: its last inputs (B, max(SCALES) + 1, d) (None before
    the first step) and, per convolution, its inputs at the steps its kernel still reaches (B, h, 2 * dilation)."""

    past: torch.Tensor | None
    tails: list[torch.Tensor]


class EventDetector(nn.Module):
    def __init__(self, d_in: int, cfg: L1Config):
        super().__init__()
        self.cfg = cfg
        h = cfg.d_model
        self.proj = nn.Linear(4 * d_in + 4, h)  # 3 first differences, 1 second difference, their 4 norms
        self.convs = nn.ModuleList(nn.Conv1d(h, h, kernel_size=3, dilation=s) for s in SCALES)
        self.norm = nn.LayerNorm(h)
        self.head = nn.Sequential(nn.Linear(h, h), nn.GELU(), nn.Linear(h, 1))
        p = cfg.event_threshold_init
        # shape (1,), not (): FSDP shards 1-D parameters only
        self.threshold_logit = nn.Parameter(torch.tensor([math.log(p / (1 - p))]))
        with torch.no_grad():  # start at the threshold, where the straight-through gradient is largest
            self.head[-1].bias.fill_(math.log(p / (1 - p)))

    @staticmethod
    def features(states: torch.Tensor) -> torch.Tensor:
        """(B, T, d) -> (B, T, 4 d + 4): causal differences at scales 1, 2, 4, acceleration, log1p norms."""
        diffs = [states - shift_back(states, s) for s in SCALES]
        diffs.append(diffs[0] - shift_back(diffs[0], 1))  # x_t - 2 x_{t-1} + x_{t-2}
        # sqrt(. + eps): no NaN gradient at the zero difference of the first frame
        norms = [torch.log1p((d.float().pow(2).sum(-1, keepdim=True) + 1e-8).sqrt()).to(d.dtype) for d in diffs]
        return torch.cat(diffs + norms, dim=-1)

    def _gate(self, logit: torch.Tensor) -> EventOutput:
        soft = torch.sigmoid((logit - self.threshold_logit) / self.cfg.event_temperature)
        gate = (soft > 0.5).float() + (soft - soft.detach())  # value exactly 0/1
        return EventOutput(logit, torch.sigmoid(logit), gate, torch.sigmoid(self.threshold_logit[0]))

    def forward(self, states: torch.Tensor, return_state: bool = False):
        """(B, T, d_in) -> per-step event logit, probability and gate; step t reads states <= t only. With
        ``return_state`` also the ``DetectorState`` that ``step`` continues from."""
        y = self.proj(self.features(states)).transpose(1, 2)  # (B, h, T)
        tails = []
        for conv in self.convs:
            pad = (conv.kernel_size[0] - 1) * conv.dilation[0]
            padded = F.pad(y, (pad, 0))  # left padding only: causal
            tails.append(padded[..., padded.shape[-1] - pad:])  # what the next step's conv reads of the past
            y = y + F.gelu(conv(padded))
        out = self._gate(self.head(self.norm(y.transpose(1, 2))).squeeze(-1).float())  # (B, T)
        if not return_state:
            return out
        lag = max(SCALES)  # the differences' reach into the past; before the first step it repeats
        past = states[:, -(lag + 1):]
        past = torch.cat([past[:, :1].expand(-1, lag + 1 - past.shape[1], -1), past], dim=1)
        return out, DetectorState(past, tails)

    def init_state(self, batch: int, device: torch.device | None = None, dtype: torch.dtype = torch.float32
                   ) -> DetectorState:
        h = self.cfg.d_model
        return DetectorState(None, [torch.zeros(batch, h, (c.kernel_size[0] - 1) * c.dilation[0], device=device,
                                                dtype=dtype) for c in self.convs])

    def step(self, x: torch.Tensor, state: DetectorState) -> tuple[EventOutput, DetectorState]:
        """One step: the input (B, d_in) and the state after the steps before -> the step's event output (each
        (B,), == ``forward``'s at that step) and the new state. O(1): the last ``max(SCALES)`` inputs and each
        convolution's reach into the past are all it keeps."""
        past = x[:, None].expand(-1, max(SCALES), -1) if state.past is None else state.past[:, 1:]
        window = torch.cat([past, x[:, None]], dim=1)  # (B, lag + 1, d) the inputs t - lag .. t
        y = self.proj(self.features(window)[:, -1])[..., None]  # (B, h, 1)
        tails = []
        for conv, tail in zip(self.convs, state.tails):
            padded = torch.cat([tail, y], dim=-1)  # (B, h, pad + 1): exactly the inputs the conv reads at t
            tails.append(padded[..., 1:])
            y = y + F.gelu(conv(padded))
        out = self._gate(self.head(self.norm(y[..., 0])).squeeze(-1).float())  # (B,)
        return out, DetectorState(window, tails)

    def losses(self, out: EventOutput, states: torch.Tensor, surprise: torch.Tensor | None = None
               ) -> dict[str, torch.Tensor]:
        """``rate``: hinges keeping each sequence's mean probability and its fraction of event steps (the
        straight-through gate) in [event_rate_min, event_rate_max];
        ``signal``: BCE of the probability against a self-supervised target in [0, 1].

        The target is ``surprise`` (B, T) when given (the dynamics' per-step prediction error, detached
        by the caller), else |x_t - x_{t-1}| over steps >= 1; each sequence is divided by its
        ``event_target_quantile`` quantile and clipped to 1, so the top steps of every clip are events.
        """
        cfg = self.cfg
        rate = torch.stack([out.prob.mean(1), out.gate.mean(1)])  # (2, B)
        rate_loss = (F.relu(cfg.event_rate_min - rate) + F.relu(rate - cfg.event_rate_max)).sum(0).mean()
        logit = out.logit
        if surprise is None:
            target = (states[:, 1:] - states[:, :-1]).detach().float().norm(dim=-1)  # (B, T - 1)
            logit = logit[:, 1:]
        else:
            target = surprise.detach().float()
        if target.shape[1] == 0:
            return {"rate": rate_loss, "signal": logit.new_zeros(())}
        scale = torch.quantile(target, cfg.event_target_quantile, dim=1, keepdim=True).clamp_min(1e-6)
        target = (target / scale).clamp(0.0, 1.0)
        return {"rate": rate_loss, "signal": F.binary_cross_entropy_with_logits(logit, target)}


class EventTransformer(nn.Module):
    def __init__(self, d_slot: int, cfg: L1Config):
        super().__init__()
        d = cfg.d_model
        self.proj_in = nn.Linear(d_slot, d)
        self.blocks = nn.ModuleList(MemoryBlock(d, cfg.heads) for _ in range(cfg.layers))
        self.slope = recency_slopes(cfg.heads)  # shared by the layers
        self.same_object = nn.Parameter(torch.ones(cfg.heads))  # score bonus for an object's own history
        self.norm = nn.LayerNorm(d)
        self.proj_out = nn.Linear(d, d_slot)
        self.max_events = cfg.max_events

    def forward(self, states: torch.Tensor, gate: torch.Tensor, alive: torch.Tensor | None = None,
                graph: torch.Tensor | None = None, return_layers: bool = False):
        """states (B, T, N, d_slot), gate (B, T), optional alive (B, T, N) -> event context (B, T, N, d_slot).

        Step t attends to the objects of the event steps s <= t (the most recent ``max_events`` of them); objects
        with alive <= 0.5 at an event step are not keys there (and soft alive scales their values). With a causal
        ``graph`` (B, T, N, N) [receiver, sender], object i at step t reads only its own history and that of its
        parents at t. With ``return_layers`` also every block's input (B, T, N, d) (what ``step`` keeps of events).
        """
        B, T, N, _ = states.shape
        idx, valid = gather_events(gate)
        bias, weight = self._bias(torch.arange(T, device=gate.device).expand(B, T), idx, valid,
                                  gather_steps(gate, idx), None if alive is None else gather_steps(alive, idx), graph,
                                  N)
        h, layers = self.proj_in(states), []  # (B, T, N, d)
        for block in self.blocks:
            layers.append(h)
            mem = gather_steps(h, idx).flatten(1, 2)  # (B, K N, d): layer-(l-1) event tokens
            h = block(h.flatten(1, 2), mem, bias, weight).view(B, T, N, -1)
        out = self.proj_out(self.norm(h))
        return (out, layers) if return_layers else out

    def step(self, states: torch.Tensor, gate: torch.Tensor, alive: torch.Tensor | None, graph: torch.Tensor | None,
             time: torch.Tensor, memory: EventMemory) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """One step of a rollout: states (R, N, d_slot), gate (R,), alive (R, N), graph (R, N, N) of step ``time``
        (R,), and the block inputs of the most recent event steps -> the step's output (R, N, d_slot) (==
        ``forward``'s at that step) and its own block inputs [(R, N, d)] (kept when the step is an event)."""
        R, N, _ = states.shape
        times, valid, gates, alives = memory.with_step(time, gate, alive)
        bias, weight = self._bias(time[:, None], times, valid, gates, alives,
                                  None if graph is None else graph[:, None], N)
        h, layers = self.proj_in(states), []  # (R, N, d)
        for block, keys in zip(self.blocks, memory.keys):
            layers.append(h)
            mem = torch.cat([keys, h[:, None]], dim=1).flatten(1, 2)  # (R, (M + 1) N, d)
            h = block(h, mem, bias, weight)
        return self.proj_out(self.norm(h)), layers

    def _bias(self, q_times: torch.Tensor, ev_times: torch.Tensor, ev_valid: torch.Tensor, ev_gate: torch.Tensor,
              ev_alive: torch.Tensor | None, graph: torch.Tensor | None, N: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Attention bias (B, H, S N, K N) and value weights (B, K N) of queries at times q_times (B, S) over the
        N objects of K event entries (times ev_times, valid, gate values, alive (B, K, N)); ``graph`` (B, S, N, N)
        at the query steps."""
        B, K = ev_times.shape
        weight = (ev_gate * ev_valid)[:, :, None].expand(B, K, N)  # (B, K, N)
        key_ok = ev_valid[:, :, None].expand(B, K, N)
        if ev_alive is not None:
            weight, key_ok = weight * ev_alive, key_ok & (ev_alive > 0.5)
        time_bias = event_bias(q_times, ev_times, ev_valid, self.slope, self.max_events)  # (B, H, S, K)
        eye = torch.eye(N, device=ev_times.device)
        obj_bias = self.same_object[:, None, None] * eye  # (H, N, N)
        bias = time_bias[:, :, :, None, :, None] + obj_bias[None, :, None, :, None, :]  # (B, H, S, N, K, N)
        bias = bias.masked_fill(~key_ok[:, None, None, None], float("-inf"))
        if graph is not None:  # object i reads object j != i only when j is a parent of i
            barred = (graph.detach() <= 0.5) & (eye == 0)  # (B, S, N, N)
            bias = bias.masked_fill(barred[:, None, :, :, None, :], float("-inf"))
        return bias.flatten(4).flatten(2, 3), weight.flatten(1)
