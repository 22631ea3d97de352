"""Entry point of the ``kidneyfl`` console script.

The only module allowed to import both sides; each subcommand parses its
arguments and calls one library function.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from cli import pretrain as pretrain_cli
from client import cli as site_cli
from common.logs import setup_logging
from server import cli as server_cli
from server import coordinator_cli

try:  # simulation and research commands; not in a hospital's site image
    from sim import cli as sim_cli
except ImportError:  # pragma: no cover - the images copy client/common/server only
    sim_cli = None


def _sample_slices(run_dir: Path) -> tuple[list, list[str]]:
    """A simulated run's sample slices, for ``kidneyfl report`` (``sim.samples``)."""
    from sim.samples import sample_slices  # torch: not needed for `kidneyfl --help`

    return sample_slices(run_dir)


def _predict(args: argparse.Namespace) -> int:
    import json

    from client.predict import predict, summary_lines

    summary = predict(
        Path(args.checkpoint),
        Path(args.source),
        output=Path(args.output) if args.output else None,
        json_path=Path(args.json) if args.json else None,
        device=args.device,
        force=args.force,
        task_options=_prognosis_options(args),
    )
    for line in summary_lines(summary):
        print(line)
    if args.json:
        print(f"summary: {args.json}")
    elif not args.output:
        print(json.dumps(summary["cases"], indent=2))
    return 0


def _prognosis_options(args: argparse.Namespace) -> dict[str, object]:
    """``predict``'s prognosis flags that were given (other tasks get none)."""
    given = {
        "labels": Path(args.labels) if args.labels else None,
        "segmentation_model": (
            Path(args.segmentation_model) if args.segmentation_model else None
        ),
        "age": args.age,
        "sex": args.sex,
    }
    return {k: v for k, v in given.items() if v is not None}


def _export(args: argparse.Namespace) -> int:
    from server.export import export_model

    paths = export_model(
        Path(args.checkpoint), Path(args.out_dir) if args.out_dir else None
    )
    print(f"TorchScript model: {paths['model']}")
    print(f"preprocessing:     {paths['preprocessing']}")
    return 0


def _add_model_commands(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "predict",
        help="apply a trained model to a NIfTI scan (or a folder of scans): "
        "segmentation, class, or risk and survival curve",
        allow_abbrev=False,
    )
    p.add_argument("source", help="a NIfTI scan, or a folder of them")
    p.add_argument(
        "--checkpoint", required=True, help="checkpoint folder, e.g. runs/<run>/final"
    )
    p.add_argument(
        "-o",
        "--output",
        default=None,
        help="output NIfTI (for a scan) or folder (for a folder of scans)",
    )
    p.add_argument("--json", default=None, help="write the summary (volumes) as JSON")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument(
        "--force",
        action="store_true",
        help="predict even on a scan unlike the training data (not CT in HU, "
        "spacing or field of view outside what the run saw); the output and "
        "the JSON then carry a warning",
    )
    g = p.add_argument_group(
        "prognosis models", "the crop's labels and the patient's covariates"
    )
    g.add_argument(
        "--labels", default=None, help="the scan's KiTS label map (same grid)"
    )
    g.add_argument(
        "--segmentation-model",
        default=None,
        metavar="CHECKPOINT",
        help="a kidneyfl segmentation model to find kidney and tumour instead",
    )
    g.add_argument("--age", type=float, default=None, help="age in years")
    g.add_argument("--sex", choices=["f", "m"], default=None)
    p.set_defaults(func=_predict)
    e = sub.add_parser(
        "export",
        help="write a checkpoint as TorchScript with its preprocessing JSON",
        allow_abbrev=False,
    )
    e.add_argument("checkpoint", help="checkpoint folder, e.g. runs/<run>/final")
    e.add_argument(
        "--out-dir",
        default=None,
        help="where to write (default: the checkpoint folder)",
    )
    e.set_defaults(func=_export)


# One example per subcommand, shown at the end of its --help.
EXAMPLES: dict[str, str] = {
    "phantom": "kidneyfl phantom --out data/phantoms/x --cases 10",
    "site": "kidneyfl site check sites/hospital-a.yaml",
    "site privacy": "kidneyfl site privacy sites/hospital-a.yaml",
    "site check": "kidneyfl site check sites/hospital-a.yaml --json",
    "site keygen": "kidneyfl site keygen keys/hospital-a --comment hospital-a",
    "site start": "kidneyfl site start sites/hospital-a.yaml  (--print: show it)",
    "site approve": "kidneyfl site approve sites/hospital-a.yaml bundle.fab",
    "site approvals": "kidneyfl site approvals sites/hospital-a.yaml",
    "site audit": "kidneyfl site audit sites/hospital-a.yaml --verify",
    "site executor": "kidneyfl site executor sites/hospital-a.yaml  (started by "
    "`site start`)",
    "site audit-privacy": "kidneyfl site audit-privacy sites/hospital-a.yaml "
    "--checkpoint runs/<run>/final",
    "coordinator": "kidneyfl coordinator status runs/<run> --connection consortium",
    "coordinator superlink": "kidneyfl coordinator superlink --certs certs "
    "--state /var/lib/kidneyfl/superlink",
    "coordinator connect": "kidneyfl coordinator connect consortium --address "
    "fl.consortium.example:9092 --root-certificates certs/ca.crt",
    "predict": "kidneyfl predict --checkpoint runs/<run>/final scan.nii.gz -o "
    "mask.nii.gz --json volumes.json",
    "export": "kidneyfl export runs/<run>/final",
}


def add_examples(parser: argparse.ArgumentParser, path: str = "") -> None:
    """Give every subcommand without an epilog its example from EXAMPLES."""
    for action in parser._actions:
        if not isinstance(action, argparse._SubParsersAction):
            continue
        for name, sub in action.choices.items():
            key = f"{path} {name}".strip()
            if not sub.epilog and key in EXAMPLES:
                sub.epilog = f"example: {EXAMPLES[key]}"
            add_examples(sub, key)


def build_parser() -> argparse.ArgumentParser:
    """All subcommands, with long kebab-case flags."""
    parser = argparse.ArgumentParser(
        prog="kidneyfl",
        description="Federated kidney CT segmentation with differential privacy.",
        allow_abbrev=False,
    )
    sub = parser.add_subparsers(dest="command", required=True)
    if sim_cli is not None:
        sim_cli.register(sub)
    server_cli.register(sub, samples=_sample_slices)
    site_cli.register(sub)
    coordinator_cli.register(sub)
    pretrain_cli.register(sub)
    _add_model_commands(sub)
    add_examples(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run one subcommand; errors print one clear line and exit non-zero."""
    setup_logging()
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (
        ValueError,
        RuntimeError,
        FileExistsError,
        FileNotFoundError,
        KeyError,
    ) as exc:
        logging.getLogger("kidneyfl").debug("error", exc_info=True)
        print(f"kidneyfl {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
