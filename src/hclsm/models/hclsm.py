"""HCLSM: the hierarchical causal latent state machine (seed 000).

Perception and object layers (seed Layers 1-2, ``ObjectDecomposer``) and the hierarchical dynamics
(Layer 3, ``HierarchicalDynamics``), trained in two stages (seed, "Training"):

* **stage 1** reconstructs the frames through the spatial broadcast decoder (``sbd``) with slot
  ``diversity``, the ``existence`` prior and ``object_area``;
* **stage 2** adds the dynamics: at every step t the dynamics predicts the slots and positions of t + 1.
  ``jepa`` scores the slots in latent space against **target slots** from an EMA copy of the object
  layers (run deterministically, in eval mode); the EMA copy draws its own slots, in its own order, so
  its slots of each frame are first aligned to the online slots by Sinkhorn matching. ``obj`` scores the
  predicted positions against where each slot is at t + 1, and ``frame`` the prediction decoded through
  the spatial broadcast decoder against frame t + 1 (what a rollout shows). ``event`` trains the event
  detector: an event-rate hinge plus fitting the event probability to the dynamics' own surprise (its
  per-step prediction error). ``rollout`` is the open-loop term: from the first
  ``model.dynamics.rollout_context`` frames of a clip the dynamics runs ``rollout_horizon`` steps on its own
  predictions, decoded and scored against the frames. The stage-1 losses stay on (``sbd`` at its
  stage-2 weight).

The dynamics predicts each next position as the current one moved by its velocity plus a learned correction
(``HierarchicalDynamics``): with the spatial broadcast decoder's slot-relative coordinates, moving a slot's
position moves what it draws.

``rollout`` predicts future frames autoregressively from context frames (and actions), decoding the
predicted slots through the spatial broadcast decoder.

With ``model.causal.enabled`` the dynamics reads other objects only along a learned causal graph (Layer 4,
``hclsm.nn.causal``); stage 2 then adds ``causal`` (edge sparsity + the NOTEARS augmented Lagrangian) and
logs ``acyclicity`` (h(A)), whose multipliers ``after_step`` updates.

With ``model.memory.enabled`` the dynamics reads an episodic modern-Hopfield memory of the earlier steps' object
states at every step (Layer 5, ``hclsm.nn.memory``); it is trained by the prediction losses through its read.
The continual-learning half of Layer 5, EWC across a sequence of datasets, is in the training loop
(``hclsm.train.ewc``, ``hclsm train --continual``).
"""
from __future__ import annotations

import copy
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.nn import functional as F

from hclsm import keys
from hclsm.config.model import ModelConfig
from hclsm.models.dynamics import DynamicsOutput, HierarchicalDynamics, fold, tile_batch
from hclsm.models.interventions import Intervention, apply_to_state
from hclsm.models.objects import ObjectDecomposer, ObjectOutput, agent_cue
from hclsm.models.pretrained import Pretrained
from hclsm.nn.chunks import map_chunks
from hclsm.nn.events import gather_steps
from hclsm.nn.matching import permute, sinkhorn_match
from hclsm.utils.profiling import scope

POSITION_MATCH_WEIGHT = 2.0  # weight of the position in the cost that aligns target slots to online slots
DECODE_CHUNK = 32  # frames per decoder pass in the decoded-prediction losses (see decoded_mse)


@dataclass
class HCLSMOutput:
    objects: ObjectOutput
    dynamics: DynamicsOutput | None = None  # stage 2 only
    losses: dict[str, torch.Tensor] = field(default_factory=dict)


@dataclass
class Rollout:
    """An autoregressive prediction of ``horizon`` frames after the context frames."""

    slots: torch.Tensor  # (B, H, K, d_slot)
    positions: torch.Tensor  # (B, H, K, 2)
    alive: torch.Tensor  # (B, K) bool: the slots alive on the last context frame, after any intervention (kept)
    frames: torch.Tensor  # (B, H, C, R, R) decoded predictions
    events: torch.Tensor  # (B, C + H - 1) event gate of every step the dynamics ran
    context: ObjectOutput  # the object decomposition of the context frames


def pick_steps(x: torch.Tensor, pick: torch.Tensor | None) -> torch.Tensor:
    """x (B, T, ...) at the steps ``pick`` (B, n) of each sequence (all T when None), flattened to (B * n, ...)."""
    return (x if pick is None else gather_steps(x, pick)).flatten(0, 1)


def align_targets(online: ObjectOutput, target: ObjectOutput) -> tuple[torch.Tensor, torch.Tensor]:
    """Target slots (B, T, K, d) and their alive flags (B, T, K) reordered frame by frame to match the online
    slots.

    Cost: squared distance between ``[normalised slot; POSITION_MATCH_WEIGHT * position]`` vectors. The
    background slot (index 0 when there is one) always matches the background.
    """
    bg = int(online.has_background)
    b, t, k, d = online.slots.shape

    def features(o: ObjectOutput) -> torch.Tensor:
        return torch.cat([F.normalize(o.slots[:, :, bg:].float(), dim=-1),
                          POSITION_MATCH_WEIGHT * o.positions[:, :, bg:].float()], dim=-1).flatten(0, 1)

    perm = sinkhorn_match(features(online).detach(), features(target))  # (B*T, K - bg)
    slots = permute(target.slots[:, :, bg:].flatten(0, 1), perm).reshape(b, t, k - bg, d)
    alive = permute(target.alive[:, :, bg:].flatten(0, 1), perm).reshape(b, t, k - bg)
    return (torch.cat([target.slots[:, :, :bg], slots], dim=2), torch.cat([target.alive[:, :, :bg], alive], dim=2))


class HCLSM(Pretrained, nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.objects = ObjectDecomposer(cfg)
        self.dynamics = HierarchicalDynamics(cfg)
        # stage 2's prediction targets: an EMA copy of the object layers (no gradient; update_target). A frozen
        # pretrained backbone (model.perception.encoder=dinov2) is shared, not copied: it never changes
        backbone = getattr(self.objects.encoder, "backbone", None)
        shared = {} if backbone is None else {id(backbone): backbone}
        self.target_objects = copy.deepcopy(self.objects, shared).requires_grad_(False)

    @torch.no_grad()
    def update_target(self, tau: float) -> None:
        """EMA update of the target object layers (and the decoder's feature-target encoder)."""
        self.objects.update_target(tau)
        for t, o in zip(self.target_objects.parameters(), self.objects.parameters()):
            if t is not o:  # a shared frozen backbone is its own target
                t.lerp_(o.detach(), 1 - tau)

    @torch.no_grad()
    def prepare(self, clips) -> None:
        """Before training, from the training clips: the object layers' data-set statistics (the static scene),
        for the EMA target too."""
        self.objects.prepare(clips)
        self.target_objects.prepare(clips)

    @torch.no_grad()
    def after_step(self, losses: Mapping[str, float]) -> None:
        """Called by the training step after each optimizer update with that step's losses (averaged over
        ranks): the causal graph counts its training steps and updates its augmented Lagrangian from its h(A)
        (``acyclicity``, logged only by steps that trained the graph)."""
        if self.dynamics.graph is not None and "acyclicity" in losses:
            self.dynamics.graph.after_step(losses["acyclicity"])

    def forward(self, batch: dict[str, torch.Tensor], progress: float = 1.0, stage: int = 1) -> HCLSMOutput:
        video = batch[keys.VIDEO]
        cue = agent_cue(batch, self.cfg)  # the agent's position, when the model reads it (PushT)
        out = self.objects(video, progress, cue=cue)
        with scope("loss/objects"):
            losses = self.objects.losses(out, progress)
        if stage == 1:
            return HCLSMOutput(objects=out, losses=losses)
        action = batch.get(keys.ACTION) if self.cfg.d_action > 0 else None
        if self.cfg.d_action > 0 and action is None:  # a dataset without actions (physics scenes): zero actions
            action = video.new_zeros(*video.shape[:2], self.cfg.d_action)
        dyn = self.dynamics(out.slots, out.positions, out.gate, action)
        self.target_objects.eval()  # deterministic targets: no sampled gates, no query noise
        with torch.no_grad(), scope("loss/jepa_targets"):
            # a frozen backbone's features are the same for both passes: computed once, by the online one
            tgt_slots, tgt_alive = align_targets(out, self.target_objects(video, rules=False, features=out.features,
                                                                      cue=cue))
        losses.update(self.prediction_losses(out, dyn, tgt_slots, tgt_alive))
        if dyn.graph is not None and self.dynamics.graph is not None:
            with scope("loss/causal"):
                losses.update(self.dynamics.graph.losses(dyn.graph, out.gate))
        context = self.cfg.dynamics.rollout_context
        horizon = min(self.cfg.dynamics.rollout_horizon, video.shape[1] - context)
        if context > 0 and horizon >= 2:  # at least two steps that read a prediction
            with scope("loss/rollout"):
                losses["rollout"] = self.open_loop_loss(out, action, context, horizon)
        return HCLSMOutput(objects=out, dynamics=dyn, losses=losses)

    def prediction_losses(self, out: ObjectOutput, dyn: DynamicsOutput, tgt_slots: torch.Tensor,
                          tgt_alive: torch.Tensor) -> dict[str, torch.Tensor]:
        """Next-step prediction losses over the object slots alive at t and t + 1.

        ``jepa``: slot MSE against the aligned EMA target slots (pairs whose target slot is alive);
        ``obj``: position MSE against the slot's own position at t + 1 (a slot keeps its object from frame to
        frame, so no matching is needed; detached); ``frame``: the predicted slots and positions decoded
        through the spatial broadcast decoder against frame t + 1; ``event``: the event detector's losses,
        fitted to the surprise of each step (how badly it was predicted from the step before).
        """
        w = (out.gate[:, :-1] * out.gate[:, 1:]).detach().float()  # (B, T-1, K)
        w_jepa = w * tgt_alive[:, 1:].float()
        slot_err = (dyn.slots[:, :-1].float() - tgt_slots[:, 1:].float()).pow(2).mean(-1)  # (B, T-1, K)
        pos_err = (dyn.positions[:, :-1].float() - out.positions[:, 1:].detach().float()).pow(2).mean(-1)
        jepa = (slot_err * w_jepa).sum() / w_jepa.sum().clamp_min(1.0)
        obj = (pos_err * w).sum() / w.sum().clamp_min(1.0)
        pick = self.decoded_steps(*w.shape[:2], w.device)  # (B, n) the transitions whose prediction is decoded
        with scope("loss/frame"):
            frame = self.decoded_mse(*(pick_steps(x, pick) for x in (dyn.slots[:, :-1], dyn.positions[:, :-1],
                                                                     out.gate[:, 1:], out.target[:, 1:])))
        # surprise of step t: how badly step t was predicted from t - 1 (none for the first step); per object
        # when each object has its own events (with the causal graph)
        per_object = ((slot_err + pos_err) * w).detach()  # (B, T-1, K)
        with scope("loss/event"):
            if dyn.object_events is None:
                per_step = per_object.sum(-1) / w.sum(-1).clamp_min(1.0)  # (B, T-1)
                surprise = torch.cat([per_step.new_zeros(per_step.shape[0], 1), per_step], dim=1)
                event_terms = self.dynamics.detector.losses(dyn.events, dyn.pooled, surprise)
            else:
                surprise = torch.cat([torch.zeros_like(per_object[:, :1]), per_object], dim=1)  # (B, T, K)
                event_terms = self.dynamics.detector.losses(dyn.object_events, dyn.views, fold(surprise))
        return {"jepa": jepa, "obj": obj, "frame": frame, "event": sum(event_terms.values())}

    def open_loop_loss(self, out: ObjectOutput, action: torch.Tensor | None, context: int, horizon: int
                       ) -> torch.Tensor:
        """``rollout``: the clip's first ``context`` frames given (their slots detached), the next ``horizon`` steps
        predicted from the dynamics' own predictions, as in ``rollout``, decoded and scored against the frames
        (MSE), so training sees the errors a rollout compounds, not only single steps from the truth.

        Positions are judged through the decoded frames only: the attention centroids a slot's position is read
        from jitter by about a pixel from frame to frame, and scoring open-loop positions against them taught the
        dynamics to damp all motion (measured: its rollouts fell behind the constant-velocity prior)."""
        gate = out.gate.detach()
        slots, pos, _ = self.predict_ahead(out.slots[:, :context].detach(), out.positions[:, :context].detach(),
                                           gate[:, :context], horizon, action)
        alive = gate[:, context - 1:context].expand(-1, horizon, -1)  # the rollout keeps the last given gate
        pick = self.decoded_steps(slots.shape[0], horizon, slots.device)  # (B, n) the predicted frames decoded
        return self.decoded_mse(*(pick_steps(x, pick) for x in (slots, pos, alive,
                                                                 out.target[:, context:context + horizon])))

    def decoded_steps(self, batch: int, steps: int, device: torch.device) -> torch.Tensor | None:
        """(B, n) random steps of each sequence whose predicted frame a decoded loss scores
        (``model.dynamics.decoded_frames`` of the ``steps``, drawn anew every call), or None for all of them.

        Decoding is the expensive part of the ``frame`` and ``rollout`` terms; a random subset of the steps
        is an unbiased estimate of their mean at a fraction of the cost."""
        n = self.cfg.dynamics.decoded_frames
        if n == 0 or n >= steps:
            return None
        return torch.rand(batch, steps, device=device).argsort(dim=1)[:, :n]

    def decoded_mse(self, slots: torch.Tensor, positions: torch.Tensor, gate: torch.Tensor, target: torch.Tensor
                    ) -> torch.Tensor:
        """MSE of N frames' slots (N, K, d) at ``positions`` (N, K, 2) with alive ``gate`` (N, K), decoded, against
        ``target`` (N, C, R, R).

        Decoded ``DECODE_CHUNK`` frames at a time (``hclsm.nn.chunks.map_chunks``: checkpointed chunks when there is
        more than one), so a long clip's K full-resolution feature maps per frame are never all allocated at once.
        """
        recon = map_chunks(lambda a, b: self.objects.decoder(slots[a:b], positions[a:b], gate[a:b])[0],
                           slots.shape[0], DECODE_CHUNK)
        return F.mse_loss(torch.cat(recon).float(), target.float())

    def predict_ahead(self, slots: torch.Tensor, positions: torch.Tensor, gate: torch.Tensor, horizon: int,
                      action: torch.Tensor | None = None, intervention: Intervention | None = None,
                      shared_context: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Autoregressive prediction in latent space: the slots (B, C, K, d), positions (B, C, K, 2) and alive gate
        (B, C, K) of C context steps -> the predicted slots (B, H, K, d) and positions (B, H, K, 2) of the next
        ``horizon`` steps, each made from the previous prediction with the last context step's gate, and the event
        gate of every step run (B, C + H - 1). ``action`` (B, >= C + H - 1, A) drives an action-conditioned model
        (zeros when omitted). ``intervention`` acts on the last context step (``hclsm.models.interventions``).
        ``shared_context``: the caller promises that every sequence of the batch has the same context and the same
        actions over it (planning: candidates differ only in their future actions), so the first C - 1 steps run
        once, on the first sequence, and their state is tiled over the batch (same result, less work)."""
        b, c, k, _ = slots.shape
        n = c + horizon - 1
        if self.cfg.d_action > 0 and action is None:
            action = slots.new_zeros(b, n, self.cfg.d_action)
        if action is not None and action.shape[1] < n:
            raise ValueError(f"a rollout needs actions for {n} steps (context {c} + horizon {horizon} - 1), got "
                             f"{action.shape[1]}")
        # the first c - 1 context steps run as one sequence (on the first sequence alone when it is shared), and the
        # dynamics continues step by step from the state they leave
        prefix, src = c - 1, slice(0, 1 if shared_context and b > 1 else b)
        if prefix:
            out, state = self.dynamics(slots[src, :prefix], positions[src, :prefix], gate[src, :prefix],
                                       None if action is None else action[src, :prefix], return_state=True)
            events = list(out.events.gate.expand(b, -1).unbind(1))
            state = tile_batch(state, b) if src.stop == 1 and b > 1 else state
        else:
            state, events = self.dynamics.init_state(b, k, slots.device, slots.dtype), []
        s, p, g, pred_slots, pred_pos = slots[:, -1], positions[:, -1], gate[:, -1], [], []
        if intervention is not None:
            s, p, g, state = apply_to_state(intervention, s, p, g, state)
        for t in range(prefix, n):
            s, p, ev, state = self.dynamics.step(s, p, g, None if action is None else action[:, t], state)
            events.append(ev)
            pred_slots.append(s)
            pred_pos.append(p)
        return torch.stack(pred_slots, 1), torch.stack(pred_pos, 1), torch.stack(events, 1)

    @torch.no_grad()
    def rollout(self, video: torch.Tensor, horizon: int, action: torch.Tensor | None = None,
                intervention: Intervention | None = None, cue: torch.Tensor | None = None) -> Rollout:
        """Predict ``horizon`` frames after the context ``video`` (B, C, 3, H, W), autoregressively
        (``predict_ahead``), decoded through the spatial broadcast decoder.

        ``action`` (B, >= C + horizon - 1, A) are the actions of every step that is run (the context frames
        and all predicted frames but the last); omitted for a model without action conditioning.
        ``intervention`` (``hclsm.models.interventions.Intervention``) acts on one slot at the last context
        frame: the rollout is then the counterfactual "what if" prediction. ``cue`` (B, >= C, 2): the agent's
        position on the context frames (later ones are ignored), for a model that reads it
        (``hclsm.models.objects.agent_cue``).
        """
        context = self.objects(video, cue=None if cue is None else cue[:, :video.shape[1]])
        b = video.shape[0]
        alive = context.alive[:, -1]
        if intervention is not None and intervention.kind == "remove":
            alive = alive.clone()
            alive[torch.arange(b, device=alive.device), intervention.slot.to(alive.device)] = False
        slots, pos, events = self.predict_ahead(context.slots, context.positions, context.alive.float(), horizon,
                                                action, intervention)
        recon, _, _ = self.objects.decoder(slots.flatten(0, 1), pos.flatten(0, 1),
                                           alive.float().repeat_interleave(horizon, 0))
        frames = recon.reshape(b, horizon, *recon.shape[1:])
        return Rollout(slots, pos, alive, frames, events, context)
