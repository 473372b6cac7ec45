"""The ``fewstep`` command: list, distill, sample, eval, report.

Imports stay lazy (no torch at import time) so ``fewstep --help`` answers at once.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

RUN_CONFIG = "config.json"


def _parser(prog: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=prog,
        description="fewstep: distil slow generative models into few-step students.",
    )
    sub = p.add_subparsers(dest="command", required=True)
    sub.add_parser("list", help="installed recipes and registered objectives")
    d = sub.add_parser(
        "distill",
        help="run a recipe: fewstep distill RECIPE [--out DIR] [--key value ...]",
        description="Options after the recipe name override its config (dotted keys reach "
        "nested configs, e.g. --train.steps 100; --objective.<field> reaches the "
        "objective's config). `fewstep distill RECIPE --show-config` prints every key.",
    )
    d.add_argument("recipe")
    d.add_argument("--out", type=Path, default=None, help="run folder (default runs/RECIPE-TIME)")
    d.add_argument("--show-config", action="store_true", help="print the resolved config")
    s = sub.add_parser("sample", help="sample from a distilled run")
    s.add_argument("run_dir", type=Path)
    s.add_argument("--n", type=int, default=64, help="number of samples")
    s.add_argument("--steps", type=int, default=None, help="student steps (default: trained)")
    s.add_argument("--out", type=Path, default=None, help="output file (default in run dir)")
    e = sub.add_parser("eval", help="evaluate a distilled run and print its metrics")
    e.add_argument("run_dir", type=Path)
    r = sub.add_parser("report", help="rewrite a run's report.html")
    r.add_argument("run_dir", type=Path)
    return p


def resolve(recipe, overrides: dict[str, str]):
    """(recipe config, objective config) with overrides applied; errors list valid keys.

    A recipe whose config has no ``objective`` field (dataset distillation, where the method
    is the recipe) gets ``None`` as its objective config."""
    import dataclasses

    from fewstep.core.config import apply_overrides
    from fewstep.core.objectives import get_objective

    if "objective" not in {f.name for f in dataclasses.fields(recipe.config_cls)}:
        return apply_overrides(recipe.config_cls(), overrides), None

    obj_over = {
        k[len("objective.") :]: v for k, v in overrides.items() if k.startswith("objective.")
    }
    own = {k: v for k, v in overrides.items() if not k.startswith("objective.")}
    # the recipe's per-objective settings of its own config come first; the user's win
    name = own.get("objective", recipe.config_cls().objective)
    tuned = getattr(recipe, "config_defaults", lambda _: {})(name)
    cfg = apply_overrides(recipe.config_cls(), {**tuned, **own})
    obj_cls = get_objective(cfg.objective)  # an unknown name: KeyError listing the available
    supported = getattr(recipe, "supported_objectives", None)
    if supported is not None and cfg.objective not in supported:
        why = recipe.unsupported_reason(cfg.objective)
        raise ValueError(
            f"recipe {recipe.name} does not support objective {cfg.objective!r}: "
            f"{why}; supported: {', '.join(supported)}"
        )
    base = dataclasses.replace(obj_cls.config_cls(), **recipe.objective_defaults(cfg.objective))
    return cfg, apply_overrides(base, obj_over)


def _run_recipe(run_dir: Path):
    from fewstep.core.recipes import load_recipe

    cfg_file = run_dir / RUN_CONFIG
    if not cfg_file.exists():
        raise FileNotFoundError(f"{run_dir} is not a fewstep run folder (no {RUN_CONFIG})")
    return load_recipe(json.loads(cfg_file.read_text())["recipe"])


def main(argv: list[str] | None = None, prog: str = "fewstep", prefix: str = "") -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args, rest = _parser(prog).parse_known_args(argv)
    try:
        return _dispatch(args, rest, prefix)
    except (KeyError, ValueError, FileNotFoundError) as e:
        msg = e.args[0] if isinstance(e, KeyError) and e.args else str(e)
        print(f"{prog}: error: {msg}", file=sys.stderr)
        return 2


def _dispatch(args, rest: list[str], prefix: str) -> int:
    from fewstep.core.recipes import load_recipe, recipe_names

    if args.command != "distill" and rest:
        raise ValueError(f"unrecognised arguments: {' '.join(rest)}")
    if args.command == "list":
        from fewstep.core.objectives import objective_names

        print("recipes:")
        for n in recipe_names():
            if n.startswith(prefix):
                print(f"  {n}")
        print("objectives:")
        for n in objective_names():
            print(f"  {n}")
        return 0
    if args.command == "distill":
        from fewstep.core.config import parse_overrides, to_dict
        from fewstep.core.io import atomic_write_json

        if not args.recipe.startswith(prefix):
            raise KeyError(f"{args.recipe!r} is not a {prefix}* recipe")
        recipe = load_recipe(args.recipe)
        cfg, obj_cfg = resolve(recipe, parse_overrides(rest))
        resolved = {
            "recipe": args.recipe,
            "config": to_dict(cfg),
            "objective_config": None if obj_cfg is None else to_dict(obj_cfg),
        }
        if args.show_config:
            print(json.dumps(resolved, indent=2))
            return 0
        out = args.out or Path("runs") / f"{args.recipe}-{time.strftime('%Y%m%d-%H%M%S')}"
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_json(out / RUN_CONFIG, resolved)
        metrics = recipe.distill(cfg, obj_cfg, out)
        print(json.dumps(metrics, indent=2))
        print(f"run folder: {out}  (report: {out / 'report.html'})")
        return 0
    recipe = _run_recipe(args.run_dir)
    if args.command == "sample":
        path = recipe.sample(args.run_dir, args.n, args.out, steps=args.steps)
        print(path)
    elif args.command == "eval":
        print(json.dumps(recipe.evaluate(args.run_dir), indent=2))
    elif args.command == "report":
        print(recipe.report(args.run_dir))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
