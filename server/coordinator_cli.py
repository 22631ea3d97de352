"""Commands the consortium runs to deploy: ``coordinator superlink|connect|status``."""

from __future__ import annotations

import argparse
import os
import shlex
import sys
from pathlib import Path

from common.runtime import flower_process_env
from server.deploy import STATE_DB, superlink_command, write_connection
from server.superlink_db import check_state_database


def _superlink(args: argparse.Namespace) -> int:
    cmd = superlink_command(
        Path(args.certs),
        Path(args.state),
        args.host,
        args.port,
        auth=not args.no_auth,
        operator_host=args.operator_host,
        operator_port=args.operator_port,
    )
    if args.print:
        print(shlex.join(cmd))
        return 0
    Path(args.state).mkdir(parents=True, exist_ok=True)
    # An older Flower's database is backed up before Flower migrates it; one
    # from a newer Flower stops here (StateDatabaseError).
    note = check_state_database(Path(args.state) / STATE_DB)
    if note:
        print(note, flush=True)
    env = dict(os.environ)
    env["FLWR_HOME"] = str(Path(args.state).resolve() / "flwr")  # its own apps
    # flower-superlink starts flower-superexec by name: this interpreter's first.
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    flower_process_env(env)
    os.execvpe(cmd[0], cmd, env)
    return 0  # not reached


def _connect(args: argparse.Namespace) -> int:
    home = Path(args.flwr_home or os.environ.get("FLWR_HOME") or Path.home() / ".flwr")
    path = write_connection(
        home,
        args.name,
        args.address,
        Path(args.root_certificates) if args.root_certificates else None,
        insecure=args.insecure,
    )
    print(f"connection {args.name!r} -> {args.address} written to {path}")
    if args.flwr_home or os.environ.get("FLWR_HOME"):
        print(
            f"flwr finds it only with FLWR_HOME set: `export FLWR_HOME={home}` in "
            "every shell (or service) that runs flwr or kidneyfl coordinator status"
        )
    else:
        print("flwr finds it with no variable set (Flower's default home, ~/.flwr)")
    return 0


def _plan(args: argparse.Namespace) -> int:
    from server.plan_template import write_plan

    path = write_plan(
        Path(args.path),
        run_name=args.run_name,
        out_dir=args.out_dir,
        rounds=args.rounds,
        min_sites=args.min_sites,
        expected=args.expected_sites,
        epsilon=args.epsilon,
    )
    print(f"plan written to {path}; edit it, then: flwr run . consortium -c {path}")
    return 0


def _status(args: argparse.Namespace) -> int:
    from server.reporting.site_status import coordinator_status

    if args.run_dir is None and args.connection is None:
        raise ValueError(
            "give a run folder (runs/<run>), --connection NAME, or both; e.g. "
            "kidneyfl coordinator status runs/<run> --connection consortium"
        )
    run_dir = Path(args.run_dir) if args.run_dir else None
    if run_dir is not None and not run_dir.is_dir():
        raise FileNotFoundError(
            f"{run_dir}: no such run folder; the run writes runs/<run-name>/ "
            "under the plan's out-dir"
        )
    text, _ = coordinator_status(
        run_dir,
        args.connection,
        Path(args.flwr_home) if args.flwr_home else None,
    )
    print(text)
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    """Add ``kidneyfl coordinator ...``."""
    co = sub.add_parser(
        "coordinator", help="deployment commands for the consortium", allow_abbrev=False
    )
    csub = co.add_subparsers(dest="coordinator_command", required=True)
    s = csub.add_parser(
        "superlink",
        help="start the SuperLink: TLS, node auth, a database; hospitals reach "
        "the Fleet API only, operators the control API on a second address",
        allow_abbrev=False,
    )
    s.add_argument("--certs", required=True, help="folder from docker/make-certs.sh")
    s.add_argument("--state", required=True, help="folder for the SuperLink database")
    s.add_argument(
        "--host", default="0.0.0.0", help="the hospitals' address (Fleet API only)"
    )
    s.add_argument("--port", type=int, default=9092)
    s.add_argument(
        "--operator-host",
        default="127.0.0.1",
        help="the consortium operators' address for flwr run / supernode register "
        "(Control API): loopback or the consortium's own network, never the "
        "hospitals' (default 127.0.0.1)",
    )
    s.add_argument("--operator-port", type=int, default=9093)
    s.add_argument(
        "--no-auth", action="store_true", help="let any node join (testing only)"
    )
    s.add_argument("--print", action="store_true", help="print the command only")
    s.set_defaults(func=_superlink)
    c = csub.add_parser(
        "connect",
        help="name the SuperLink for flwr run / flwr supernode register",
        allow_abbrev=False,
    )
    c.add_argument("name")
    c.add_argument("--address", required=True, metavar="HOST:PORT")
    c.add_argument("--root-certificates", default=None, metavar="CA.CRT")
    c.add_argument("--insecure", action="store_true", help="plaintext (local tests)")
    c.add_argument("--flwr-home", default=None)
    c.set_defaults(func=_connect)
    pl = csub.add_parser(
        "plan",
        help="write a deployment plan to edit (run name, out-dir, sites, rounds, "
        "epsilon), validated as the ServerApp will",
        allow_abbrev=False,
        epilog="example: kidneyfl coordinator plan plans/kits-2027.toml --run-name "
        "kits-2027 --out-dir /srv/kidneyfl/runs --expected-sites 4",
    )
    pl.add_argument("path")
    pl.add_argument("--run-name", default=None)
    pl.add_argument("--out-dir", default=None, help="absolute, on the coordinator")
    pl.add_argument("--expected-sites", type=int, default=None)
    pl.add_argument("--min-sites", type=int, default=None)
    pl.add_argument("--rounds", type=int, default=None)
    pl.add_argument("--epsilon", type=float, default=None)
    pl.set_defaults(func=_plan)
    st = csub.add_parser(
        "status",
        help="registered sites, which are online, their last round, last refusal "
        "and epsilon (SuperLink + the run's files)",
        allow_abbrev=False,
        epilog="example: kidneyfl coordinator status runs/kits-2027 --connection "
        "consortium",
    )
    st.add_argument("run_dir", nargs="?", default=None, help="runs/<run> (optional)")
    st.add_argument(
        "--connection",
        default=None,
        metavar="NAME",
        help="SuperLink connection (from `kidneyfl coordinator connect`)",
    )
    st.add_argument("--flwr-home", default=None)
    st.set_defaults(func=_status)
