"""``hf-ddlr`` command line: inspect, average and push learned LR trajectories.

    hf-ddlr show REPO_OR_DIR [--revision R] [--plots-dir DIR] [--json]
    hf-ddlr average OUT_DIR RUN_DIR_OR_REPO [RUN_DIR_OR_REPO ...] [--overwrite]
    hf-ddlr push DIR REPO_ID [--private] [--revision R]
    hf-ddlr --version
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence


def _versions() -> str:
    """``hf-ddlr X (torch Y, transformers Z, ...)``: the installed versions, read without importing the libraries."""
    from importlib import metadata

    from . import __version__

    def version(dist: str) -> str:
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            return "not installed"

    deps = ", ".join(f"{d} {version(d)}" for d in ("torch", "transformers", "accelerate", "datasets",
                                                    "huggingface_hub", "trl", "peft"))
    return f"hf-ddlr {__version__} ({deps})"


class _VersionAction(argparse.Action):
    """``--version``: the versions are read only when it is given, not on every command's start-up."""

    def __init__(self, option_strings: Sequence[str], dest: str, help: str | None = None) -> None:
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS, help=help)

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        print(_versions())  # (to stdout, as argparse's own version action prints)
        parser.exit()


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hf-ddlr", description="Inspect, average and push learned learning-rate trajectories (hf_ddlr).",
    )
    parser.add_argument("--version", action=_VersionAction,
                        help="print hf_ddlr's version and those of the libraries it runs on (for a bug report)")
    sub = parser.add_subparsers(dest="command", required=True)

    show = sub.add_parser("show", help="print a trajectory's summary table and write its plots")
    show.add_argument("source", metavar="REPO_OR_DIR", help="local folder or Hub model repo id holding lr_trajectory.*")
    show.add_argument("--revision", default=None, help="Hub revision (branch, tag or commit) to download")
    show.add_argument("--plots-dir", default="lr_trajectory_plots",
                      help="where to write the PNG plots (default: ./lr_trajectory_plots)")
    show.add_argument("--no-plots", action="store_true", help="only print the summary")
    show.add_argument("--json", action="store_true", help="print the summary as JSON instead of Markdown")

    avg = sub.add_parser(
        "average", help="average the trajectories of runs on the same train set (e.g. several seeds) and save the "
                        "result; k-fold runs, each on another subset, need each fold's positions in the full train set: "
                        "LRTrajectory.average(..., instance_indices=..., dataset=...), as examples/kfold_replay.py does")
    avg.add_argument("output_dir", metavar="OUT_DIR", help="a new folder (or one without a trajectory, see --overwrite)")
    avg.add_argument("sources", metavar="RUN", nargs="+", help="local folders or Hub repo ids")
    avg.add_argument("--overwrite", action="store_true",
                     help="replace a trajectory already in OUT_DIR (refused otherwise: OUT_DIR may be a run's folder)")

    push = sub.add_parser("push", help="upload a saved trajectory (with plots and a card) to a Hub model repo; a "
                                       "card the repo already has (a model's) is kept, with the trajectory's section "
                                       "added")
    push.add_argument("source", metavar="DIR", help="folder holding lr_trajectory.safetensors/.json")
    push.add_argument("repo_id", metavar="REPO_ID", help="the Hub model repo, e.g. me/my-model (created when missing)")
    push.add_argument("--private", action="store_true", default=None,
                      help="create the repo private; an existing public repo is refused (its visibility is not "
                           "changed)")
    push.add_argument("--revision", default=None, help="branch to push to (created when missing)")
    return parser


def _check_average_output(output_dir: str, sources: Sequence[str], overwrite: bool) -> None:
    """Refuse an OUT_DIR that is one of the runs, or that holds a trajectory already (without ``overwrite``): a
    forgotten OUT_DIR would otherwise replace a run's trajectory with an average, beside that run's model."""
    from .trajectory import TRAJECTORY_CONFIG_NAME, TRAJECTORY_TENSORS_NAME

    out = os.path.abspath(output_dir)
    if any(os.path.isdir(s) and os.path.abspath(s) == out for s in sources):
        raise ValueError(f"OUT_DIR {output_dir} is one of the runs to average: give a new folder first, e.g. "
                         f"hf-ddlr average averaged {' '.join(sources)}")
    held = [n for n in (TRAJECTORY_TENSORS_NAME, TRAJECTORY_CONFIG_NAME) if os.path.isfile(os.path.join(out, n))]
    if held and not overwrite:
        raise ValueError(f"OUT_DIR {output_dir} already holds a trajectory ({', '.join(held)}): give a new folder "
                         "first (hf-ddlr average OUT_DIR RUN [RUN ...]), or --overwrite to replace it.")


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``hf-ddlr`` console script; returns the exit status."""
    args = _build_parser().parse_args(argv)
    from .trajectory import LRTrajectory

    try:
        if args.command == "show":
            if args.revision is not None and os.path.isdir(args.source):
                print(f"hf-ddlr show: warning: {args.source} is a local folder; --revision {args.revision} applies to "
                      "Hub repos only and is not used", file=sys.stderr)
            traj = LRTrajectory.from_pretrained(args.source, revision=args.revision)
            if args.json:
                print(json.dumps(traj.summary(), indent=2))
            else:
                ds = traj.dataset or {}
                print(f"# Learned LR trajectory: {args.source}\n")
                print(f"model: {traj.model_name or '-'}; dataset: {ds.get('id') or '-'} "
                      f"(split {ds.get('split') or '-'}, {ds.get('num_examples')} examples)\n")
                print(traj.summary_markdown())
            if not args.no_plots:
                for path in traj.save_plots(args.plots_dir):
                    print(f"wrote {path}", file=sys.stderr if args.json else sys.stdout)
        elif args.command == "average":
            _check_average_output(args.output_dir, args.sources, args.overwrite)
            if len(args.sources) == 1:
                print("hf-ddlr average: warning: one run given; its average is the run itself", file=sys.stderr)
            runs = [LRTrajectory.from_pretrained(s) for s in args.sources]
            avg = LRTrajectory.average(runs)
            for path in avg.save_pretrained(args.output_dir):
                print(f"wrote {path}")
        elif args.command == "push":
            traj = LRTrajectory.from_pretrained(args.source)
            info = traj.push_to_hub(args.repo_id, private=args.private, revision=args.revision)
            print(f"pushed to {getattr(info, 'commit_url', args.repo_id)}")
    except BrokenPipeError:  # the output piped into a command that stopped reading (`| head`): not an error
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second failure at exit's flush
        return 0
    except (FileNotFoundError, ValueError, RuntimeError, OSError) as err:
        print(f"hf-ddlr {args.command}: error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
