"""The ``hclsm`` command line: parse, call a library function, print.

Every subcommand accepts ``--preset``, ``--config FILE.yaml`` and dotted overrides such as
``--model.slots.num_slots=8`` or ``--train.lr 3e-4``. Errors a user can cause print one line
(``error: ...``) to stderr and exit 2, without a traceback.
"""
from __future__ import annotations

import argparse
import difflib
import json
import os
import signal
import sys
from collections.abc import Sequence
from pathlib import Path

from hclsm.cli.cjepa import add_cjepa_parser
from hclsm.cli.train import cmd_train
from hclsm.config import MODEL_NAMES, PRESETS, Config, load_config
from hclsm.config.model import INT64_MAX, SEED_MAX, show
from hclsm.errors import HclsmError
from hclsm.utils.interrupt import handle_sigint

def _add_config_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("configuration")
    g.add_argument("--preset", choices=PRESETS, default=None, help="size preset (default: tiny, or the YAML's preset)")
    g.add_argument("--config", metavar="FILE", default=None, help="YAML file overlaid on the preset")
    g.add_argument("--set", dest="overrides", metavar="KEY=VALUE", action="append", default=[],
                   help="dotted override, e.g. --set model.slots.num_slots=8 (also written --model.slots.num_slots=8)")


def _split_dotted(extra: list[str]) -> tuple[list[str], list[str]]:
    """Pull ``--a.b=c`` / ``--a.b c`` tokens out of the unparsed args as overrides."""
    overrides, rest, i = [], [], 0
    while i < len(extra):
        tok = extra[i]
        if tok.startswith("--") and "." in tok.split("=")[0]:
            if "=" in tok:
                overrides.append(tok[2:])
            elif i + 1 < len(extra) and not extra[i + 1].startswith("--"):
                overrides.append(f"{tok[2:]}={extra[i + 1]}")
                i += 1
            else:
                raise HclsmError(f"override {tok} has no value; write {tok}=VALUE")
        else:
            rest.append(tok)
        i += 1
    return overrides, rest


def _config(args: argparse.Namespace, extra: Sequence[str] = (), values: dict | None = None) -> Config:
    return load_config(args.preset, args.config, [*args.overrides, *extra], values=values)


def _cmd_data(args: argparse.Namespace, extra: list[str]) -> int:
    flags = {"episodes": args.episodes, "seed": args.seed}
    if args.kind == "pusht":
        flags |= {"max_steps": args.max_steps, "codec": args.codec, "image_size": args.image_size}
    else:
        flags |= {"frames": args.frames, "min_objects": args.min_objects, "max_objects": args.max_objects,
                  "counterfactual": args.counterfactual}
    cfg = _config(args, extra, {f"data.{args.kind}.{k}": v for k, v in flags.items() if v is not None})
    if args.kind == "pusht":
        from hclsm.data.pusht import DISPLACEMENT_PX, generate_pusht_dataset

        s = generate_pusht_dataset(args.out, cfg.data.pusht, overwrite=args.overwrite, progress=not args.quiet)
        print(f"wrote {s['episodes']} PushT episodes ({s['frames']} frames) to {args.out} in {s['seconds']:.1f} s")
        print(f"episodes with agent-block contact: {s['contact_fraction']:.0%}; block moved > {DISPLACEMENT_PX:.0f} px: "
              f"{s['moved_fraction']:.0%}; both: {s['contact_and_moved_fraction']:.0%}")
    else:
        from hclsm.data.physics import generate_physics_dataset

        s = generate_physics_dataset(args.out, cfg.data.physics, overwrite=args.overwrite, progress=not args.quiet)
        print(f"wrote {cfg.data.physics.episodes} physics episodes to {args.out} in {s['seconds']:.1f} s")
        print(", ".join(f"{k}: {v:.3g}" if isinstance(v, float) else f"{k}: {v}" for k, v in s.items()
                        if k not in ("seconds",)))
    return 0


def _check_range(option: str, value: int, low: int, high: int, why: str = "") -> None:
    """A plain integer option (one no config field checks) must lie in [low, high]; ``why`` says why the bound."""
    if not low <= value <= high:
        because = f" ({why})" if why else ""
        raise HclsmError(f"{option} must be in [{low}, {high}]{because}, got {show(value)}")


def _check_seed(value: int) -> None:
    _check_range("--seed", value, 0, SEED_MAX, "seeds are 32-bit, NumPy's range")


def _cmd_bench(args: argparse.Namespace, extra: list[str]) -> int:
    from hclsm.bench import available, run_bench

    if extra:
        raise HclsmError(f"hclsm bench takes no config overrides (got {extra[0]}); each benchmark fixes its own "
                         f"config, see --help")
    _check_seed(args.seed)
    if args.list or args.name is None:
        print("\n".join(available()))
        return 0
    run_bench(args.name, quick=args.quick, seed=args.seed, out=args.out)
    return 0


def _cmd_demo(args: argparse.Namespace, extra: list[str]) -> int:
    from hclsm.demo import DEMO_DEFAULTS, run_demo

    # PushT's object recipe and the demo's data seed first, so that the user's --set overrides (and extra options)
    # win over them
    cfg = load_config(args.preset, args.config, [*DEMO_DEFAULTS, *args.overrides, *extra])
    report = run_demo(cfg, name=args.name, out_root=args.out, progress=not args.quiet,
                      steps=None if args.steps is None else tuple(args.steps), from_scratch=args.from_scratch)
    print(f"report: {report}")
    m = json.loads((report.parent / "metrics.json").read_text())
    t, v = m["train"], m["trained"]
    fmt = "{:.3g}".format
    began = "from scratch" if m["start"]["from"] == "scratch" else f"continuing the shipped {m['start']['from']}"
    print(f"HCLSM stage 1 ({began}): {t['steps']} steps in {t['seconds'] / 60:.1f} min; held-out: "
          + ", ".join(f"{k} {'n/a' if v.get(k) is None else fmt(v[k])}" for k in
                      ("agent_iou", "block_iou", "alpha_peakedness", "sbd", "diversity", "alive_slots", "true_objects")))
    t2 = t["stage2"]
    print(f"HCLSM stage 2: {t2['steps']} steps in {t2['seconds'] / 60:.1f} min; held-out: "
          + ", ".join(f"{k} {'n/a' if v.get(k) is None else fmt(v[k])}" for k in
                      ("jepa", "frame_mse", "frame_mse_copy_last", "events_per_16_frames", "event_f1")))
    return 0


def _cmd_eval(args: argparse.Namespace, extra: list[str]) -> int:
    from hclsm.eval.dynamics import load_run, write_eval
    from hclsm.runs import Run
    from hclsm.train.loop import resolve_device

    def fmt(v: float | None) -> str:
        return "n/a" if v is None else f"{v:.4g}"

    if extra:
        raise HclsmError(f"hclsm eval takes no config overrides (got --{extra[0]}); it evaluates a run with its own "
                         f"config.yaml")
    for option, value in (("--context", args.context), ("--horizon", args.horizon), ("--clips", args.clips)):
        _check_range(option, value, 0 if option == "--clips" else 1, INT64_MAX, "a 64-bit integer")
    run = Run(args.run_dir)
    cfg, model, state = load_run(run)
    if args.data is None:
        args.data = run.data_root
        if args.data is None:
            raise HclsmError(f"the dataset run {args.run_dir} trained on is gone (or not recorded); pass --data DIR")
    out = Path(args.out) if args.out is not None else Path(args.run_dir) / "eval"
    model.to(resolve_device("auto"))
    meta = {"run": str(Path(args.run_dir).resolve()), "checkpoint": state["path"], "step": state["step"],
            "stage": state["stage"], "data": str(Path(args.data).resolve())}
    m = write_eval(model, args.data, out, args.context, args.horizon, args.clips, val_fraction=cfg.train.val_fraction,
                   seed=cfg.train.seed, frame_skip=cfg.data.clip.frame_skip, progress=not args.quiet, meta=meta,
                   counterfactual=args.counterfactual)
    r, ev = m["rollout"], m["events"]
    print(f"{args.run_dir} step {state['step']}: {r['clips']} {'held-out ' if m['held_out'] else ''}clips, "
          f"context {args.context}, horizon {args.horizon}")
    if state["stage"] == 1:
        print("note: the checkpoint is from stage 1, so the dynamics were not trained yet")
    print(f"{'':<22}{'model':>10}{'copy-last':>11}")
    for name, key in (("frame MSE", "frame_mse"), ("latent MSE", "latent_mse")):
        print(f"{name:<22}{fmt(r[key]):>10}{fmt(r[key + '_copy_last']):>11}")
    print(f"{'frame MSE by step':<22}" + " ".join(fmt(v) for v in r["frame_mse_per_step"]))
    line = f"events per clip {fmt(ev['events_per_clip'])}"
    if "event_f1" in ev:
        line += (f" (true {fmt(ev['true_events_per_clip'])}); F1 ±1 step {fmt(ev['event_f1'])}, precision "
                 f"{fmt(ev['event_precision'])}, recall {fmt(ev['event_recall'])}")
    else:
        line += " (the dataset has no true events, no contact column: precision, recall and F1 are skipped)"
    print(line)
    if "counterfactual" in m:
        cf = m["counterfactual"]
        print(f"counterfactual twins {cf['twins']} ({cf['unmatched']} with no slot on the intervened object): MSE "
              f"what-if {fmt(cf['counterfactual_mse'])} vs re-simulation, factual {fmt(cf['factual_mse'])}, reusing "
              f"the factual prediction {fmt(cf['reuse_mse'])}")
    print(f"pictures and metrics.json: {out} ({len(m['pictures'])} PNGs)")
    return 0


def _cmd_info(args: argparse.Namespace, extra: list[str]) -> int:
    from hclsm.models.info import format_info

    if extra:
        raise HclsmError(f"hclsm info takes no config overrides (got --{extra[0]}); it shows a preset's model")
    print(format_info(args.preset, args.model))
    return 0


def _cmd_export(args: argparse.Namespace, extra: list[str]) -> int:
    from hclsm.models.pretrained import save_pretrained
    from hclsm.runs import Run

    if extra:
        raise HclsmError(f"hclsm export takes no config overrides (got --{extra[0]}); it writes a run's own model")
    out = Path(args.out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise HclsmError(f"{out} exists and is not an empty directory; choose a new directory to export into")
    run = Run(args.run)
    model = run.load_model()
    save_pretrained(model, out)
    print(f"exported {type(model).__name__} of {run.dir} (checkpoint {run.checkpoint.name}) to {out}: "
          f"config.json, model.safetensors; load it with hclsm.models.from_pretrained({str(out)!r})")
    return 0


def _cmd_plan(args: argparse.Namespace, extra: list[str]) -> int:
    from hclsm.planning.planners import PlannerConfig
    from hclsm.planning.run import format_summary, run_plan

    if extra:
        raise HclsmError(f"hclsm plan takes no config overrides (got --{extra[0]}); it plans with a run's own "
                         f"config.yaml (use --samples, --iterations, --horizon for the planner)")
    _check_seed(args.seed)
    _check_range("--episodes", args.episodes, 1, 100_000, "each start state is a closed-loop episode in the simulator")
    _check_range("--samples", args.samples, 1, 1 << 16, "the candidates of one refit are rolled out as one batch")
    for option, value in (("--iterations", args.iterations), ("--horizon", args.horizon),
                          ("--replan-every", args.replan_every)):
        _check_range(option, value, 1, 1000, "an episode has 50 env steps")
    _check_range("--gifs", args.gifs, 0, 100_000)
    try:
        pcfg = PlannerConfig(horizon=args.horizon, samples=args.samples, iterations=args.iterations,
                             elites=max(1, min(args.samples, args.samples // 8)))
    except ValueError as e:
        raise HclsmError(str(e)) from None
    record = run_plan(args.checkpoint, episodes=args.episodes, planner=args.planner, out=args.out, data=args.data,
                      seed=args.seed, gifs=args.gifs, baselines=args.baselines, cfg=pcfg,
                      replan_every=args.replan_every, progress=not args.quiet)
    print(f"{record['run']} step {record['step']}: {record['episodes']} start states from held-out episodes "
          f"{record['held_out_episodes']} of {record['data']}")
    if record["stage"] == 1:
        print("note: the checkpoint is from stage 1, so the dynamics were not trained yet")
    print(format_summary(record["results"]))
    print(f"success: ||(agent, block) xy - goal|| < 20 px and block angle error < 20 deg within {record['budget']} "
          f"steps; coverage: the env's own T target covered > 95 %")
    print(f"summary.json and GIFs: {record['out']}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="hclsm", description="Object-centric world models: data, training, "
                                "evaluation, planning and benchmarks.")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    d = sub.add_parser("data", help="generate datasets (PushT from gym-pusht, physics scenes)")
    dsub = d.add_subparsers(dest="kind", required=True, metavar="KIND")
    for kind, helptext in (("pusht", "PushT episodes from the gym-pusht simulator, LeRobot v3 layout"),
                           ("physics", "2-D ball scenes with springs, a follow DAG and counterfactual twins")):
        k = dsub.add_parser(kind, help=helptext, description=helptext)
        k.add_argument("--out", required=True, help="output directory (must not exist unless --overwrite)")
        k.add_argument("--episodes", type=int, help="number of episodes")
        k.add_argument("--seed", type=int, help="random seed (episode i depends only on seed and i)")
        k.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
        k.add_argument("--quiet", action="store_true", help="no progress bar")
        if kind == "pusht":
            k.add_argument("--max-steps", type=int, help="frames per episode (default 100)")
            k.add_argument("--codec", choices=("h264", "av1"), help="video codec (default h264)")
            k.add_argument("--image-size", type=int, help="observation side in pixels (default 96)")
        else:
            k.add_argument("--frames", type=int, help="frames per episode (default 32)")
            k.add_argument("--min-objects", type=int, help="fewest balls per episode (default 3)")
            k.add_argument("--max-objects", type=int, help="most balls per episode (default 6)")
            k.add_argument("--counterfactual", action=argparse.BooleanOptionalAction, default=None,
                           help="also write one intervened twin per episode (default on)")
        _add_config_args(k)
        k.set_defaults(func=_cmd_data)

    t = sub.add_parser("train", help="train a model on a dataset (physics scenes or LeRobot v3 / PushT)",
                       description="Train a model on a dataset directory; writes OUT/NAME with config.yaml, log.jsonl, "
                                   "tb/ (TensorBoard), checkpoints/ and summary.json. Under torchrun it trains "
                                   "data-parallel (see the README).")
    t.add_argument("--data", metavar="DIR", action="append", default=None,
                   help="dataset directory (from `hclsm data physics` or `hclsm data pusht`, or a LeRobot v3 copy); "
                        "with --continual give it once per task, in training order")
    t.add_argument("--continual", action="store_true",
                   help="train on the --data datasets one after another (one task each, RUN/taskI), estimating "
                        "each task's Fisher and adding the EWC penalty (train.loss.ewc) on the later tasks, which also "
                        "replay kept clips of the earlier ones (train.rehearsal_clips; 0 = off)")
    t.add_argument("--resume", metavar="RUN", default=None,
                   help="continue the run in RUN (OUT/NAME) from its newest checkpoint, with its own config; on "
                        "the CPU it ends exactly as an uninterrupted run would")
    t.add_argument("--model", choices=MODEL_NAMES, default=None, help="model to train (model.name; default hclsm)")
    t.add_argument("--stage", type=int, choices=(1, 2), default=None,
                   help="train only this stage: 1 = objects (SBD, diversity, existence), 2 = the full loss; "
                        "default: stage 1 for train.stage1_fraction of the steps, then stage 2")
    t.add_argument("--steps", type=int, default=None, help="optimizer steps (train.steps)")
    t.add_argument("--name", default=None, help="run name (train.run_name; default MODEL-PRESET-DATE-TIME)")
    t.add_argument("--out", default=None, help="root directory of runs (train.out_dir; default runs)")
    t.add_argument("--minutes", type=float, default=None,
                   help="wall-clock budget; stops at --steps or after this many minutes (train.max_minutes)")
    t.add_argument("--quiet", action="store_true", help="no progress bars")
    _add_config_args(t)
    t.set_defaults(func=cmd_train)

    e = sub.add_parser("eval", help="evaluate a trained run's dynamics on held-out clips",
                       description="Evaluate the newest checkpoint of a run on the held-out episodes of a dataset "
                                   "(the run's own train/val split): rollout error against the copy-last baseline "
                                   "(frames and slots), event precision / recall / F1 against true contacts, and "
                                   "pictures (rollouts, event timelines, PCA of slot trajectories); writes "
                                   "OUT/metrics.json and PNGs.")
    e.add_argument("run_dir", metavar="RUN_DIR", help="a run directory of `hclsm train` (OUT/NAME)")
    e.add_argument("--data", metavar="DIR", default=None,
                   help="the dataset to evaluate on (default: the one the run trained on, e.g. a demo's data/pusht)")
    e.add_argument("--context", type=int, default=6, help="context frames given to the model (default 6)")
    e.add_argument("--horizon", type=int, default=10, help="frames predicted after the context (default 10)")
    e.add_argument("--clips", type=int, default=4, help="held-out clips to draw pictures of (default 4)")
    e.add_argument("--out", metavar="DIR", default=None,
                   help="output directory (default RUN_DIR/eval; an earlier eval there is replaced)")
    e.add_argument("--counterfactual", action="store_true",
                   help="also roll out the held-out episodes' counterfactual twins (physics data): the same "
                        "intervention applied to the model's slot, scored against re-simulation, with pictures")
    e.add_argument("--quiet", action="store_true", help="no progress bars")
    e.set_defaults(func=_cmd_eval)

    i = sub.add_parser("info", help="parameter counts of a preset's model, module by module",
                       description="Parameter counts of a preset's model per module (trainable, and frozen: the EMA "
                                   "target copies), without allocating its weights.")
    i.add_argument("--preset", choices=PRESETS, default="tiny", help="model preset (default tiny)")
    i.add_argument("--model", choices=MODEL_NAMES, default=None, help="model name (default: the preset's, hclsm)")
    i.set_defaults(func=_cmd_info)

    x = sub.add_parser("export", help="write a run's model in the hub's layout (config.json + model.safetensors)",
                       description="Write the model of a training run (`hclsm train`, `hclsm demo`) with its newest "
                                   "checkpoint to DIR as config.json + model.safetensors, the layout of the Hugging "
                                   "Face hub: hclsm.models.from_pretrained(DIR) loads it.")
    x.add_argument("run", help="the run directory (OUT/NAME of `hclsm train` or `hclsm demo`)")
    x.add_argument("out", help="a new (or empty) directory to write")
    x.set_defaults(func=_cmd_export)

    c = sub.add_parser("plan", help="plan with a trained HCLSM in the PushT simulator (CEM or MPPI)",
                       description="Closed-loop goal reaching in the real PushT simulator with a trained HCLSM: start "
                                   "states from the run's held-out episodes, goals made by replaying the next 25 "
                                   "recorded actions, 50 env steps, re-planning every few steps. Prints a summary "
                                   "table; writes summary.json and GIFs (goal drawn in red) to --out.")
    c.add_argument("--checkpoint", required=True, metavar="RUN_DIR",
                   help="a run of `hclsm train` (HCLSM on PushT) or of `hclsm demo`")
    c.add_argument("--episodes", type=int, default=50, help="start states (default 50)")
    c.add_argument("--planner", choices=["mppi", "cem"], default="mppi", help="planner (default mppi)")
    c.add_argument("--data", default=None, help="the PushT dataset (default: the demo's data/pusht or the one the "
                                                "checkpoint was trained on)")
    c.add_argument("--out", default=None, help="output directory (default RUN_DIR/plan)")
    c.add_argument("--seed", type=int, default=0, help="seed of the start states and the planner (default 0)")
    c.add_argument("--gifs", type=int, default=4, help="episodes written as GIFs per policy (default 4)")
    c.add_argument("--baselines", action="store_true", help="also run random actions, the scripted policy and the "
                                                             "oracle (CEM on the true simulator, same candidates and iterations)")
    c.add_argument("--samples", type=int, default=64, help="candidates per planner iteration (default 64)")
    c.add_argument("--iterations", type=int, default=5, help="planner iterations per re-plan (default 5)")
    c.add_argument("--horizon", type=int, default=5, help="planned env steps (default 5)")
    c.add_argument("--replan-every", type=int, default=5, help="env steps executed between re-plans (default 5)")
    c.add_argument("--quiet", action="store_true", help="no progress bars")
    c.set_defaults(func=_cmd_plan)

    add_cjepa_parser(sub)

    b = sub.add_parser("bench", help="run a named benchmark; last stdout line is one JSON object")
    b.add_argument("name", nargs="?", help="benchmark name (see --list)")
    b.add_argument("--list", action="store_true", help="list the available benchmarks")
    b.add_argument("--quick", action="store_true", help="smoke-size run (<= 60 s)")
    b.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    b.add_argument("--out", default=None, help="also write the JSON result to this file")
    b.set_defaults(func=_cmd_bench)

    m = sub.add_parser("demo", help="the main job: data -> model -> report, on CPU",
                       description="The main job: PushT data from the simulator, HCLSM stage 1 (objects) then stage 2 "
                                   "(dynamics), counted in steps, evaluation on held-out episodes (objects, "
                                   "rollouts, events), planning, OUT/NAME/report.md with pictures.")
    m.add_argument("--from-scratch", action="store_true",
                   help="train stage 1 from a new model instead of continuing the PushT object layers shipped in "
                        "the package (hclsm.assets.pusht_objects_tiny)")
    m.add_argument("--name", default="demo", help="run name (report in OUT/NAME/report.md)")
    m.add_argument("--out", default="runs", help="root directory of runs (default runs)")
    m.add_argument("--steps", type=int, nargs=2, default=None, metavar=("S1", "S2"),
                   help="training steps of stage 1 and stage 2 (default: 300 100)")
    m.add_argument("--quiet", action="store_true", help="no progress bars")
    _add_config_args(m)
    m.set_defaults(func=_cmd_demo)
    _strict(p)
    return p


def _strict(parser: argparse.ArgumentParser) -> None:
    """No abbreviated options anywhere (``--ep 2`` is not ``--episodes 2``), and every command's parser named in
    its defaults (``leaf_parser``), so that an unknown option is reported with that command's usage."""
    parser.allow_abbrev = False
    subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    if not subs:
        parser.set_defaults(leaf_parser=parser)
    for action in subs:
        for child in action.choices.values():
            _strict(child)


def _unrecognized(parser: argparse.ArgumentParser, extra: list[str]) -> None:
    """argparse's usage error for unknown arguments, from the command's own parser, with a "did you mean"."""
    options = [o for a in parser._actions for o in a.option_strings if o.startswith("--")]
    hints = {}
    for tok in extra:
        name = tok.split("=")[0]
        if not name.startswith("--"):
            continue
        prefixed = [o for o in options if o.startswith(name)]  # an abbreviation: argparse no longer expands them
        close = prefixed if len(prefixed) == 1 else difflib.get_close_matches(name, options, n=1, cutoff=0.6)
        if close:
            hints[name] = close[0]
    if len(hints) == 1:
        hint = f" (did you mean {next(iter(hints.values()))}?)"
    else:
        hint = f" (did you mean {', '.join(f'{v} for {k}' for k, v in hints.items())}?)" if hints else ""
    parser.error(f"unrecognized arguments: {' '.join(extra)}{hint}")


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    try:
        overrides, rest = _split_dotted(list(sys.argv[1:] if argv is None else argv))
        args, extra = parser.parse_known_args(rest)
        if extra:
            _unrecognized(getattr(args, "leaf_parser", parser), extra)
        with handle_sigint():  # Ctrl-C stops the command even where Python alone would drop it (hclsm.utils.interrupt)
            code = args.func(args, overrides)
            sys.stdout.flush()  # a closed stdout fails here, inside the try, not at exit
        return code
    except HclsmError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # stdout closed early (``hclsm ... | head``): stop quietly, as a shell tool does
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())  # so that flushing stdout at exit does not fail again
        return 128 + signal.SIGPIPE


if __name__ == "__main__":
    sys.exit(main())
