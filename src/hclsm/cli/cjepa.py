"""``hclsm cjepa``: slot files from our frozen object model, and C-JEPA training on any slot file.

    hclsm cjepa slots --data PHYSICS_DIR --out slots.npz [--counterfactual]
    hclsm cjepa train --slots slots.npz --out RUN_DIR [--set cjepa.masked=2 ...]

``train`` writes ``RUN_DIR/model.safetensors`` (the predictor, normaliser included), ``RUN_DIR/config.yaml``
(the resolved ``cjepa`` config) and ``RUN_DIR/losses.json`` (per-epoch means), all or nothing.
"""
from __future__ import annotations

import argparse
import json

import yaml

from hclsm.errors import HclsmError


def _cjepa_config(overrides: list[str]):
    from hclsm.config.cjepa import CJEPAConfig
    from hclsm.config.loader import config_from_dict, parse_overrides

    over = parse_overrides(overrides)
    unknown = sorted(set(over) - {"cjepa"})
    if unknown:
        raise HclsmError(f"hclsm cjepa train takes cjepa.* overrides only (got {unknown[0]}.*), "
                         "e.g. --set cjepa.masked=2")
    return config_from_dict(CJEPAConfig, over.get("cjepa", {}), "cjepa")


def cmd_cjepa(args: argparse.Namespace, overrides: list[str]) -> int:
    from hclsm.config.loader import config_to_dict
    from hclsm.data.slots import load_slot_file, save_slot_file
    from hclsm.utils.atomic import atomic_output_dir

    overrides = [*getattr(args, "overrides", []), *overrides]  # --set K=V and --K=V
    if args.action == "slots":
        if overrides:
            raise HclsmError(f"hclsm cjepa slots takes no overrides (got {overrides[0]})")
        from hclsm.assets import pretrained_decomposer
        from hclsm.data.physics import PhysicsSource
        from hclsm.eval.cjepa import encode_episodes
        from hclsm.utils.atomic import check_file_out

        check_file_out(args.out, "--out", "slots.npz")  # before the encoding, not after it
        source = PhysicsSource(args.data, counterfactual=args.counterfactual)
        episodes = list(range(len(source.episode_lengths)))
        seqs, _ = encode_episodes(pretrained_decomposer(), source, episodes, args.counterfactual,
                                  progress=not args.quiet)
        save_slot_file(args.out, seqs)
        n, t, s, d = seqs.slots.shape
        print(f"wrote {args.out}: {n} sequences x {t} frames x {s} slots x {d} dims (slot vector + x, y); train "
              f"with --set cjepa.position_dims=2 so the position weighs as much as the slot vector")
        return 0

    import torch

    from hclsm.train.checkpoint import save_tensors
    from hclsm.train.cjepa import train_cjepa

    cfg = _cjepa_config(overrides)
    seqs = load_slot_file(args.slots)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    with atomic_output_dir(args.out, overwrite=args.overwrite) as tmp:
        run = train_cjepa(seqs, cfg, device=device, progress=not args.quiet)
        save_tensors({k: v.detach().cpu().contiguous() for k, v in run.model.state_dict().items()},
                  str(tmp / "model.safetensors"))
        (tmp / "config.yaml").write_text(yaml.safe_dump({"cjepa": config_to_dict(cfg)}, sort_keys=False))
        (tmp / "losses.json").write_text(json.dumps(run.history, indent=1) + "\n")
    shown = ", ".join(f"{k} {v:.4g}" for k, v in run.losses.items())
    print(f"trained {run.steps} steps in {run.seconds / 60:.1f} min on {device}: {shown}; graph density "
          f"{run.graph_density:.3f}; wrote {args.out}")
    return 0


def add_cjepa_parser(sub) -> None:
    c = sub.add_parser("cjepa", help="C-JEPA: slot files from our object model; train the masked slot predictor",
                       description="C-JEPA on slot sequences. 'slots' encodes a physics dataset with the shipped "
                                   "object model (hclsm.assets, objects_tiny) into a slot file; 'train' trains the "
                                   "masked slot predictor on any slot file (.npz: slots (N, T, S, D), optional "
                                   "alive, action, proprio), configured with --set cjepa.KEY=VALUE.")
    csub = c.add_subparsers(dest="action", required=True)
    s = csub.add_parser("slots", help="encode a physics dataset into a slot file")
    s.add_argument("--data", required=True, help="a physics dataset (hclsm data physics)")
    s.add_argument("--out", required=True, help="the slot file to write (.npz)")
    s.add_argument("--counterfactual", action="store_true", help="encode the episodes' twins instead")
    s.add_argument("--quiet", action="store_true", help="no progress bars")
    s.set_defaults(func=cmd_cjepa)
    t = csub.add_parser("train", help="train the masked slot predictor on a slot file")
    t.add_argument("--slots", required=True, help="slot file (.npz)")
    t.add_argument("--out", required=True, help="run directory to write (model.safetensors, config.yaml, losses.json)")
    t.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    t.add_argument("--set", dest="overrides", metavar="KEY=VALUE", action="append", default=[],
                   help="config override, e.g. --set cjepa.masked=2 (also written --cjepa.masked=2)")
    t.add_argument("--quiet", action="store_true", help="no progress bars")
    t.set_defaults(func=cmd_cjepa)
