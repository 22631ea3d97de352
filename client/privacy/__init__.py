"""Patient-level differential privacy at the site, one module per job.

- :mod:`client.privacy.accounting`: epsilon of a DP-SGD history (Opacus' PRV
  accountant, RDP as the fallback), noise calibration for the steps a run
  takes, and the Poisson schedule Opacus runs.
- :mod:`client.privacy.dpsgd`: DP-SGD itself: the round's settings
  (:class:`~client.privacy.dpsgd.DPSpec`), Opacus wrapping, and the generators
  seeded from the site's own entropy.
- :mod:`client.privacy.ledger`: the site's privacy ledger, its budget check
  and the spend before training, written atomically under a file lock.
- :mod:`client.privacy.membership`: membership-inference attacks on a trained
  model, at the site (``kidneyfl site audit-privacy``).
- :mod:`client.privacy.canaries`: the one-run white-box audit of the site's
  DP-SGD with gradient canaries.

Import names from the module that defines them; this package re-exports none.
"""
