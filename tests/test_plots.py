"""Plots: a run folder becomes a PNG with one panel per metric family present; runs compare."""

import os
import subprocess
import sys

import matplotlib.image as mpimg
import numpy as np
import pytest

from jaxsd import metrics as M
from jaxsd import plots

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _write_run(run_dir, *, with_eval: bool, steps: int = 6, scale: float = 1.0):
    with M.MetricsWriter(run_dir, tensorboard=False) as writer:
        for step in range(1, steps + 1):
            row = {
                M.PASS_RATE: scale * step / 10,
                M.GRAD_NORM: 1.0 / step,
                M.FRAC_INTERMEDIATE: 0.5,
                M.LOSS: 2.0 - 0.1 * step,
                "loss/distill": 1.0,
                "loss/pg": 0.2,
            }
            if with_eval and step % 3 == 0:
                row.update({"eval/mean@16": 0.3, "eval/maj@16": 0.4, "eval/t/mean@16": 0.3})
            writer.write(step, row)


def _assert_png(path, width, height):
    with open(path, "rb") as fh:
        assert fh.read(8) == PNG_MAGIC
    image = mpimg.imread(path)
    assert image.shape[:2] == (height, width)
    assert np.ptp(image[..., :3]) > 0  # something was drawn, not a blank canvas


@pytest.mark.parametrize(
    "with_eval, titles",
    [
        (
            True,
            [
                "pass rate",
                "eval (test split)",
                "grad norm",
                "fraction of questions with 0<p<1",
                "loss terms",
            ],
        ),
        (False, ["pass rate", "grad norm", "fraction of questions with 0<p<1", "loss terms"]),
    ],
)
def test_run_figure_has_one_panel_per_metric_family(tmp_path, with_eval, titles):
    _write_run(tmp_path, with_eval=with_eval)
    fig = plots.make_run_figure(M.read_metrics(tmp_path))
    assert [ax.get_title() for ax in fig.axes] == titles
    by_title = {ax.get_title(): ax for ax in fig.axes}
    loss_lines = {line.get_label() for line in by_title["loss terms"].get_lines()}
    assert loss_lines == {"loss", "loss/distill", "loss/pg"}
    steps, values = by_title["pass rate"].get_lines()[0].get_data()
    np.testing.assert_allclose(values, np.arange(1, 7) / 10)
    if with_eval:
        eval_lines = {ln.get_label(): ln for ln in by_title["eval (test split)"].get_lines()}
        assert set(eval_lines) == {"eval/mean@16", "eval/maj@16"}  # averages, not per task
        np.testing.assert_array_equal(eval_lines["eval/maj@16"].get_xdata(), [3, 6])
    out = plots.plot_run(tmp_path)
    _assert_png(out, 700, int(260 * len(titles)))


def test_plot_runs_compares_one_metric(tmp_path):
    _write_run(tmp_path / "sdpo", with_eval=False)
    _write_run(tmp_path / "grpo", with_eval=False, scale=0.5)
    out = plots.plot_runs([tmp_path / "sdpo", tmp_path / "grpo"], tmp_path / "cmp.png", M.PASS_RATE)
    _assert_png(out, 700, 400)
    with pytest.raises(ValueError, match="no values of 'eval/mean@16'"):
        plots.plot_runs([tmp_path / "sdpo"], tmp_path / "x.png", "eval/mean@16")
    with pytest.raises(FileNotFoundError, match="metrics.jsonl"):
        plots.plot_runs([tmp_path / "missing"], tmp_path / "x.png", M.PASS_RATE)


def test_plot_script_writes_png(tmp_path):
    _write_run(tmp_path / "run", with_eval=True)
    out = tmp_path / "c.png"
    proc = subprocess.run(
        [sys.executable, "scripts/plot.py", str(tmp_path / "run"), "--out", str(out)],
        capture_output=True,
        text=True,
        cwd=REPO,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == str(out)
    _assert_png(out, 700, 260 * 5)


def test_mean_curve_averages_at_the_steps_every_run_has():
    a = (np.array([0, 10, 20, 30]), np.array([0.1, 0.2, 0.3, 0.4]))
    b = (np.array([0, 10, 30]), np.array([0.3, 0.4, 0.8]))
    steps, mean = plots.mean_curve([a, b])
    np.testing.assert_array_equal(steps, [0, 10, 30])
    np.testing.assert_allclose(mean, [0.2, 0.3, 0.6])


def test_plot_runs_groups_need_one_group_per_run(tmp_path):
    _write_run(tmp_path / "a", with_eval=False)
    with pytest.raises(ValueError, match="groups"):
        plots.plot_runs([tmp_path / "a"], tmp_path / "x.png", M.PASS_RATE, groups=["x", "y"])


def test_dashboard_panels_for_divergence_length_entropy_lr_and_distinct_line_styles(tmp_path):
    with M.MetricsWriter(tmp_path, tensorboard=False) as writer:
        for step in range(1, 5):
            writer.write(step, {M.PASS_RATE: 0.5, "eval/mean@4": 0.25, "eval/maj@4": 0.25,
                                "distill/divergence": 0.1 * step, "kl/student_teacher": 0.02,
                                "rollout/response_len": 9.0 + step, "entropy": 1.5,
                                "lr": 1e-4 * min(step, 2)})  # fmt: skip
    fig = plots.make_run_figure(M.read_metrics(tmp_path))
    by_title = {ax.get_title(): ax for ax in fig.axes}
    assert list(by_title) == ["pass rate", "eval (test split)", "KL / distillation divergence",
                              "response length (tokens)", "entropy (nats / token)",
                              "learning rate"]  # fmt: skip
    np.testing.assert_allclose(by_title["learning rate"].get_lines()[0].get_ydata(),
                               [1e-4, 2e-4, 2e-4, 2e-4])  # fmt: skip
    # mean@4 == maj@4 here: the two lines differ in style and marker, so both stay visible.
    a, b = by_title["eval (test split)"].get_lines()
    np.testing.assert_array_equal(a.get_ydata(), b.get_ydata())
    assert (a.get_linestyle(), a.get_marker()) != (b.get_linestyle(), b.get_marker())
    assert a.get_color() != b.get_color()


def test_smoothing_is_a_debiased_ema_drawn_over_the_faded_raw_values(tmp_path):
    _write_run(tmp_path, with_eval=False, steps=8)
    fig = plots.make_run_figure(M.read_metrics(tmp_path), smooth=0.5)
    raw, smoothed = fig.axes[0].get_lines()
    x = np.arange(1, 9) / 10
    np.testing.assert_allclose(raw.get_ydata(), x)
    # s_1 = x_1; s_t = (sum_i 0.5^(t-i) 0.5 x_i) / (1 - 0.5^t)
    expected = [sum(0.5 ** (t - i) * 0.5 * x[i - 1] for i in range(1, t + 1)) / (1 - 0.5**t)
                for t in range(1, 9)]  # fmt: skip
    np.testing.assert_allclose(smoothed.get_ydata(), expected, rtol=1e-12)
    assert raw.get_alpha() < 1 and smoothed.get_label() == M.PASS_RATE
    with pytest.raises(ValueError, match="smoothing weight=1.0"):
        plots.smooth_values(x, 1.0)
