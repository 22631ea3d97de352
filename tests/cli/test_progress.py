"""Pretraining's progress (issue 31): the expected time early, then where it is."""

import io
import logging

import torch

from cli.progress import StepProgress, duration
from client.train import local_train


class Clock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


def test_the_log_says_the_expected_time_then_progress_then_the_end(caplog):
    clock = Clock()
    with caplog.at_level(logging.INFO, logger="kidneyfl.progress"):
        with StepProgress(
            100, "pretraining m", out=io.StringIO(), every_s=20, clock=clock
        ) as p:
            for step in range(1, 101):
                clock.t += 3.0 if step <= 5 else 0.5  # slow first steps (caches)
                p(step, 1.0 / step)
    lines = [r.getMessage() for r in caplog.records]
    assert lines[0] == (
        "pretraining m: 100 steps; the expected time follows the first steps"
    )
    # said after step 10, from steps 6-10: the first steps' one-off costs left out
    expected = (
        "pretraining m: about 1 min 02 s in all (0.50 s a step after the first 5)"
    )
    assert lines[1] == expected
    progress = [x for x in lines if x.startswith("step ")]
    # one line every 20 s of a 62.5 s loop, and the last step
    assert len(progress) == 4 and progress[-1].startswith("step 100/100 (100%)")
    assert "2.00 steps/s" in progress[1] and "loss 0.0100" in progress[-1]
    assert lines[-1] == "pretraining m: done in 1 min 02 s"


def test_no_live_line_off_a_terminal_and_a_live_one_on_it():
    plain = io.StringIO()
    with StepProgress(3, "x", out=plain, clock=Clock()) as p:
        p(1, 0.5)
    assert plain.getvalue() == ""  # a pipe or a log file gets log lines only
    term = io.StringIO()
    with StepProgress(3, "x", out=term, live=True, clock=Clock()) as p:
        p(1, 0.5)
    assert "x" in term.getvalue()


def test_local_train_reports_every_step():
    data = torch.utils.data.TensorDataset(torch.randn(10, 3), torch.randn(10, 1))
    seen = []
    local_train(
        torch.nn.Linear(3, 1),
        data,
        torch.nn.MSELoss(),
        epochs=1,
        batch_size=4,
        learning_rate=0.01,
        optimizer="sgd",
        device=torch.device("cpu"),
        seed=0,
        max_steps=7,
        on_step=lambda n, loss: seen.append((n, loss)),
    )
    assert [n for n, _ in seen] == list(range(1, 8))
    assert all(loss >= 0 for _, loss in seen)


def test_durations_read_as_people_say_them():
    assert duration(12.4) == "12 s"
    assert duration(245) == "4 min 05 s"
    assert duration(3720) == "1 h 02 min"
