"""Classification data at a site: its slices read, split by patient, loaded.

Discovery (manifest or class folders) is :mod:`client.data.class_layouts`'s
and the split :mod:`client.data.split`'s, shared with segmentation. Images are
2D or 3D NIfTI in HU (a 3D volume gives its middle axial slice) or 8-bit PNG
slices already windowed; an unreadable image is skipped with its reason, as a
broken segmentation case is (``kidneyfl site check`` names it).

The patient is the unit of privacy: the training set's items are patients, and
each time Poisson sampling draws a patient one of its slices is taken, so
DP-SGD's per-sample clipping bounds one patient's influence however many slices
the patient has. A patient in both training and validation, or identical images
under two patient ids, are refused (:mod:`client.data.patients`).

Each patient's randomness is its own (issue 27): which of a patient's slices an
item gives and its flips are seeded from the round's seed, the patient's id
(hashed) and how often the patient has been drawn this round, never from a
stream shared with the other patients (:mod:`client.tasks.draws`). The one
exception is ``balanced``, a resampler for training without DP only: it picks
an epoch's slices by the site's class counts, which is its purpose.

Every error names the file and the fix. Nothing here leaves the site.
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
import torch.nn.functional as F

from client.data.class_layouts import PNG_SUFFIXES, ClsCase, discover_classes
from client.data.errors import SiteDataError
from client.data.patients import (
    PatientProblem,
    Unit,
    file_digest,
    patient_problems,
    refuse,
)
from client.data.split import leave_out, split_by_patient
from client.tasks.draws import PatientDraws
from common.config import Plan, SiteConfig

log = logging.getLogger(__name__)


def load_site_slices(
    site: SiteConfig, plan: Plan
) -> tuple[list[ClsCase], list[ClsCase], dict[str, str]]:
    """Discover, leave out ``data.exclude_cases`` and unreadable images, split.

    Returns
    -------
    tuple
        Training cases, validation cases, and skipped case id -> why (local).

    Raises
    ------
    SiteDataError
        A discovery error, an unknown ``data.exclude_cases`` id, no labelled
        training image, or a broken patient rule.
    """
    skipped: dict[str, str] = {}
    cases = leave_out(discover_classes(site, plan), site.data.exclude_cases, skipped)
    readable = []
    for c in cases:
        if c.label is not None and (problem := slice_problem(c.image, plan)):
            log.warning("skipping case %s: %s", c.case_id, problem)
            skipped[c.case_id] = problem
        else:
            readable.append(c)
    train, val = split_cases(readable, site)
    return train, val, skipped


def slice_problem(path: Path, plan: Plan) -> str | None:
    """Why an image cannot be read as a slice (None: it can)."""
    try:
        load_slice(path, plan)
    except SiteDataError as exc:
        return str(exc)
    return None


def split_cases(
    cases: list[ClsCase], site: SiteConfig
) -> tuple[list[ClsCase], list[ClsCase]]:
    """Train and validation cases, labelled and not ``test`` rows only, split
    by patient (:func:`client.data.split.split_by_patient`, stratified by a
    patient's most common class).

    Raises
    ------
    SiteDataError
        No labelled training image; a patient in both training and validation,
        an image listed twice, or identical images under two patient ids.
    """
    train, val, problems = split_patients(cases, site)
    refuse(problems, site.name)
    return train, val


def split_patients(
    cases: list[ClsCase], site: SiteConfig
) -> tuple[list[ClsCase], list[ClsCase], list[PatientProblem]]:
    """:func:`split_cases` without refusing: the split and what breaks the
    patient rules (the readiness check reports them)."""
    labelled = [c for c in cases if c.label is not None]
    train, val = split_by_patient(
        labelled, site, lambda c: c.split or "", _patient_class
    )
    units = [
        Unit(c.case_id, c.patient_id, c.image, file_digest(c.image), side)
        for side, group in (("train", train), ("validation", val))
        for c in group
    ]
    return train, val, patient_problems(units, one_case_per_patient=False)


def _patient_class(group: list[ClsCase]) -> int:
    labels = [int(c.label or 0) for c in group]
    return max(sorted(set(labels)), key=labels.count)


def load_slice(path: Path, plan: Plan) -> torch.Tensor:
    """One image as a (1, S, S) float tensor in [0, 1], S = the plan's image-size.

    NIfTI in HU is clipped to the plan's ``hu-window`` and scaled to [0, 1]; a
    3D volume gives its middle axial slice. PNG is taken as already windowed
    (0-255). The slice is resized (area interpolation) to S x S.

    Raises
    ------
    SiteDataError
        The file cannot be read or is not a 2D slice or 3D volume.
    """
    name = path.name.lower()
    try:
        if name.endswith(PNG_SUFFIXES):
            from PIL import Image

            with Image.open(path) as im:
                arr = np.asarray(im.convert("L"), dtype=np.float32) / 255.0
        else:
            img = nib.load(str(path))
            if img.ndim == 3:
                img = nib.as_closest_canonical(img)
            arr = np.asarray(img.dataobj, dtype=np.float32)
            if arr.ndim == 4 and arr.shape[3] == 1:
                arr = arr[..., 0]
            if arr.ndim == 3:
                arr = arr[:, :, arr.shape[2] // 2]
            lo, hi = plan.hu_window
            arr = (np.clip(arr, lo, hi) - lo) / (hi - lo)
    except SiteDataError:
        raise
    except Exception as exc:  # nibabel and PIL raise many types
        raise SiteDataError(
            f"{path}: cannot read the image ({type(exc).__name__}: {exc}); "
            "replace the file or remove it from the manifest"
        ) from None
    if arr.ndim != 2 or min(arr.shape) < 2 or not np.isfinite(arr).all():
        raise SiteDataError(
            f"{path}: expected a 2D slice or 3D volume with finite values, got "
            f"shape {arr.shape}; replace the file"
        )
    t = torch.from_numpy(np.ascontiguousarray(arr))[None, None]
    size = (plan.image_size, plan.image_size)
    return F.interpolate(t, size=size, mode="area")[0].float()


class SliceDataset(torch.utils.data.Dataset):
    """Preloaded slices grouped by patient; items are patients.

    ``len`` is the number of patients, and item ``i`` is one slice of patient
    ``i`` with its label, drawn at random at each access: Opacus' Poisson
    sampling over the items draws patients, so one patient is one sample for
    DP-SGD's clipping whatever its number of slices. Items are ``(image,
    label)`` tuples, as Opacus needs; ``images`` and ``labels`` keep every
    slice (evaluation reads them all).

    ``augment`` flips slices at random (the class does not depend on side or
    orientation). ``balanced`` redraws, at each :meth:`set_seed`, which slices
    an epoch visits, as many as there are patients, with equal probability per
    class (a weighted sampler that survives ``DataLoader(shuffle=True)``); only
    without DP, since it shows a patient more than once.

    The slice and the flips of a draw come from a generator seeded by (round
    seed, patient, draw) alone (:class:`client.tasks.draws.PatientDraws`): one
    generator shared by the patients would make a patient's flips depend on
    which patients were fetched before it.

    Parameters
    ----------
    keys : list of str, optional
        A stable local key per patient (:func:`build_dataset` passes the
        patient ids); default: a digest of the patient's slices. Not the
        index, which shifts when a patient is added or removed.
    """

    def __init__(
        self,
        images: torch.Tensor,
        labels: torch.Tensor,
        augment: bool = False,
        balanced: bool = False,
        patients: list[list[int]] | None = None,
        keys: list[str] | None = None,
    ) -> None:
        self.images, self.labels = images, labels
        self.augment, self.balanced = augment, balanced
        self.patients = (
            patients if patients is not None else [[j] for j in range(len(labels))]
        )
        if keys is None:
            keys = [_slices_digest(images[g]) for g in self.patients]
        if len(keys) != len(self.patients):
            raise ValueError(f"{len(keys)} keys for {len(self.patients)} patients")
        self.draws = PatientDraws(keys)
        self._owner = {j: p for p, g in enumerate(self.patients) for j in g}
        self.drawn: list[int] | None = None  # balanced: slice per item

    def __len__(self) -> int:
        return len(self.patients)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        if self.drawn is not None:
            j = self.drawn[i]
            gen = torch.Generator().manual_seed(self.draws.next(self._owner[j]))
        else:
            gen = torch.Generator().manual_seed(self.draws.next(i))
            group = self.patients[i]
            j = group[0]
            if len(group) > 1:
                j = group[int(torch.randint(len(group), (1,), generator=gen))]
        x = self.images[j]
        if self.augment:
            flips = torch.rand(2, generator=gen) < 0.5
            dims = [d + 1 for d in range(2) if flips[d]]
            if dims:
                x = torch.flip(x, dims)
        return x, self.labels[j]

    def set_seed(self, seed: int) -> None:
        """Start a round: its seed, every patient's draw count at zero and,
        when balanced, the visited slices redrawn."""
        self.draws.reset(seed)
        if self.balanced and len(self.labels):
            counts = torch.bincount(self.labels).float()
            w = 1.0 / counts[self.labels]
            g = torch.Generator().manual_seed(seed)
            drawn = torch.multinomial(w, len(self.patients), True, generator=g)
            self.drawn = drawn.tolist()

    def class_counts(self, n_classes: int) -> list[int]:
        """Slices per class (local only; never sent)."""
        return torch.bincount(self.labels, minlength=n_classes).tolist()


def build_dataset(
    cases: list[ClsCase], plan: Plan, augment: bool = False, balanced: bool = False
) -> SliceDataset:
    """Load ``cases`` into a :class:`SliceDataset`, one item per patient."""
    size = plan.image_size
    images = (
        torch.stack([load_slice(c.image, plan) for c in cases])
        if cases
        else torch.zeros((0, 1, size, size))
    )
    labels = torch.tensor([int(c.label or 0) for c in cases], dtype=torch.long)
    groups: dict[str, list[int]] = {}
    for j, c in enumerate(cases):
        groups.setdefault(c.patient_id, []).append(j)
    return SliceDataset(
        images, labels, augment, balanced, list(groups.values()), list(groups)
    )


def _slices_digest(slices: torch.Tensor) -> str:
    # a patient's own pixels: stable when other patients come or go
    return hashlib.sha256(slices.numpy().tobytes()).hexdigest()


def fingerprint(ds: SliceDataset) -> str:
    """Digest of the training pixels and labels, for the privacy ledger."""
    h = hashlib.sha256()
    h.update(ds.images.numpy().tobytes())
    h.update(ds.labels.numpy().tobytes())
    return h.hexdigest()[:16]
