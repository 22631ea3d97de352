"""The tasks a site can run, by name, and which one a site's data are for."""

from __future__ import annotations

from client.data.class_layouts import is_classification
from client.tasks.base import Task
from client.tasks.classification.task import ClassificationTask
from client.tasks.prognosis.task import PrognosisTask, has_outcomes
from client.tasks.segmentation.task import SegmentationTask
from common.config import SiteConfig

TASKS = {
    "segmentation": SegmentationTask,
    "classification": ClassificationTask,
    "prognosis": PrognosisTask,
}


def get_task(name: str) -> Task:
    """A fresh site-side plug-in for a task name (the plan's ``task``).

    Raises
    ------
    KeyError
        If no task has that name, listing the known ones.
    """
    try:
        return TASKS[name]()
    except KeyError:
        raise KeyError(f"unknown task {name!r}; known: {', '.join(TASKS)}") from None


def site_task(site: SiteConfig) -> Task:
    """The task a site's data are for, read from the data alone (the readiness
    check has no plan): classification for class folders, a classification
    phantom or a manifest of class names; prognosis for scans with an outcome
    file (its check is segmentation's plus the outcomes); segmentation
    otherwise."""
    if is_classification(site):
        return get_task("classification")
    return get_task("prognosis" if has_outcomes(site) else "segmentation")
