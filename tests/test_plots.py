"""Figure conventions: every figure has a title and labelled axes."""

from labhelpers import plots


def test_figures_have_titles_and_labelled_axes(tmp_path):
    import pandas as pd

    curve = pd.DataFrame({"step": [1, 2, 3], "loss": [3.0, 2.0, 1.5]})
    fig = plots.loss_curves({"lora": curve})
    ax = fig.axes[0]
    assert ax.get_title() and "step" in ax.get_xlabel() and "nats" in ax.get_ylabel()
    fig = plots.bars(pd.DataFrame({"method": ["a", "b"], "pass_at_1": [0.1, 0.9]}), "method", "pass_at_1",
                     "pass@1 by method", "pass@1 (fraction of tests passed)")
    assert fig.axes[0].get_title() == "pass@1 by method"
    plots.save(fig, tmp_path / "f" / "fig.png")
    assert (tmp_path / "f" / "fig.png").stat().st_size > 1000
