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
    assert [t.get_text() for t in fig.axes[0].texts] == ["0.9", "1"]  # each bar carries its value
    one = plots.bar_grid(df, "method", {"score_test": "pass@1 (test)"}, "One panel")  # a single panel works too
    assert one.axes[0].get_title() == "pass@1 (test)"
    rows = pd.DataFrame(np.random.default_rng(0).random((15, 4)), index=[f"merge {i}" for i in range(15)])
    tall = plots.heatmaps({"validation": rows}, "Every merge", "task", "merge")
    assert tall.get_size_inches()[1] >= 0.3 * 15  # a readable row per merge


def test_loss_curves_that_overlap_get_a_panel_of_differences():
    import pandas as pd
    import pytest

    a = pd.DataFrame({"step": [1, 2, 3], "loss": [3.0, 2.0, 1.5]})
    b = pd.DataFrame({"step": [1, 2, 3], "loss": [3.0, 2.01, 1.49]})
    fig = plots.loss_curves({"adamw": a, "8-bit": b}, "Three optimizers", against="adamw")
    loss_ax, diff_ax = fig.axes
    assert fig._suptitle.get_text() == "Three optimizers" and "adamw" in diff_ax.get_title()
    gap = diff_ax.lines[-1].get_ydata()
    assert list(gap) == pytest.approx([0.0, 0.01, -0.01])
    with pytest.raises(KeyError, match="not one of the runs"):
        plots.loss_curves({"adamw": a}, against="sgd")


def test_lines_name_their_series_in_words():
    import pandas as pd

    df = pd.DataFrame({"rank": [1, 2, 4], "trainable_params": [10, 20, 40], "other": [1, 2, 3]})
    single = plots.lines(df, "rank", ["trainable_params"], "Parameters", "rank r", "trainable parameters (count)")
    assert single.axes[0].get_legend() is None  # the y label names the one line
    named = plots.lines(df, "rank", {"trainable_params": "LoRA", "other": "full"}, "Two", "rank r", "count")
    assert [t.get_text() for t in named.axes[0].get_legend().get_texts()] == ["LoRA", "full"]


def test_a_log_x_axis_labels_the_values_plotted():
    import pandas as pd

    df = pd.DataFrame({"learning_rate": [0.001, 0.003, 0.009], "tiny": [0.4, 0.7, 0.7]})
    fig = plots.lines(df, "learning_rate", ["tiny"], "Best score per learning rate", "learning rate", "score", logx=True)
    assert [t.get_text() for t in fig.axes[0].get_xticklabels()] == ["0.001", "0.003", "0.009"]


def test_many_bars_lie_down_and_categories_stand_side_by_side():
    import pandas as pd

    many = pd.DataFrame({"tensor": [f"layers.{i}.mlp.up_proj" for i in range(30)], "share": [0.5] * 30})
    fig = plots.bars(many, "tensor", "share", "Per tensor", "fraction")
    ax = fig.axes[0]
    assert [t.get_text() for t in ax.get_yticklabels()][:2] == ["layers.0.mlp.up_proj", "layers.1.mlp.up_proj"]
    assert ax.get_xlabel() == "fraction" and not ax.texts  # no values printed on 30 bars
    kinds = pd.DataFrame({"kind": ["embed", "norm", "q_proj"], "code": [0.04, 0.005, 0.05], "sql": [0.06, 0.005, 0.05]})
    fig = plots.grouped_bars(kinds, "kind", {"code": "code expert", "sql": "SQL expert"}, "By kind", "tensor kind", "size")
    ax = fig.axes[0]
    assert len(ax.patches) == 6 and [t.get_text() for t in ax.get_xticklabels()] == ["embed", "norm", "q_proj"]
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["code expert", "SQL expert"] and not ax.lines


def test_bars_draw_the_spread_they_are_given():
    import pandas as pd

    df = pd.DataFrame({"method": ["ties", "dare"], "average": [0.6, 0.5], "sd": [0.05, 0.1]})
    ax = plots.bars(df, "method", "average", "Over seeds", "average", error="sd").axes[0]
    caps = [line for line in ax.lines if len(line.get_xdata()) == 2]  # the error bars' caps
    assert sorted(round(float(y), 2) for line in caps for y in line.get_ydata()) == [0.4, 0.55, 0.6, 0.65]
    assert [t.get_text() for t in ax.texts] == ["0.60", "0.50"]
    assert not plots.bars(df, "method", "average", "One seed", "average").axes[0].lines
