"""Synthetic abdominal MR phantoms: the CT phantoms' anatomy in T2-like intensities.

An MR profile (:data:`sim.phantoms.profiles.MR_PROFILES`, ``modality: MR``) paints
the anatomy of :func:`sim.phantoms.ct.anatomy` with the values of a T2-weighted,
fat-suppressed series, in arbitrary units as a scanner stores them:

- fluid is brightest: a cyst (:data:`T2_AU` ``cyst``), cerebrospinal fluid, the
  necrotic core of a large tumour;
- the kidney is bright-ish, the medulla brighter than the cortex (the reverse of
  the corticomedullary CT phase); a tumour is bright and heterogeneous (its
  texture amplitude is a third of its level); the spleen is brighter than the
  liver;
- fat (suppressed), muscle, cortical bone and flowing blood (flow voids) are dark;
  air and bowel gas give no signal.

Then the scanner: a per-case gain (arbitrary units differ between scans), a
smooth multiplicative bias field (the receive coils' sensitivity, about
0.7-1.4 across the field of view) and Rician noise (the magnitude of complex
Gaussian noise of sigma ``profile.noise_hu`` times the gain), so every value is
non-negative and the background is noise, never exactly zero. The same
``(profile, seed, scale)`` always gives the same case.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from sim.phantoms.profiles import FOV_MM, SiteProfile

# Tissue -> T2-weighted fat-suppressed intensity (arbitrary units, gain 1).
T2_AU: dict[str, float] = {
    "air": 0.0,
    "gas": 0.0,
    "fat": 50.0,
    "soft-tissue": 110.0,
    "muscle": 90.0,
    "liver": 140.0,
    "spleen": 320.0,
    "blood": 40.0,
    "bone": 150.0,
    "marrow": 200.0,
    "cortical-bone": 25.0,
    "disc": 420.0,
    "ligament": 60.0,
    "csf": 850.0,
    "cortex": 430.0,
    "medulla": 540.0,
    "tumour": 500.0,
    "tumour-texture": 160.0,
    "necrosis": 780.0,
    "cyst": 950.0,
}
GAIN_RANGE = (0.7, 1.4)
BIAS_SD = 0.12  # of each low-order term of the log bias field


def t2(tissue: str, hu: float) -> float:
    """The MR tone: a tissue's T2-like value, whatever its HU.

    Raises
    ------
    KeyError
        For a tissue :data:`T2_AU` does not list (a new tissue in the anatomy
        needs its MR value here).
    """
    return T2_AU[tissue]


def bias_field(
    grid: tuple[np.ndarray, np.ndarray, np.ndarray], rng: np.random.Generator
) -> np.ndarray:
    """A smooth multiplicative field: ``exp`` of a random quadratic in the
    coordinates, each normalised to [-1, 1] over the field of view."""
    x, y, z = (
        (ax / (fov / 2)).reshape(shape)
        for ax, fov, shape in zip(
            grid, FOV_MM, ((-1, 1, 1), (1, -1, 1), (1, 1, -1)), strict=True
        )
    )
    c = rng.normal(0.0, BIAS_SD, 7)
    log_b = c[0] * x + c[1] * y + c[2] * z + c[3] * x * x + c[4] * y * y
    log_b = log_b + c[5] * x * y + c[6] * z * z
    return np.exp(log_b).astype(np.float32)


def mr_image(vol: Any, profile: SiteProfile) -> np.ndarray:
    """The T2-like MR image of an anatomy drawn with :func:`t2` tones.

    ``vol`` is :func:`sim.phantoms.ct.anatomy`'s result for an MR profile
    (``tone=t2``), which ``sim.phantoms.ct.generate_case`` passes in: this
    module does not import the CT module, so the two import one way only.

    Returns
    -------
    numpy.ndarray
        float32, non-negative, arbitrary units: the signal times a smooth bias
        field and a per-case gain, with Rician noise.

    Raises
    ------
    ValueError
        If ``profile`` is a CT profile.
    """
    if profile.modality != "MR":
        raise ValueError(
            f"profile {profile.name} is {profile.modality}; MR phantoms need a "
            "profile with modality: MR (e.g. mr-t2)"
        )
    rng = np.random.default_rng(vol.noise_seq)
    gain = np.float32(rng.uniform(*GAIN_RANGE))
    signal = vol.image * bias_field(vol.grid, rng) * gain
    sigma = np.float32(profile.noise_hu) * gain
    real = signal + sigma * rng.standard_normal(signal.shape, np.float32)
    imag = sigma * rng.standard_normal(signal.shape, np.float32)
    return np.hypot(real, imag).astype(np.float32)
