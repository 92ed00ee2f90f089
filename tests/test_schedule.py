"""The D-step schedule: fixed n_critic, the adaptive ladder, its private input, resume."""

import pytest
import torch

from conftest import assert_same_weights, history, tiny_config, train
from gankit.schedule import DStepSchedule


def run_schedule(schedule, accuracies):
    """Feed D's fake accuracy at every G step; return the rate after each G step and the
    number of D steps between consecutive G steps."""
    rates, gaps, gap = [], [], 0
    accuracies = iter(accuracies)
    while True:
        gap += 1
        if schedule.d_step_done():
            try:
                schedule.g_step_done(next(accuracies))
            except StopIteration:
                return rates, gaps
            rates.append(schedule.rate)
            gaps.append(gap)
            gap = 0


def test_fixed_schedule_takes_a_g_step_every_n_critic_d_steps():
    rates, gaps = run_schedule(DStepSchedule("fixed", 3), [0.0] * 10)
    assert gaps == [3] * 10 and rates == [3] * 10  # never climbs, however fooled D is


def test_adaptive_schedule_climbs_the_ladder_after_grace_when_d_is_fooled():
    schedule = DStepSchedule("adaptive", 1, threshold=0.6, grace=4, beta=0.5)
    # D's fake accuracy 0.5 from the start: at or below 0.6, so it climbs after every grace.
    rates, gaps = run_schedule(schedule, [0.5] * 16)
    assert rates == [1, 1, 1, 2, 2, 2, 2, 5, 5, 5, 5, 10, 10, 10, 10, 20]
    # The G step that triggers a climb still came after the old rate's D steps.
    assert gaps == [1, 1, 1, 1, 2, 2, 2, 2, 5, 5, 5, 5, 10, 10, 10, 10]


def test_adaptive_schedule_stays_while_the_moving_average_is_above_the_threshold():
    schedule = DStepSchedule("adaptive", 2, threshold=0.6, grace=1, beta=0.5)
    # The average goes 0.9, 0.75, 0.675, 0.6375, 0.61925, 0.610125: never at 0.6, so no
    # climb; then one reading of 0 pulls it under at once.
    run_schedule(schedule, [0.9, 0.6, 0.6, 0.6, 0.601, 0.601])
    assert schedule.rate == 2
    assert schedule.fake_accuracy == pytest.approx(
        0.5 * (0.5 * (0.5 * (0.5 * (0.5 * 0.9 + 0.3) + 0.3) + 0.3) + 0.3005) + 0.3005)
    schedule.g_step_done(0.0)
    assert schedule.rate == 5 and schedule.g_at_rate == 0


def test_schedule_state_round_trips():
    a = DStepSchedule("adaptive", 1, grace=2, beta=0.9)
    run_schedule(a, [0.2, 0.9, 0.1, 0.4, 0.3])
    b = DStepSchedule("adaptive", 1, grace=2, beta=0.9)
    b.load_state_dict(a.state_dict())
    assert b.state_dict() == a.state_dict()
    ra, ga = run_schedule(a, [0.5, 0.1, 0.7])
    rb, gb = run_schedule(b, [0.5, 0.1, 0.7])
    assert (ra, ga) == (rb, gb)


def test_training_follows_the_adaptive_ladder_and_records_it(tmp_path, data):
    # With threshold 0.99, D's accuracy on fresh fakes is below it from the start, so the
    # rate climbs every 3 G steps: 1, 2, 5, ...
    config = tiny_config(tmp_path, d_steps_schedule="adaptive", n_critic=1,
                         d_steps_threshold=0.99, d_steps_grace=3, epochs=2)
    trainer, status = train(config, data)
    assert status == "done"
    # 16 D steps: 3 G steps at rate 1 (D steps 1-3), 3 at rate 2 (4-9), then rate 5 (10-14 ...).
    s = trainer.schedule
    assert trainer.state.step == 16 and trainer.state.g_steps == 3 + 3 + 1
    assert s.rate == 5 and s.since_g == 2
    assert [r["d_steps_per_g_step"] for r in trainer.run.history()] == [2, 5]


def test_adaptive_run_resumes_bit_exactly(tmp_path, data):
    options = dict(d_steps_schedule="adaptive", n_critic=1, d_steps_threshold=0.99,
                   d_steps_grace=2, epochs=3)
    straight, _ = train(tiny_config(tmp_path / "a", **options), data)
    train(tiny_config(tmp_path / "b", **{**options, "epochs": 1}), data)
    resumed, status = train(tiny_config(tmp_path / "b", **options), data, resume=True)
    assert status == "done"
    assert resumed.schedule.state_dict() == straight.schedule.state_dict()
    assert_same_weights(straight, resumed)
    assert history(straight) == history(resumed)


def test_dp_mode_keeps_the_schedule_input_private(tmp_path, data):
    """The ladder reads D's accuracy on G's fresh fakes, which the dp mode may log; the D
    step's real-batch statistics stay out."""
    pytest.importorskip("opacus")
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        config = tiny_config(tmp_path, mode="dp", d_steps_schedule="adaptive", n_critic=1,
                             d_steps_threshold=0.99, d_steps_grace=2, epochs=1)
        trainer, status = train(config, data)
    record = trainer.run.history()[-1]
    assert status == "done" and "d_acc_g_fakes" in record and "d_acc_fake" not in record
    assert trainer.schedule.rate > 1
    assert torch.isfinite(torch.tensor(record["d_acc_g_fakes"]))
