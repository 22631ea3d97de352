"""The readiness check hospital IT runs before joining a federation.

``kidneyfl site check sites/<site>.yaml [--json] [--allow-skips]`` validates the
YAML, asks the site's task to check its data (``Task.check``: every case
inspected, what would break one-patient-one-unit, unlabelled cases, class counts
overall and per split), warns when the site has too few patients for DP-SGD
to learn or for its validation metrics to be released, and checks the
environment: device, free disk and write access for the state directory, the
privacy ledger, and optionally that the coordinator's address answers and its
TLS certificate verifies, and that the site's gate would run a bundle: with
``governance.require_approval`` on (the default) at least one approved hash,
listed by its short form. Its output is for the site's own terminal and never
leaves the site.

The verdict (``ok``, the last line): training refuses a site with a setup
error, a patient problem or fewer than two usable cases, so those always fail;
a case with an ERROR fails the check too unless the operator passes
``--allow-skips`` (training then leaves such cases out) or lists it under
``data.exclude_cases``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from client.data.case_check import FATAL, WARN, Finding
from client.data.check_report import MIN_CASES, DataCheck
from client.data.errors import SiteDataError
from client.data.patients import KINDS as PATIENT_KINDS
from client.data.subgroups import read_subgroups
from client.environment import (
    check_environment,
    check_governance,
    check_node_command,
    check_superlink,
)
from client.node import check_clientappio_port
from client.tasks.registry import site_task
from common.config import ConfigError, SiteConfig, load_site_config

# Rule of thumb from measurement (docs/architecture.md, "Demo model and data
# size"): at epsilon 8, DP-SGD did not learn on 15-45 training cases per site
# and did on 150. The relative noise falls as 1/N, so fewer is worth a warning.
DP_MIN_TRAIN_PATIENTS = 50


@dataclass
class SiteCheck(DataCheck):
    """Everything the check found: the data part (filled by the site's task)
    plus the environment. ``ok`` is False when the site is not ready."""

    site: str = "?"
    config: str = ""
    task: str = "segmentation"
    environment: dict[str, Any] = field(default_factory=dict)
    allow_skips: bool = False

    @property
    def cases_left_out(self) -> int:
        """Labelled cases training will not use: broken or excluded."""
        broken = set(self.cases_with_errors) - set(self.cases_unlabelled)
        return len(broken) + len(self.cases_excluded)

    @property
    def blocking(self) -> list[Finding]:
        """Errors that make training refuse whatever is skipped."""
        return [
            f
            for f in self.findings
            if f.severity == FATAL
            and (f.kind.startswith("setup-") or f.kind in PATIENT_KINDS)
        ]

    @property
    def ok(self) -> bool:
        """Ready: training would start, and no case error is left unacknowledged."""
        return (
            not self.blocking
            and self.cases_usable >= MIN_CASES
            and (self.allow_skips or not self.cases_with_errors)
        )

    @property
    def verdict(self) -> str:
        """The last line: ready or not, cases that will train and left out."""
        use, out = self.cases_usable, self.cases_left_out
        extra = (
            f"; {len(self.cases_unlabelled)} unlabelled (prediction only)"
            if self.cases_unlabelled
            else ""
        )
        if self.ok:
            return f"READY: {use} cases will train, {out} left out{extra}"
        if self.blocking or use < MIN_CASES:
            kinds = sorted({f.kind for f in self.blocking}) or ["too few cases"]
            return (
                f"NOT READY: training would refuse ({', '.join(kinds)}); fix the "
                f"errors above ({use} cases usable, {out} left out)"
            )
        n = len(self.cases_with_errors)
        return (
            f"NOT READY: {n} of {self.cases_found} cases have errors (training "
            f"would use {use}, leave out {out}); fix them or pass --allow-skips"
        )

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form (for ``--json``), with the verdict fields."""
        out = asdict(self)
        out.update(
            ok=self.ok,
            verdict=self.verdict,
            cases_left_out=self.cases_left_out,
            blocking=[f.kind for f in self.blocking],
        )
        return out


def check_site(
    yaml_path: str | Path,
    superlink: str | None = None,
    root_certificates: Path | None = None,
    allow_skips: bool = False,
) -> SiteCheck:
    """Run every check; never raises for bad data or config (it reports them).

    Parameters
    ----------
    allow_skips : bool
        Cases with errors do not fail the check (training leaves them out).
    """
    report = SiteCheck(site="?", config=str(yaml_path), allow_skips=allow_skips)
    try:
        site = load_site_config(yaml_path)
    except ConfigError as exc:
        report.findings.append(
            Finding(
                "setup-config",
                FATAL,
                str(yaml_path),
                str(exc),
                "fix the YAML as the message says",
            )
        )
        return report
    report.site = site.name
    check_environment(site, report)
    check_governance(site, report)
    fed = site.federation
    if superlink is None and fed is not None:
        # The YAML's federation block: what `kidneyfl site start` will dial.
        superlink = fed.superlink
        root_certificates = None if fed.insecure else fed.root_certificates
        check_node_command(site, report)
        check_clientappio_port(site, report)
    if superlink:
        check_superlink(superlink, root_certificates, report)
    try:
        task = site_task(site)
        report.task = task.name
        task.check(site, report)
    except SiteDataError as exc:
        report.findings.append(
            Finding("setup-data", FATAL, str(site.data.root), str(exc), "fix the data")
        )
        return report
    _check_patient_counts(site, report)
    _check_subgroups(site, report)
    return report


def _check_subgroups(site: SiteConfig, report: SiteCheck) -> None:
    """The subgroup file (``subgroups.csv`` or ``kits.json``), if any: readable,
    valid values, and which groups are below the floor (never released)."""
    try:
        groups = read_subgroups(site.data.root)
    except SiteDataError as exc:
        report.findings.append(
            Finding(
                "subgroups",
                WARN,
                str(site.data.root),
                f"{exc} (training goes on without subgroups)",
                "fix the file to report metrics per group",
            )
        )
        return
    if not groups:
        return
    sizes: dict[str, int] = {}
    for values in groups.values():
        for attr, value in values.items():
            sizes[f"{attr} {value}"] = sizes.get(f"{attr} {value}", 0) + 1
    floor = site.privacy.min_cases_for_aggregates
    small = sorted(k for k, n in sizes.items() if n < floor)
    if small:
        report.findings.append(
            Finding(
                "subgroups-small",
                WARN,
                str(site.data.root),
                f"subgroups of {len(groups)} case(s): "
                + ", ".join(f"{k} ({n})" for k, n in sorted(sizes.items()))
                + f"; below the floor of {floor} patients (all splits together), "
                f"so never released: {', '.join(small)}",
                "nothing to do: their metrics stay at the site; merge values (for "
                "example scanner models into vendors) to report them",
            )
        )


def _check_patient_counts(site: SiteConfig, report: SiteCheck) -> None:
    if report.cases_usable < MIN_CASES:
        report.findings.append(
            Finding(
                "setup-too-few-cases",
                FATAL,
                str(site.data.root),
                f"{report.cases_usable} usable labelled case(s); at least {MIN_CASES} "
                "are needed",
                "fix the cases listed above or add data",
            )
        )
        return
    p = site.privacy
    if p.enabled and report.train_patients < DP_MIN_TRAIN_PATIENTS:
        report.findings.append(
            Finding(
                "dp-few-patients",
                WARN,
                str(site.source),
                f"{report.train_patients} training patient(s), fewer than "
                f"{DP_MIN_TRAIN_PATIENTS}: under DP (ceiling epsilon "
                f"{p.max_epsilon:g}) the noise is likely to swamp what so few "
                "patients teach (a rule of thumb: at epsilon 8 DP-SGD did not "
                "learn on 15-45 cases per site and did on 150)",
                "add patients, or expect this site to add noise more than signal",
            )
        )
    if report.validation_patients < p.min_cases_for_aggregates:
        report.findings.append(
            Finding(
                "few-validation-patients",
                WARN,
                str(site.source),
                f"{report.validation_patients} validation patients, fewer than "
                f"privacy.min_cases_for_aggregates ({p.min_cases_for_aggregates}): "
                "this site's validation metrics will be withheld",
                "raise data.validation_fraction or add patients, or lower the floor "
                "if the site accepts releasing aggregates over fewer patients",
            )
        )


def format_check(report: SiteCheck) -> str:
    """Text for the site's terminal: summary table, problems by kind, and the
    verdict as the last line."""
    lines = [
        f"kidneyfl readiness check: site {report.site} ({report.config})",
        f"  layout {report.layout or '?'}",
        *(f"  note: {n}" for n in report.notes),
        f"  cases found {report.cases_found}, usable {report.cases_usable}, "
        f"with errors {len(report.cases_with_errors)}, excluded "
        f"{len(report.cases_excluded)}, unlabelled {len(report.cases_unlabelled)}, "
        f"duplicates {sum(len(d) for d in report.duplicates)}",
        f"  patients: training {report.train_patients}, validation "
        f"{report.validation_patients}",
    ]
    if report.class_cases:
        lines.append(f"  cases per class: {_counts(report.class_cases)}")
    for side, counts in sorted(report.class_cases_by_split.items()):
        lines.append(f"  {side} cases per class: {_counts(counts)}")
    env = dict(report.environment)
    approval = _approval_line(
        env.pop("require_approval", None), env.pop("approved_apps", [])
    )
    for k, v in sorted(env.items()):
        lines.append(f"  {k}: {v}")
    if approval:
        lines.append(approval)
    by_kind: dict[str, list[Finding]] = {}
    for f in report.findings:
        by_kind.setdefault(f.kind, []).append(f)
    for kind, items in sorted(by_kind.items()):
        lines.append(
            f"{items[0].severity.upper()} {kind} ({len(items)}): {items[0].fix}"
        )
        for f in items:
            lines.append(f"    {f.file}: {f.message}")
    lines.append(report.verdict)
    return "\n".join(lines)


def _approval_line(required: bool | None, approved: list[str]) -> str:
    """The approvals as one OK line (short hashes; ``site approvals`` prints
    them in full); empty where a finding already says what is wrong."""
    if not required or not approved:
        return ""
    short = ", ".join(f"sha256:{h[:12]}" for h in approved)
    return f"OK approval: required; {len(approved)} approved bundle(s): {short}"


def _counts(counts: dict[str, int]) -> str:
    return ", ".join(f"{k} {v}" for k, v in sorted(counts.items()))
