"""Local simulation: the whole federation on one machine through `flwr run`.

Flower's managed (1.41, 1.42) local SuperLink outlives `flwr run` and listens on fixed
ports, so kidneyfl starts its own simulation SuperLink on free loopback ports,
with runtime dependency installation disabled (otherwise Flower would `uv sync`
a CUDA build of torch), points a private ``FLWR_HOME`` at it, runs the app, and
stops the SuperLink by PID afterwards, whatever happened.
"""

from __future__ import annotations

import concurrent.futures
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

import tomli_w

from common.config import SiteConfig, load_plan, load_site_config
from common.runtime import flower_process_env
from sim import rayhead
from sim.rayhead import RayHead
from sim.superlink import (
    CONNECTION,
    SimulationError,
    SuperLink,
    bin_path,
    launch_superlink,
    write_flwr_config,
)

if TYPE_CHECKING:  # imported in simulate(): torch and monai, ~3 s
    from server.reporting.console import RunConsole

log = logging.getLogger("kidneyfl.simulate")

PROJECT_DIR = Path(__file__).resolve().parent.parent

# "0" runs a simulation the way kidneyfl did before the start-up work of
# issue 31 (one step after the other, Flower's own Ray), for comparison
# (benchmarks/startup.py); anything else, or unset, is the fast start.
FAST_START_ENV = "KIDNEYFL_FAST_START"


def fast_start() -> bool:
    """Whether :func:`simulate` starts fast (docs/benchmarks.md, "Simulation
    start-up"): Ray and the SuperLink start first and boot while this
    process prepares the run, Ray without the workers it would start ahead
    for nobody and without metrics collection; the report's sample slices
    are drawn as soon as the ServerApp returns (:class:`EarlyReport`) and the
    processes stop while they are drawn."""
    return os.environ.get(FAST_START_ENV, "1").strip() != "0"


def default_plan() -> dict[str, Any]:
    """The plan in the project's ``[tool.flwr.app.config]``."""
    import tomllib

    with open(PROJECT_DIR / "pyproject.toml", "rb") as fh:
        return dict(tomllib.load(fh)["tool"]["flwr"]["app"]["config"])


def prepare_phantoms(sites: list[SiteConfig]) -> None:
    """Write synthetic cases for sites whose YAML has a ``phantom`` section.

    Sites are written side by side, one process per core (the demo's three
    take 20 s one after another on 2 cores, 16 s side by side); each site's
    progress lines name it. A writer's error is raised here, as before.
    """
    todo = [s for s in sites if s.phantom is not None]
    workers = min(len(todo), os.cpu_count() or 1)
    if (
        workers < 2
        # sites sharing a folder are written one after another
        or len({Path(s.data.root).resolve() for s in todo}) < len(todo)
        # the pool forks: never beside another thread, which could hold a lock
        # (logging's, say) that the child would wait on for ever
        or threading.active_count() > 1
    ):
        for site in todo:
            _prepare_phantom(site)
        return
    with concurrent.futures.ProcessPoolExecutor(workers) as pool:
        for done in [pool.submit(_prepare_phantom, site) for site in todo]:
            done.result()


def _prepare_phantom(site: SiteConfig) -> None:
    """One site's phantoms and what the simulation plants in them."""
    from sim.phantoms.sites import write_site_phantom
    from sim.phantoms.survival import write_outcomes
    from sim.subgroups import plant_subgroups

    write_site_phantom(site)  # the writer of the section's task
    if site.phantom is None or site.phantom.task == "classification":
        return
    # age band planted by tumour size, sex at random (sim/subgroups.py)
    plant_subgroups(site.data.root, site.phantom.profile, site.phantom.seed)
    if site.phantom.task == "prognosis":
        # outcomes from a known hazard, read from the written scans
        write_outcomes(site.data.root, site.phantom.seed)


def stage_app(dest: Path, root: Path = PROJECT_DIR) -> Path:
    """``dest`` holding exactly the files Flower packs into the app bundle (FAB).

    ``flwr run DIR`` walks every file under DIR before it filters them; with a
    virtual environment inside the project that is ~45,000 files and ~5 s per
    run. This walk skips the folders ``.gitignore`` excludes, then applies
    Flower's own filter, so the bundle built from ``dest`` is byte-identical.
    """
    from flwr.cli.utils import (
        build_pathspec,
        filter_paths_for_publish,
        load_gitignore_patterns,
    )

    patterns = load_gitignore_patterns(root / ".gitignore")
    spec = build_pathspec(patterns)
    prune = not any(p.lstrip().startswith("!") for p in patterns)  # no re-includes
    files: dict[str, Path | bytes] = {}
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        rel = Path(dirpath).relative_to(root).as_posix()
        prefix = "" if rel == "." else f"{rel}/"
        if prune:
            dirnames[:] = [d for d in dirnames if not spec.match_file(f"{prefix}{d}/")]
        for name in filenames:
            path = Path(dirpath) / name
            if not path.is_symlink():
                files[prefix + name] = path
    shutil.rmtree(dest, ignore_errors=True)
    for rel_path, src in filter_paths_for_publish(files).items():
        target = dest / rel_path
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, target)  # type: ignore[arg-type]
    return dest


def simulate(
    site_paths: list[Path],
    run_name: str,
    out_dir: Path,
    overrides: Mapping[str, Any] | None = None,
    flwr_home: Path | None = None,
    cpus_per_site: int | None = None,
    stream: bool = True,
    verbose: bool = False,
    out: TextIO | None = None,
) -> Path:
    """Run a local federation of the given sites; returns the run directory.

    ``cpus_per_site`` is each virtual site's share of the machine (Flower's
    ``client-resources-num-cpus``); None shares the cores out among the sites
    (:func:`default_cpus_per_site`).

    With ``stream`` the terminal (``out``, default stdout) shows a banner, one
    line per round and, on a terminal, the running round's progress;
    ``verbose`` adds Flower's and Ray's own logs. Everything goes to
    ``<run>/logs/`` either way (``flwr.log``: the whole ``flwr run`` stream;
    ``superlink.log``).

    Raises
    ------
    SimulationError
        If Flower fails or the run leaves no metrics.
    """
    fast = fast_start()
    sites = _load_sites(site_paths)
    if not fast:
        prepare_phantoms(sites)
    out_dir = out_dir.resolve()
    run_dir = out_dir / run_name
    run_config = _run_config(sites, run_name, out_dir, overrides)
    plan = load_plan(run_config, "simulation plan")  # fail here, not inside Flower
    run_dir.mkdir(parents=True, exist_ok=True)
    log_dir = run_dir / "logs"
    overrides_file = run_dir / "run-config.toml"
    overrides_file.write_text(tomli_w.dumps(run_config))
    flwr_home = (flwr_home or PROJECT_DIR / ".flwr-home").resolve()
    flwr_home.mkdir(parents=True, exist_ok=True)
    # the run's own Ray folder, unless the operator chose Ray's folder or cluster
    ray_tmp = rayhead.ray_tmpdir() if fast and _ray_is_ours() else None
    env = _flower_env(flwr_home, fast, ray_tmp)
    link = launch_superlink(flwr_home, env, log_dir)
    head: RayHead | None = None
    stopping: Stopping | None = None
    early: EarlyReport | None = None
    in_main = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _raise_exit) if in_main else None
    try:
        if fast:
            # Ray and the SuperLink boot while this process writes the
            # phantoms, stages the app and imports what it needs.
            head = _launch_ray_head(env, len(sites)) if ray_tmp else None
            prepare_phantoms(sites)
        else:
            link.wait_ready()
        fed = _federation_config(len(sites), cpus_per_site, ray_head=head is not None)
        app = stage_app(flwr_home / "app")
        from server.reporting.console import RunConsole, banner  # torch, monai

        link.wait_ready()
        write_flwr_config(flwr_home, link.http_port)
        # Always `--stream`: it is what makes `flwr run` wait for the run to
        # end; the stream goes to the run's log and, filtered, to the terminal.
        cmd = [bin_path("flwr"), "run", str(app), CONNECTION]
        cmd += ["--federation-config", fed]
        cmd += ["--run-config", str(overrides_file), "--stream"]
        term = (out or sys.stdout) if stream else None
        early = EarlyReport(run_dir) if fast else None
        with RunConsole(run_dir, log_dir / "flwr.log", term, verbose) as console:
            console.say(banner(run_dir, plan, sites, log_dir, bool(plan.resume)))
            code = _run_streamed(cmd, env, console, early.line if early else None)
            if code != 0:
                raise SimulationError(
                    f"`flwr run` exited with code {code}; the whole log is "
                    f"{log_dir / 'flwr.log'}"
                )
            _wait_for_final(run_dir, link)
        # The run is over: with the fast start, its processes stop while the
        # report is redrawn.
        stopping = Stopping(link, head, ray_tmp, background=fast)
    finally:
        if stopping is None:  # failed or interrupted: stop everything first
            Stopping(link, head, ray_tmp, background=False)
        if in_main:
            signal.signal(signal.SIGTERM, previous)
    try:
        if not (run_dir / "metrics.jsonl").exists():
            raise SimulationError(
                f"run {run_name} wrote no metrics; see {log_dir}/flwr.log and "
                f"{log_dir}/superlink.log"
            )
        if early is None or not early.join():
            redraw_report(run_dir)
    finally:
        if early is not None:
            early.join()
        stopping.join()  # (set: the try above ended without an exception)
    return run_dir


def _load_sites(site_paths: list[Path]) -> list[SiteConfig]:
    """The site YAMLs, validated; names must be unique."""
    sites = [load_site_config(p) for p in site_paths]
    names = [s.name for s in sites]
    if len(set(names)) != len(names):
        raise SimulationError(f"site names must be unique, got {names}")
    return sites


def _run_config(
    sites: list[SiteConfig],
    run_name: str,
    out_dir: Path,
    overrides: Mapping[str, Any] | None,
) -> dict[str, Any]:
    """The project's plan with the overrides and what the simulation sets."""
    run_config = default_plan()
    run_config.update(overrides or {})
    if run_config.get("initial-checkpoint"):  # the ServerApp runs elsewhere
        initial = Path(str(run_config["initial-checkpoint"])).expanduser().resolve()
        run_config["initial-checkpoint"] = str(initial)
    run_config.update(
        {
            "sim-site-configs": ",".join(str(s.source) for s in sites),
            "out-dir": str(out_dir),
            "run-name": run_name,
        }
    )
    return run_config


def _flower_env(
    flwr_home: Path, fast: bool = False, ray_tmp: Path | None = None
) -> dict[str, str]:
    """The environment of every Flower process: no runtime installs, no
    update check, unbuffered, this interpreter's entry points first; with
    ``fast``, Ray's settings for a quick start (:func:`_ray_env`), and with
    ``ray_tmp`` Ray's folder for this run (``RAY_TMPDIR``)."""
    env = dict(os.environ)
    env.update(
        FLWR_HOME=str(flwr_home),
        FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION="1",
        FLWR_DISABLE_UPDATE_CHECK="1",
        RAY_DEDUP_LOGS="0",
        PYTHONUNBUFFERED="1",
        # flower-superlink spawns flower-superexec and flwr-simulation by name.
        PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
    )
    flower_process_env(env)
    if fast:
        for key, value in _ray_env().items():
            env.setdefault(key, value)  # the operator's own value wins
    if ray_tmp is not None:
        env["RAY_TMPDIR"] = str(ray_tmp)
    return env


def _ray_is_ours() -> bool:
    """Whether this run may give Ray its own folder (and start its cluster
    ahead): not when the operator set Ray's folder or a cluster to join."""
    return not (os.environ.get("RAY_TMPDIR") or os.environ.get("RAY_ADDRESS"))


def _ray_env() -> dict[str, str]:
    """Ray's settings (its ``RAY_<config>`` variables) for the simulation.

    - ``RAY_prestart_worker_first_driver=0``: Ray starts one idle worker per
      core when the first driver connects, for tasks; the simulation runs
      actors, which get workers of their own, so those are started for
      nobody (about 0.5 s of CPU each, while the actors start).
    - ``RAY_enable_metrics_collection=0``: no metrics recorded or exported
      (there is no dashboard to read them).
    """
    return {
        "RAY_prestart_worker_first_driver": "0",
        "RAY_enable_metrics_collection": "0",
    }


def _launch_ray_head(env: Mapping[str, str], n_sites: int) -> RayHead | None:
    """Start the run's Ray cluster ahead of Flower (:mod:`sim.rayhead`);
    None, and Flower starts Ray as before, if the helper cannot start."""
    try:
        return rayhead.launch(env, ray_cpus(n_sites, os.cpu_count() or 2))
    except OSError:
        log.warning("could not start Ray ahead of Flower", exc_info=True)
        return None


class Stopping:
    """Stops the run's SuperLink and Ray (each by PID, with every process it
    started), in the background or at once; :meth:`join` waits for both and
    removes the run's Ray folder."""

    def __init__(
        self,
        link: SuperLink,
        head: RayHead | None,
        ray_tmp: Path | None,
        background: bool,
    ) -> None:
        self._ray_tmp = ray_tmp
        stops = [link.stop] + ([head.stop] if head is not None else [])
        self._threads = [threading.Thread(target=f, daemon=True) for f in stops]
        for t in self._threads:
            t.start()
        if not background:
            self.join()

    def join(self) -> None:
        for t in self._threads:
            t.join()
        if self._ray_tmp is not None:
            shutil.rmtree(self._ray_tmp, ignore_errors=True)


def _federation_config(
    n_sites: int, cpus_per_site: int | None, ray_head: bool = False
) -> str:
    """Flower's ``--federation-config``: one virtual node per site, the cores
    (and GPUs) shared out among them.

    With ``ray_head`` the simulation joins the cluster :mod:`sim.rayhead`
    started with the cores, and Ray refuses ``num_cpus`` from a driver that
    joins a cluster: ``init-args-num-cpus`` is left out.
    """
    cores = ray_cpus(n_sites, os.cpu_count() or 2)
    if cpus_per_site is None:
        cpus_per_site = default_cpus_per_site(n_sites, cores)
    cfg = (
        f"num-supernodes={n_sites} client-resources-num-cpus={int(cpus_per_site)} "
        f"client-resources-num-gpus={_gpus_per_site()} "
    )
    if not ray_head:
        cfg += f"init-args-num-cpus={cores} "
    return cfg + 'init-args-logging-level="ERROR"'


def redraw_report(run_dir: Path) -> None:
    """Redraw the run's report with sample slices of the phantom sites.

    The coordinator wrote the report without them (it never reads a site's
    data); a simulation knows its sites are phantoms and adds them here.
    """
    from server.deliver import report
    from sim.samples import sample_slices

    if not (run_dir / "final" / "latest.json").is_file():
        return
    try:
        report(run_dir, samples=sample_slices)
    except Exception:  # noqa: BLE001 - the run is saved; `kidneyfl report` retries
        log.warning("redrawing the report with sample slices failed", exc_info=True)


class EarlyReport:
    """Redraws the report with sample slices (:func:`redraw_report`) as soon
    as the ServerApp has returned, while Flower stops (about 1.5 s: its
    workers' 1 s queue timeouts, the actors, the log stream's last polls).

    The ServerApp has returned when Flower logs :data:`MARK` (also after an
    exception: the run must also be ``finished`` in ``status.json``, with its
    final model). Nothing writes the report after that. Without the line the
    report is redrawn after ``flwr run`` ends, as before.
    """

    MARK = "ServerApp finished running."  # flwr/simulation/run_simulation.py

    def __init__(self, run_dir: Path) -> None:
        self.run_dir = run_dir
        self._thread: threading.Thread | None = None

    def line(self, text: str) -> None:
        """One line of Flower's stream."""
        if self._thread is not None or self.MARK not in text:
            return
        try:
            state = json.loads((self.run_dir / "status.json").read_text())["state"]
        except (OSError, ValueError, KeyError, TypeError):
            return
        if state == "finished" and (self.run_dir / "final" / "latest.json").is_file():
            self._thread = threading.Thread(
                target=redraw_report, args=(self.run_dir,), daemon=True
            )
            self._thread.start()

    def join(self) -> bool:
        """Wait for the redraw; False if it never started."""
        if self._thread is None:
            return False
        self._thread.join()
        return True


def _run_streamed(
    cmd: list[str],
    env: Mapping[str, str],
    console: RunConsole,
    on_line: Callable[[str], None] | None = None,
) -> int:
    """Run ``cmd``, handing each line of its output to ``console`` (and
    ``on_line``)."""
    with subprocess.Popen(
        cmd,
        env=dict(env),
        cwd=PROJECT_DIR,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        text=True,
        errors="replace",
        bufsize=1,
    ) as proc:
        assert proc.stdout is not None  # PIPE above
        for line in proc.stdout:
            console.stream_line(line)
            if on_line is not None:
                on_line(line)
        return proc.wait()


def _raise_exit(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)


def _wait_for_final(run_dir: Path, link: SuperLink, timeout: float = 120) -> None:
    # `--stream` returns once the run finishes; the final model is written just
    # before, so allow a moment for the file system.
    deadline = time.monotonic() + timeout
    while (
        time.monotonic() < deadline and not (run_dir / "final" / "latest.json").exists()
    ):
        if link.process.poll() is not None:
            return
        time.sleep(0.5)


def ray_cpus(n_sites: int, cores: int) -> int:
    """The CPUs Ray is told the machine has: its cores, or one per site when
    there are a few more sites than cores (at most 1.5 x).

    Ray counts CPUs only to decide how many actors (sites) run at once, and
    gives each actor ``floor(its CPUs)`` threads. The 3-site demo on 2 cores
    ran in two waves: two sites, then the third alone on one core while the
    other idled, in every training and evaluation of every round. Told 3
    CPUs, Ray runs the three single-threaded sites in one wave that keeps
    both cores busy to the end (docs/benchmarks.md). Flower 1.42's
    ``client-resources-num-cpus`` is an integer on its wire, so a fractional
    share per site is not an option. With many more sites than cores, as
    many run at once as there are cores, so memory stays that of ``cores``
    sites (benchmarks/sim_scale.py).
    """
    if n_sites < 1 or cores < 1:
        raise ValueError(f"need at least one site and one core, got {n_sites}, {cores}")
    return n_sites if cores < n_sites and 2 * n_sites <= 3 * cores else cores


def default_cpus_per_site(n_sites: int, cores: int) -> int:
    """Cores per virtual site so that the sites share the machine.

    Each site's Ray actor reserves ``cores // n_sites`` CPUs (at least one),
    so as many sites train at once as the cores allow. For the small default
    models, sites in parallel beat one site at a time with more CPUs: the
    3-site demo on 2 cores runs
    14 % faster with one core per site (two sites at a time) than with two
    (one at a time), with the same result (docs/benchmarks.md).
    """
    if n_sites < 1 or cores < 1:
        raise ValueError(f"need at least one site and one core, got {n_sites}, {cores}")
    return max(1, cores // n_sites)


def _gpus_per_site() -> float:
    try:
        import torch

        return 1.0 if torch.cuda.is_available() else 0.0
    except ImportError:
        return 0.0
