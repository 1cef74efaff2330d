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


def test_small_multiples_and_heat_maps_show_words_not_column_names():
    import numpy as np
    import pandas as pd

    df = pd.DataFrame({"method": ["lora", "full"], "score_test": [0.9, 1.0], "peak_mib": [70.0, 105.0]})
    fig = plots.bar_grid(df, "method", {"score_test": "pass@1 (test)", "peak_mib": "peak memory (MiB)"}, "Methods")
    assert [ax.get_title() for ax in fig.axes] == ["pass@1 (test)", "peak memory (MiB)"]
    one = plots.bar_grid(df, "method", {"score_test": "pass@1 (test)"}, "One panel")  # a single panel works too
    assert one.axes[0].get_title() == "pass@1 (test)"
    rows = pd.DataFrame(np.random.default_rng(0).random((15, 4)), index=[f"merge {i}" for i in range(15)])
    tall = plots.heatmaps({"validation": rows}, "Every merge", "task", "merge")
    assert tall.get_size_inches()[1] >= 0.3 * 15  # a readable row per merge
