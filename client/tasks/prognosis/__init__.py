"""The prognosis task: a kidney scan and covariates -> follow-up time and event
(issue 30; docs/prognosis.md)."""
