"""``hclsm train``: the command-line options turned into a run, a new one (one dataset, or several one after
another with ``--continual``) or ``--resume`` of an earlier one (its own config and dataset; options that would
change it are refused), and the run's summary printed. ``hclsm.cli`` parses and dispatches here."""
from __future__ import annotations

import argparse
from pathlib import Path

from hclsm.config import Config, load_config
from hclsm.errors import HclsmError


def resume_target(args: argparse.Namespace, extra: list[str]) -> tuple[Config, str, Path]:
    """The run ``--resume`` continues: its own config, its dataset (``--data`` or the one it was
    trained on) and its directory. Options that would change the run are refused."""
    from hclsm.train.rundir import resume_checkpoint, run_data_root

    changed = [flag for flag, value in (("--model", args.model), ("--stage", args.stage), ("--steps", args.steps),
                                        ("--name", args.name), ("--out", args.out), ("--minutes", args.minutes),
                                        ("--preset", args.preset), ("--config", args.config)) if value is not None]
    changed += [f"--{o}" for o in [*args.overrides, *extra]]
    if changed:
        raise HclsmError(f"--resume continues a run with its own config.yaml, so {changed[0]} cannot be given; "
                         f"drop it, or start a new run")
    run = Path(args.resume)
    if not (run / "config.yaml").is_file():
        raise HclsmError(f"--resume {run}: not a run directory (no config.yaml); pass OUT/NAME of an earlier "
                         f"`hclsm train`")
    cfg = load_config(yaml_path=run / "config.yaml")
    if (run / "continual.json").is_file():  # a continual run: its datasets are listed there
        if args.data is not None:
            raise HclsmError(f"--resume {run}: a continual run trains on the datasets it was started with "
                             f"(continual.json), so --data cannot be given; drop it")
        return cfg, None, run
    if args.data is not None and len(args.data) > 1:
        raise HclsmError(f"--resume {run}: --data was given {len(args.data)} times; a run trains on one dataset")
    ckpt = resume_checkpoint(run)  # a damaged newest checkpoint is named here, whatever --data says
    data = args.data[0] if args.data is not None else run_data_root(run)
    if data is None:
        which = f"its checkpoint {ckpt.name}" if ckpt is not None else "it (stopped before its first checkpoint)"
        raise HclsmError(f"--resume {run}: {which} does not record the dataset it trains on (a run from an "
                         f"earlier hclsm); pass --data DIR")
    return cfg, data, run


def print_result(result, prefix: str = "") -> None:
    print(f"{prefix}{result.steps} steps in {result.seconds:.1f} s (stopped by {result.stopped}; "
          f"{result.skipped} skipped); checkpoint: {result.checkpoint}")
    for title, values in (("final losses", result.losses), ("val", result.metrics)):
        if values:
            print(f"{prefix}{title}: " + ", ".join(f"{k} {v:.4g}" for k, v in values.items()))


def cmd_train(args: argparse.Namespace, extra: list[str]) -> int:
    if args.resume is not None:
        cfg, data, run_dir = resume_target(args, extra)
        continual = data is None
    else:
        if args.data is None:
            raise HclsmError("hclsm train needs --data DIR (or --resume RUN to continue a run)")
        continual = args.continual
        if len(args.data) > 1 and not continual:
            raise HclsmError(f"--data was given {len(args.data)} times; to train on several datasets one after "
                             f"another add --continual, else give one --data DIR")
        flags = {"model.name": args.model, "train.stage": args.stage, "train.steps": args.steps,
                 "train.run_name": args.name, "train.out_dir": args.out, "train.max_minutes": args.minutes}
        if args.stage == 1:  # stage 1 only: the whole run is stage 1
            flags["train.stage1_fraction"] = 1.0
        given = {k: v for k, v in flags.items() if v is not None}  # typed values: --name "exp #2" stays that string
        cfg = load_config(args.preset, args.config, [*args.overrides, *extra], values=given)
        data, run_dir = (args.data if continual else args.data[0]), None
    from hclsm.train import train  # torch: imported once the options and config are known to be right
    from hclsm.train.distributed import env_world

    eval_fn = None
    if cfg.model.name == "hclsm":  # the object metrics (FG-ARI, mIoU of the slot masks) need slots
        from hclsm.eval.objects import make_eval_fn

        eval_fn = make_eval_fn(cfg)
    if continual:
        from hclsm.train.continual import EWC_FILE, train_continual

        res = train_continual(cfg, None if run_dir is not None else data, run_dir=run_dir, eval_fn=eval_fn,
                              progress=not args.quiet, resume=run_dir is not None)
        if not env_world().main:
            return 0
        print(f"run: {res.run_dir}")
        for i, (root, r) in enumerate(zip(res.data, res.tasks)):
            print(f"task {i + 1}: {root}")
            if r is None:
                print("  finished before the resume")
            else:
                print_result(r, "  ")
        st = res.ewc.stats()
        print(f"EWC after {st['tasks']} tasks: Fisher mean {st['fisher_mean']:.3g}, max {st['fisher_max']:.3g}, "
              f"non-zero {st['fisher_nonzero']:.1%} (weight train.loss.ewc = {cfg.train.loss.ewc:g}); "
              f"{res.run_dir / f'task{len(res.data)}' / EWC_FILE}")
        if res.replay is not None:
            print(f"rehearsal: {len(res.replay)} clips of the earlier tasks kept ({res.replay.nbytes / 2**20:.1f} MiB), "
                  f"{cfg.train.rehearsal_fraction:.0%} of each later batch")
        return 0
    result = train(cfg, data, run_dir=run_dir, eval_fn=eval_fn, progress=not args.quiet, resume=run_dir is not None)
    if not env_world().main:  # under torchrun, rank 0 reports
        return 0
    print(f"run: {result.run_dir}")
    print_result(result)
    return 0
