"""The wire contract: every record key that crosses between a site and the
coordinator is named here, once.

Only model arrays and aggregate metrics travel. No key here may ever carry an
image, a label, a file name, a case identifier or a per-case value. How a
model's arrays travel (packed into one buffer) is :mod:`common.packing`.
"""

import re
from typing import Final

# Record names inside a Message's RecordDict.
ARRAYS: Final = "arrays"
CONFIG: Final = "config"
METRICS: Final = "metrics"
SITE: Final = "site"  # ConfigRecord in replies: the site's declared name, refusals

# ConfigRecord keys sent by the coordinator.
SERVER_ROUND: Final = "server-round"  # injected by Flower's strategies
GLOBAL_ROUND: Final = "global-round"  # round counted across resumes
RUN_ID: Final = "run-id"
TOTAL_ROUNDS: Final = "total-rounds"
# The learning rate of this train round under the plan's lr-schedule; absent
# with the constant schedule (the site uses the plan's learning-rate).
LEARNING_RATE: Final = "learning-rate"
# Rounds of this run whose train request this site was sent but whose update
# did not enter a kept aggregate (the round was discarded, or the site's update
# was rejected or never arrived): a list of ints, at most MAX_UNUSED_ROUNDS.
# The site marks the ones its ledger spent on as "spent, not used".
UNUSED_ROUNDS: Final = "unused-rounds"
MAX_UNUSED_ROUNDS: Final = 200
# The fewest patients any released aggregate may describe, as the coordinator
# asks; a site uses the larger of this and its own floor.
MIN_CASES_FOR_AGGREGATES: Final = "min-cases-for-aggregates"

# Federated preprocessing: the query's config and the plan it produces.
FINGERPRINT_MIN_CASES: Final = "fingerprint-min-cases"
PREP_SPACING: Final = "prep-spacing-mm"
PREP_WINDOW: Final = "prep-hu-window"
PREP_PATCH: Final = "prep-patch-size"
PREP_MEAN: Final = "prep-intensity-mean"
PREP_STD: Final = "prep-intensity-std"

# MetricRecord keys sent by sites. `num-examples` always means training cases.
NUM_EXAMPLES: Final = "num-examples"
NUM_VAL_CASES: Final = "num-val-cases"
TRAIN_LOSS: Final = "train-loss"
EVAL_LOSS: Final = "eval-loss"
EPSILON: Final = "epsilon"
DELTA: Final = "delta"
NOISE_MULTIPLIER: Final = "noise-multiplier"
DP_ENABLED: Final = "dp-enabled"
REFUSED: Final = "refused"
# 1 in an evaluate or fine-tune reply whose site withholds its validation
# metrics (privacy.share_validation_metrics off, or fewer validation patients
# than the site's floor, privacy.min_cases_for_aggregates).
METRICS_WITHHELD: Final = "metrics-withheld"

# ConfigRecord keys in the SITE record of a reply.
SITE_NAME: Final = "name"
REFUSAL_REASON: Final = "refusal-reason"
REFUSAL_CODE: Final = "refusal-code"  # one of REFUSAL_CODES

# Why a site refused, as a stable code; the reason beside it is a fixed sentence
# per code (budget refusals add the site's own epsilon numbers). The full cause
# stays in the site's own log.
REFUSAL_CODES: Final = {
    "budget-exceeded": "the round would pass the site's privacy ceiling",
    "ledger-damaged": "privacy ledger damaged or unreadable; the site refuses "
    "until it is restored",
    "data-unusable": "site data unusable; hospital IT should run `kidneyfl site check`",
    "config-invalid": "site configuration invalid; hospital IT should run "
    "`kidneyfl site check`",
    "too-few-cases": "fewer usable patients than the site's floor for released "
    "aggregates",
    "not-shared": "the site does not share this (its own choice)",
    "withheld": "reply withheld by the site's wire-contract check; see the site's "
    "audit log",
    # A request the site does not trust (issue 27): a number outside the plan's
    # bounds, or one that asks for more than the site's own limits allow.
    "request-invalid": "the request carries a missing, malformed or out-of-bounds "
    "value; the site spent, trained and released nothing",
    "limit-exceeded": "the request asks for more than the site's own limits allow "
    "(rounds, steps, noise or privacy per run); the site spent nothing",
    "query-limit": "the site has answered as many evaluate and query requests for "
    "this run as it allows",
    "internal-error": "the site failed to process the request; details are in "
    "the site's own log",
}

DICE_PREFIX: Final = "dice-"


def dice_key(region: str) -> str:
    """Metric key for the Dice of one KiTS region (``dice-kidney``...)."""
    return f"{DICE_PREFIX}{region}"


# Evaluation (issue 6): surface Dice per KiTS region, next to Dice.
SURFACE_DICE_PREFIX: Final = "surface-dice-"


def cases_key(region: str, present: bool = True) -> str:
    """Metric key for how many validation cases have (or lack) ``region``."""
    return f"cases-{region}" if present else f"cases-no-{region}"


def weight_key(metric: str) -> str:
    """The count a site-level metric is a mean over, for averaging across sites.

    Region Dice and surface Dice, per-lesion and case-level detection
    sensitivity and the FROC summary are means over the cases with the region;
    false-positive rates and volumes and case-level specificity over the cases
    without it; any other metric (false-positive lesions per case, detection
    AUC) over all validation cases. A post-processing candidate's metric
    (``pp<i>-<key>``) is weighted as ``<key>``.
    """
    if (found := CANDIDATE_KEY.fullmatch(metric)) is not None:
        return weight_key(found[2])
    if (group := SUBGROUP_KEY.fullmatch(metric)) is not None:
        return f"{group[1]}{weight_key(group[2])}"
    for prefix in (
        *LESION_PRESENT_PREFIXES,
        SURFACE_DICE_PREFIX,
        DICE_PREFIX,
        DICE_SQUARED_PREFIX,
    ):
        if metric.startswith(prefix):
            return cases_key(metric.removeprefix(prefix))
    for prefix in ("fp-rate-", "fp-ml-", DETECT_SPEC_PREFIX):
        if metric.startswith(prefix):
            return cases_key(metric.removeprefix(prefix), present=False)
    if SURVIVAL_SCORE.fullmatch(metric):
        return CASES_OUTCOME
    return NUM_VAL_CASES


# Clinical outputs (issue 28; docs/evaluation.md, docs/clinical-outputs.md).
# Lesion-level metrics per lesion region (common.lesions): over the cases with
# the region (sensitivities, FROC), the cases without it (specificity), or all
# validation cases (false-positive lesions per case, AUC: released only when
# both kinds of case reach the floor).
LESION_SENS_PREFIX: Final = "lesion-sens-"
DETECT_SENS_PREFIX: Final = "detect-sens-"
DETECT_SPEC_PREFIX: Final = "detect-spec-"
DETECT_AUC_PREFIX: Final = "detect-auc-"
FP_LESIONS_PREFIX: Final = "fp-lesions-"
FROC_PREFIX: Final = "froc-"
LESION_PRESENT_PREFIXES: Final = (LESION_SENS_PREFIX, DETECT_SENS_PREFIX, FROC_PREFIX)
# A post-processing candidate's metric: pp<i>-<key>, i its index in
# common.postprocess.CANDIDATES
CANDIDATE_KEY: Final = re.compile(
    r"pp([0-9]{1,2})-((?:dice|fp-rate|lesion-sens|fp-lesions)-[a-z]+)"
)
# Subgroups (issue 29; client/data/subgroups.py): a group's metrics are
# sg-<attribute>-<value>-<key>, over the group's own cases, released only for
# groups of at least the site's floor. dice2-<region> is the mean of squared
# per-case Dice, so the coordinator can give each group's Dice a confidence
# interval from aggregates alone.
DICE_SQUARED_PREFIX: Final = "dice2-"
SUBGROUP_KEY: Final = re.compile(
    r"(sg-(?:sex|age|scanner|phase)-[a-z0-9_]{1,24}-)"
    r"((?:dice2?|cases|cases-no|fp-rate|lesion-sens)-[a-z]+)"
)
# Evaluate config: the post-run clinical calibration (server/clinical_round.py).
# Stage 1: every post-processing candidate on the validation patients and the
# out-of-distribution reference sums over training patients; stage 2: the
# share of validation patients above each OOD threshold, against the
# reference sent in OOD_MEAN / OOD_STD.
CLINICAL_STAGE: Final = "clinical-stage"
# Evaluate config: the post-processing rule every evaluation applies, as its
# index into common.postprocess.CANDIDATES (absent: none)
POSTPROCESS: Final = "postprocess"
OOD_MEAN: Final = "ood-mean"
OOD_STD: Final = "ood-std"
# Evaluate metrics: whether the site's data are synthetic (its YAML has a
# phantom block or its data folder was written by `kidneyfl phantom`): one
# fact about the dataset, for the model's provenance (sidecar training-data).
DATA_SYNTHETIC: Final = "data-synthetic"
OOD_N: Final = "ood-n"  # training patients behind the sums
OOD_SUM: Final = "ood-sum"  # list, one per common.ood.FEATURES
OOD_SUMSQ: Final = "ood-sumsq"
OOD_EXCEED: Final = "ood-exceed"  # list, one per common.ood.THRESHOLDS
# Their lengths (len(common.ood.FEATURES), len(common.ood.THRESHOLDS); a test
# holds them equal): the contract checks a list's length.
OOD_N_FEATURES: Final = 11
OOD_N_THRESHOLDS: Final = 9


def surface_dice_key(region: str) -> str:
    """Metric key for the surface Dice of one KiTS region (``surface-dice-kidney``)."""
    return f"{SURFACE_DICE_PREFIX}{region}"


# Strategies and personalisation (issue 7; docs/strategies.md).
PROXIMAL_MU: Final = "proximal-mu"  # injected by Flower's FedProx
FINE_TUNE_ACTION: Final = "finetune"  # message type "train.finetune"
FINE_TUNE_STEPS: Final = "fine-tune-steps"
FINE_TUNED: Final = "fine-tuned"  # metric: 1 in a fine-tune reply
# Classification task (issue 8): evaluation metrics of a site's validation set.
# Recall and AUC are left out for a class the site has no validation case of.
ACCURACY: Final = "accuracy"
BALANCED_ACCURACY: Final = "balanced-accuracy"
AUC_MACRO: Final = "auc-macro"  # one-vs-rest ROC AUC, mean over classes
RECALL_PREFIX: Final = "recall-"
CONFUSION_PREFIX: Final = "cm-"  # counts: cm-<true class>-<predicted class>


def recall_key(name: str) -> str:
    """Metric key for the recall (sensitivity) of one class (``recall-stone``)."""
    return f"{RECALL_PREFIX}{name}"


def confusion_key(true: str, pred: str) -> str:
    """Metric key for a confusion count: cases of ``true`` predicted ``pred``."""
    return f"{CONFUSION_PREFIX}{true}-{pred}"


# Prognosis (issue 30; common/survival.py, docs/prognosis.md). Over the
# validation patients with an outcome (cases-outcome), released only when
# they and their events (cases-event) each reach the site's floor.
C_HARRELL: Final = "c-harrell"
C_UNO: Final = "c-uno"
IBS: Final = "ibs"  # integrated Brier score over the plan's interval edges
TD_AUC_PREFIX: Final = "td-auc-"  # td-auc-<days>: cumulative/dynamic AUC
CAL_PRED_PREFIX: Final = "cal-pred-"  # mean predicted survival at <days>
CAL_OBS_PREFIX: Final = "cal-obs-"  # Kaplan-Meier survival at <days>
CASES_OUTCOME: Final = "cases-outcome"
CASES_EVENT: Final = "cases-event"
# Life-table counts by predicted risk group (the site's median risk) and
# interval: patients at risk at the interval's start, events in it. The
# coordinator sums them across sites and draws Kaplan-Meier curves.
RISK_GROUPS: Final = ("low", "high")
ATRISK_KEY: Final = re.compile(r"cases-atrisk-(low|high)-([0-9]{1,2})")
KM_EVENTS_KEY: Final = re.compile(r"km-events-(low|high)-([0-9]{1,2})")
SURVIVAL_SCORE: Final = re.compile(
    r"c-harrell|c-uno|ibs|(?:td-auc|cal-pred|cal-obs)-[0-9]{1,5}"
)


def atrisk_key(group: str, interval: int) -> str:
    """Patients of a risk group at risk at the start of an interval."""
    return f"cases-atrisk-{group}-{interval}"


def km_events_key(group: str, interval: int) -> str:
    """Events of a risk group within an interval."""
    return f"km-events-{group}-{interval}"


def is_summed(key: str) -> bool:
    """Whether the coordinator sums ``key`` over sites (patient counts and
    life-table events) rather than averaging it."""
    group = SUBGROUP_KEY.fullmatch(key)
    inner = group[2] if group else key
    return inner.startswith("cases-") or KM_EVENTS_KEY.fullmatch(inner) is not None


# -- Reply contract (governance, client/contract.py) --------------------------
# The only metric keys a site may send, by message type. A key not listed here
# (or matched by its task's patterns) is refused at the site before the reply
# leaves. Values are finite scalars, except the fingerprint aggregates, which are
# fixed-length lists (their lengths are checked).
MSG_TRAIN: Final = "train"
MSG_EVALUATE: Final = "evaluate"
MSG_QUERY: Final = "query"
FP_N_CASES: Final = "n-cases"
FP_SPACING_Q: Final = "spacing-q"
FP_EXTENT: Final = "extent-mm"
FP_HIST: Final = "fg-hist"
FP_LABEL_ML: Final = "label-ml"
REFUSAL_METRICS: Final = frozenset({REFUSED, NUM_EXAMPLES})
REPLY_METRICS: Final = {
    MSG_TRAIN: frozenset(
        {NUM_EXAMPLES, TRAIN_LOSS, DP_ENABLED, EPSILON, DELTA, NOISE_MULTIPLIER}
    )
    # a fine-tune reply ("train.finetune") carries validation metrics instead
    | frozenset({FINE_TUNED, NUM_VAL_CASES, EVAL_LOSS, METRICS_WITHHELD})
    | REFUSAL_METRICS,
    MSG_EVALUATE: frozenset(
        {NUM_EXAMPLES, NUM_VAL_CASES, EVAL_LOSS, METRICS_WITHHELD, DATA_SYNTHETIC}
    )
    | frozenset({OOD_N})
    | REFUSAL_METRICS,
    MSG_QUERY: frozenset({FP_N_CASES}) | REFUSAL_METRICS,
}
# List-valued aggregates (fingerprint query only): key -> allowed length.
REPLY_LIST_METRICS: Final = {
    MSG_QUERY: {FP_SPACING_Q: 9, FP_EXTENT: 3, FP_HIST: 1024, FP_LABEL_ML: 3},
    # the post-run clinical calibration (server/clinical_round.py)
    MSG_EVALUATE: {
        OOD_SUM: OOD_N_FEATURES,
        OOD_SUMSQ: OOD_N_FEATURES,
        OOD_EXCEED: OOD_N_THRESHOLDS,
    },
}
# Task metrics in evaluate replies, by task, as full-match regular expressions.
TASK_METRIC_PATTERNS: Final = {
    # per region (common.metrics.summarise_cases): Dice and surface Dice over
    # the cases with the region, false positives over the cases without it,
    # and how many cases each describes
    "segmentation": (
        r"dice-[a-z]+",
        r"surface-dice-[a-z]+",
        r"fp-rate-[a-z]+",
        r"fp-ml-[a-z]+",
        r"cases-[a-z]+",
        r"cases-no-[a-z]+",
        # lesion level (common.lesions) and post-processing candidates
        r"(?:lesion-sens|detect-sens|detect-spec|detect-auc|fp-lesions|froc)-[a-z]+",
        CANDIDATE_KEY.pattern,
        SUBGROUP_KEY.pattern,
    ),
    "classification": (
        r"accuracy",
        r"balanced-accuracy",
        r"auc-macro",
        r"recall-[a-z0-9_]+",
        r"cm-[a-z0-9_]+-[a-z0-9_]+",  # confusion counts: cm-<true>-<predicted>
    ),
    "prognosis": (
        SURVIVAL_SCORE.pattern,
        r"cases-(?:outcome|event)",
        ATRISK_KEY.pattern,
        KM_EVENTS_KEY.pattern,
    ),
}
REPLY_SITE_KEYS: Final = frozenset({SITE_NAME, REFUSAL_REASON, REFUSAL_CODE})
# Under DP a train reply carries no loss: the mean training loss is computed
# on the training patients without noise (docs/privacy.md).
DP_TRAIN_METRICS_OMITTED: Final = frozenset({TRAIN_LOSS})
