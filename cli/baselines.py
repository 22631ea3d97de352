"""``kidneyfl simulate --baselines``: the glue between a finished simulated run
(the coordinator's checkpoint) and the site-side baseline training."""

from __future__ import annotations

from pathlib import Path


def simulate_baselines(site_paths: list[Path], run_dir: Path, kinds: list[str]) -> Path:
    """Train ``kinds`` baselines for ``run_dir`` and write its comparison.json.

    Raises
    ------
    FileNotFoundError
        If the run has no final model.
    """
    # imported here: torch and Opacus are not needed for `kidneyfl --help`
    from client.baselines import run_baselines
    from server.checkpoint import CheckpointError, load_checkpoint

    try:
        final_state, _ = load_checkpoint(run_dir / "final")
    except CheckpointError as exc:
        raise FileNotFoundError(f"{run_dir}: no usable final model ({exc})") from None
    return run_baselines(site_paths, run_dir, final_state, kinds)
