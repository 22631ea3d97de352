"""Lesion-level numbers of a trained model, before and after each post-processing
candidate, as the federation's clinical calibration computes them (issue 28).

Runs the sites' part of ``clinical-stage`` 1 without Flower: every site's
validation patients, every rule of ``common.postprocess.CANDIDATES``, each
site's floor applied to what it would release (``client.disclosure``), the
case-weighted federated means and the coordinator's choice
(``common.postprocess.choose``). The numbers are those a run's
``clinical.json`` holds for the same model and sites.

    .venv/bin/python benchmarks/clinical_postprocess.py runs/<run>/checkpoints \\
        sites/hospital-a.yaml sites/hospital-b.yaml sites/hospital-c.yaml
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from client.disclosure import denominator_counts, release
from client.predict import load_model
from client.tasks.registry import get_task
from client.tasks.segmentation.pipeline import IMAGE, LABEL
from client.tasks.segmentation.predict import infer_probs
from common.config import load_site_config
from common.postprocess import CANDIDATES, CHOICE_KEYS, apply_rule, choose
from server.clinical_round import candidate_table
from server.reporting.clinical import lesion_line

CPU = torch.device("cpu")


@torch.no_grad()
def explain(site, model, plan, rule: str) -> str:  # noqa: ANN001
    """Where the chosen rule's remaining tumour false positives lie: in
    tumour-free validation cases, how many keep predicted tumour, and how many
    of those overlap a reference cyst (a cyst taken for a tumour). Stays here:
    per-case detail a site would never send."""
    data = get_task(plan.task).load_data(site, plan)
    free = kept = on_cyst = 0
    for i in range(len(data.validation)):
        item = data.validation[i]
        truth = item[LABEL][0].numpy()
        if (truth == 2).any():
            continue
        free += 1
        probs = infer_probs(model, item[IMAGE].unsqueeze(0), plan, CPU, tta=0)
        probs = probs.cpu().numpy()
        labels = apply_rule(
            probs.argmax(0).astype("uint8"), probs, plan.spacing_mm, rule
        )
        tumour = labels == 2
        if tumour.any():
            kept += 1
            on_cyst += int((tumour & (truth == 3)).any())
    return (
        f"{site.name}: {free} tumour-free validation cases; after {rule}, {kept} "
        f"keep predicted tumour, {on_cyst} of them on a reference cyst"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("checkpoint", type=Path)
    parser.add_argument("sites", type=Path, nargs="+")
    parser.add_argument("--json", type=Path, help="write the table here too")
    args = parser.parse_args()
    model, plan, _ = load_model(args.checkpoint)
    task = get_task(plan.task)
    per_site = {}
    for path in args.sites:
        site = load_site_config(path)
        started = time.perf_counter()
        data = task.load_data(site, plan)
        metrics = task.evaluate(model, data, plan, torch.device("cpu"), candidates=True)
        counts = denominator_counts(metrics, data.n_val, {})
        floor = site.privacy.min_cases_for_aggregates
        per_site[site.name] = release(metrics, counts, floor) | {
            "num-val-cases": data.n_val
        }
        print(
            f"{site.name}: {data.n_val} validation patients, "
            f"{time.perf_counter() - started:.0f} s"
        )
        for key in CHOICE_KEYS:
            print(
                f"  {key}: "
                + " ".join(
                    f"{per_site[site.name].get(f'pp{i}-{key}', float('nan')):.3f}"
                    for i in range(len(CANDIDATES))
                )
            )
    table = candidate_table(per_site, plan.max_site_weight)
    choice = choose(table)
    print(f"\n{'rule':<72}" + "".join(f"{k:>20}" for k in CHOICE_KEYS))
    for rule, row in table.items():
        mark = "*" if rule == choice.rule else " "
        print(
            f"{mark}{rule:<71}"
            + "".join(f"{row.get(k, float('nan')):>20.3f}" for k in CHOICE_KEYS)
        )
    print(f"\nchosen: {choice.reason}")
    for site, m in per_site.items():
        print(f"{site}: {lesion_line(m)}")
    for path in args.sites:
        print(explain(load_site_config(path), model, plan, choice.rule))
    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    "table": table,
                    "chosen": choice.rule,
                    "reason": choice.reason,
                    "sites": per_site,
                },
                indent=1,
            )
        )


if __name__ == "__main__":
    main()
