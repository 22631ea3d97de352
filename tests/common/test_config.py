from pathlib import Path

import pytest
import yaml

from common.config import ConfigError, load_plan, load_site_config, run_folder
from sim.runner import default_plan


def _write(tmp: Path, doc: dict | str) -> Path:
    p = tmp / "site.yaml"
    p.write_text(doc if isinstance(doc, str) else yaml.safe_dump(doc))
    return p


GOOD = {
    "name": "h1",
    "data": {"root": "data/h1"},
    "state_dir": "state",
    "privacy": {"max_epsilon": 5.0, "delta": 1e-4},
}


def test_site_yaml_relative_paths_resolve_against_file(tmp_path):
    site = load_site_config(_write(tmp_path, GOOD))
    assert site.data.root == (tmp_path / "data/h1").resolve()
    assert site.state_dir == (tmp_path / "state").resolve()
    assert site.privacy.enabled and site.privacy.max_epsilon == 5.0


def test_unknown_key_names_file_key_and_fix(tmp_path):
    doc = dict(GOOD, devcie="cpu")
    with pytest.raises(ConfigError) as err:
        load_site_config(_write(tmp_path, doc))
    msg = str(err.value)
    assert "site.yaml" in msg and "devcie" in msg and "unknown key" in msg


def test_bad_value_is_named(tmp_path):
    doc = dict(GOOD, device="tpu")
    with pytest.raises(ConfigError, match="device"):
        load_site_config(_write(tmp_path, doc))


def test_cpu_threads_are_validated_and_limit_torch(tmp_path):
    import torch

    from client.prepare import apply_cpu_threads

    with pytest.raises(ConfigError, match="cpu_threads"):
        load_site_config(_write(tmp_path, dict(GOOD, cpu_threads=0)))
    assert load_site_config(_write(tmp_path, GOOD)).cpu_threads is None
    site = load_site_config(_write(tmp_path, dict(GOOD, cpu_threads=1)))
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        apply_cpu_threads(site)
        assert torch.get_num_threads() == 1
        apply_cpu_threads(load_site_config(_write(tmp_path, GOOD)))  # unset: as is
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


def test_privacy_needs_budget_unless_explicitly_disabled(tmp_path):
    doc = dict(GOOD, privacy={"enabled": True})
    with pytest.raises(ConfigError, match="max_epsilon"):
        load_site_config(_write(tmp_path, doc))
    site = load_site_config(_write(tmp_path, dict(GOOD, privacy={"enabled": False})))
    assert not site.privacy.enabled


def test_bad_yaml_and_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_site_config(_write(tmp_path, "name: [unclosed"))
    with pytest.raises(ConfigError, match="not found"):
        load_site_config(tmp_path / "nope.yaml")


def test_example_sites_are_valid():
    root = Path(__file__).resolve().parents[2] / "sites"
    sites = [load_site_config(p) for p in sorted(root.glob("hospital-*.yaml"))]
    assert len(sites) == 3
    assert len({s.phantom.profile for s in sites}) == 3  # three different scanners


def test_project_plan_is_valid_and_parses_triples():
    plan = load_plan(default_plan())
    assert len(plan.patch_size) == 3 and len(plan.spacing_mm) == 3
    assert plan.hu_window[0] < plan.hu_window[1]


@pytest.mark.parametrize(
    "override, key",
    [
        ({"patch-size": "60,64,32"}, "patch-size"),
        ({"num-server-rounds": 0}, "num-server-rounds"),
        ({"hu-window": "300,-100"}, "hu-window"),
        ({"learning-rat": 0.1}, "learning-rat"),
    ],
)
def test_plan_errors_name_the_key(override, key):
    with pytest.raises(ConfigError) as err:
        load_plan({**default_plan(), **override})
    assert key in str(err.value)


# Plan fields that no run config sets: the federated preprocessing plan fills
# them in (TOML has no null for their default None).
NOT_RUN_CONFIG = {"intensity_mean", "intensity_std"}


def _pyproject_plan() -> dict:
    import tomllib

    root = Path(__file__).resolve().parents[2]
    with open(root / "pyproject.toml", "rb") as fh:
        return tomllib.load(fh)["tool"]["flwr"]["app"]["config"]


def test_plan_defaults_are_the_pyproject_plan_key_for_key():
    # One source of plan defaults: a plan built in code (Plan()) and the plan of
    # `flwr run .` must be the same plan, key for key.
    from common.config import Plan

    section, default = _pyproject_plan(), Plan()
    fields = {f.alias or name: name for name, f in Plan.model_fields.items()}
    unknown = sorted(set(section) - set(fields))
    assert not unknown, f"[tool.flwr.app.config] keys not in Plan: {unknown}"
    missing = sorted(
        key
        for key, name in fields.items()
        if name not in NOT_RUN_CONFIG and key not in section
    )
    assert not missing, f"Plan fields missing from [tool.flwr.app.config]: {missing}"
    differ = {
        key: (value, getattr(default, fields[key]))
        for key, value in section.items()
        if getattr(load_plan({key: value}), fields[key])
        != getattr(default, fields[key])
    }
    assert not differ, f"pyproject value vs Plan default: {differ}"
    assert load_plan(section) == default


BAD_RUN_NAMES = [
    "..",
    ".",
    "../escape",
    "a/b",
    "a\\b",
    "/etc",
    "/tmp/x",
    "~root",
    "a\x00b",
    "a\nb",
    "-flag",
    "x" * 101,
    "run name",
    "\u202erun",
]


@pytest.mark.parametrize("name", BAD_RUN_NAMES)
def test_a_run_name_that_is_a_path_is_refused(name, tmp_path):
    with pytest.raises(ConfigError) as err:
        load_plan({"run-name": name})
    msg = str(err.value)
    assert "run-name" in msg and "letters, digits" in msg  # the key and the fix
    assert "\x00" not in msg and len(msg) < 400  # the bad name is shown cut
    with pytest.raises(ConfigError, match="run-name"):
        run_folder(tmp_path / "runs", name)
    assert not (tmp_path / "runs").exists()  # nothing written


@pytest.mark.parametrize("name", ["a", "kidney-2026-05", "run.1_b", "x" * 100, "a.."])
def test_honest_run_names_are_one_folder_under_out_dir(name, tmp_path):
    assert load_plan({"run-name": name}).run_name == name
    assert run_folder(tmp_path, name) == tmp_path.resolve() / name
    assert load_plan({"run-name": ""}).run_name == ""  # the coordinator names it


@pytest.mark.parametrize("out", ["", "  ", "runs/../..", "../runs", "a\x00b", "r\n"])
def test_an_out_dir_that_climbs_or_hides_is_refused(out):
    with pytest.raises(ConfigError) as err:
        load_plan({"out-dir": out})
    assert "out-dir" in str(err.value) and "give a folder" in str(err.value)
    with pytest.raises(ConfigError, match="out-dir"):
        load_plan({"out-dir": "x" * 1025})


def test_a_run_folder_linked_outside_out_dir_is_refused(tmp_path):
    (tmp_path / "runs").mkdir()
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "runs" / "linked").symlink_to(tmp_path / "elsewhere")
    with pytest.raises(ConfigError) as err:
        run_folder(tmp_path / "runs", "linked")
    assert "outside out-dir" in str(err.value) and "another run-name" in str(err.value)
    assert load_plan({"out-dir": str(tmp_path / "runs"), "run-name": "linked"})


def test_a_mixed_federation_cannot_pool_intensities():
    """The fingerprint round pools HU statistics: with MR sites in the pool a
    CT site's window would come from MR's arbitrary units."""
    import pydantic

    from common.config import Plan

    with pytest.raises(pydantic.ValidationError, match="fingerprint-round pools"):
        Plan.model_validate({"modality": "mixed", "fingerprint-round": True})
    assert Plan.model_validate({"modality": "mixed"}).modality == "mixed"
    assert Plan.model_validate({"modality": "MR", "fingerprint-round": True})
