"""A demo site's synthetic data, written from its site YAML's ``phantom`` section."""

from __future__ import annotations

from collections.abc import Callable

from pydantic import ValidationError

from common.config import SiteConfig
from sim.phantoms.kits_writer import write_site
from sim.phantoms.profiles import DEFAULT_SCALE, SiteProfile, load_profile
from sim.phantoms.slices import write_cls_site_from_config


def _segmentation_phantom(site: SiteConfig) -> None:
    if site.phantom is None:
        return
    profile = site_profile(site)
    if profile.modality != site.data.modality:
        raise ValueError(
            f"site {site.name}: phantom.profile {profile.name} writes "
            f"{profile.modality} scans but data.modality is {site.data.modality}; "
            f"set data.modality: {profile.modality} or choose a "
            f"{site.data.modality} profile"
        )
    write_site(
        site.data.root,
        profile,
        site.phantom.cases,
        seed=site.phantom.seed,
        scale=site.phantom.scale or DEFAULT_SCALE,
        # only ever replaces cases it generated itself (phantom.json present)
        overwrite=True,
    )


def site_profile(site: SiteConfig) -> SiteProfile:
    """The scanner profile a site YAML's ``phantom`` section names, with its
    ``overrides`` applied.

    Raises
    ------
    ValueError
        An unknown profile, or an override that is no profile field or out of
        its range (the message names the site and the field).
    """
    assert site.phantom is not None
    profile = load_profile(site.phantom.profile)
    if not site.phantom.overrides:
        return profile
    try:
        return SiteProfile.model_validate(
            profile.model_dump() | dict(site.phantom.overrides)
        )
    except ValidationError as exc:
        fields = ", ".join(".".join(map(str, e["loc"])) for e in exc.errors())
        raise ValueError(
            f"site {site.name}: phantom.overrides: {fields}: "
            f"{exc.errors()[0]['msg']}; the fields of a profile are "
            f"{', '.join(SiteProfile.model_fields)}"
        ) from exc


def _classification_phantom(site: SiteConfig) -> None:
    write_cls_site_from_config(site)


# Writers of a demo site's synthetic data, by the site YAML's ``phantom.task``.
PHANTOM_WRITERS: dict[str, Callable[[SiteConfig], None]] = {
    "segmentation": _segmentation_phantom,
    "classification": _classification_phantom,
    # scans as for segmentation; sim.runner.prepare_phantoms adds the outcomes
    "prognosis": _segmentation_phantom,
}


def write_site_phantom(site: SiteConfig) -> None:
    """Write the synthetic cases a site YAML's ``phantom`` section asks for.

    Idempotent: complete cases written earlier with the same settings are kept.
    Does nothing for a site without a ``phantom`` section.

    Raises
    ------
    ValueError
        An unknown profile or a bad override, or a profile whose modality is
        not the site's ``data.modality``.
    """
    if site.phantom is not None:
        PHANTOM_WRITERS[site.phantom.task](site)
