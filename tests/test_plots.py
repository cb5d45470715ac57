"""The experiment's plots: readable byte axes, op starts on the curves, labels that stay
inside the axes, and per-site bars without empty bands on deep models."""

import matplotlib.image
import pytest

from fxqp import Prune, Quantize, Rule, Spec, plots
from fxqp.experiment import ORDERS, EpochRecord, RunResult, order_spec


@pytest.fixture
def figures(monkeypatch):
    """The figures the plot functions save (drawn: their tick labels are set)."""
    saved = []
    save = plots._save

    def keep(fig, path):
        saved.append(fig)
        return save(fig, path)

    monkeypatch.setattr(plots, "_save", keep)
    return saved


SIZES = {"baseline": 154_128, "Q": 42_433, "P(w)->Q": 11_591, "Q->P(w)": 11_592, "P(w,a)->Q": 12_782, "Q->P(w,a)": 12_779}


def _runs(epochs=10, steps_per_epoch=21, seeds=3):
    runs = []
    for seed in range(seeds):
        for i, order in enumerate(ORDERS):
            history = [EpochRecord(e, steps_per_epoch * e, 1.0 / e, 90.0 - i - 10.0 / e + seed) for e in range(1, epochs + 1)]
            metric = 90.0 - i + seed
            runs.append(RunResult(order, seed, metric, metric, SIZES[order] + seed, 154_000, history))
    return runs


def test_format_bytes():
    assert [plots.format_bytes(n) for n in (512, 1_500, 12_000, 154_128, 2_300_000, 4e9)] == [
        "512 B",
        "1.5 KB",
        "12 KB",
        "154 KB",
        "2.3 MB",
        "4 GB",
    ]


def test_byte_ticks_are_round_and_inside_the_range():
    assert plots.byte_ticks(10_000, 200_000) == [10_000, 20_000, 50_000, 100_000, 200_000]
    assert plots.byte_ticks(11_000, 40_000) == [15_000, 20_000, 30_000]  # 1-2-5 gives one: denser
    assert plots.byte_ticks(11_500, 11_700) == [11_500, 11_700]  # nothing round inside: the ends


def test_size_tradeoff_labels_bytes_and_names_orders_in_a_legend(tmp_path, figures):
    path = plots.plot_size_tradeoff(_runs(), tmp_path / "size.png", metric="accuracy %")
    assert matplotlib.image.imread(path).shape[1] > 300
    (fig,) = figures
    ax = fig.axes[0]
    assert ax.get_xscale() == "log"
    assert [t.get_text() for t in ax.get_xticklabels()] == ["10 KB", "20 KB", "50 KB", "100 KB", "200 KB"]
    assert [t.get_text() for t in ax.get_xticklabels(minor=True) if t.get_text()] == []
    assert len(ax.texts) == 0  # no labels next to the points, where they would overlap
    legend = fig.legends[0]
    assert [t.get_text() for t in legend.get_texts()] == list(ORDERS)


def test_curves_mark_op_starts_at_their_epoch_with_whole_epoch_ticks(tmp_path, figures):
    runs = _runs()
    schedules = {o: order_spec(o, functions=("relu",)) for o in ORDERS}
    plots.plot_curves(runs, tmp_path / "curves.png", metric="accuracy %", schedules=schedules)
    (fig,) = figures
    ax_loss, ax_metric, ax_starts = fig.axes
    # a row per order with ops (the baseline has none), weight ops above activation ops
    rows = [t.get_text() for t in ax_starts.get_yticklabels()]
    assert rows == ["Q", "P(w)->Q", "Q->P(w)", "P(w,a)->Q", "Q->P(w,a)"]
    marks = {
        (line.get_marker(), round(float(line.get_xdata()[0]), 2), round(float(line.get_ydata()[0]), 1)) for line in ax_starts.get_lines()
    }
    # 10 epochs of 21 steps: P(w)->Q prunes from 40% = step 84 = epoch 4 and quantizes weights
    # at 92% = step 193 (epoch 9.19); Q->P(w) quantizes weights at 40% (epoch 4), activations
    # at 44% = step 92 (epoch 4.38), and prunes from 52% = step 109 (epoch 5.19)
    assert {("v", 4.0, 0.8), ("s", 9.19, 0.8), ("s", 4.0, 1.8), ("D", 4.38, 2.2), ("v", 5.19, 1.8)} <= marks
    assert len(marks) == sum(len(plots.op_starts(s, 210)) for s in schedules.values())
    assert {round(float(line.get_xdata()[0]), 2) for line in ax_metric.get_lines()[len(ORDERS) :]} == {
        4.0,
        4.38,
        5.19,
        9.19,
        9.38,
    }  # dotted lines
    labels = [t.get_text() for t in ax_starts.get_xticklabels() if t.get_text()]
    assert labels and all(label.isdigit() for label in labels)
    assert [t.get_text() for t in ax_loss.get_xticklabels() if t.get_text()] == labels
    texts = [t.get_text() for t in fig.legends[0].get_texts()]
    assert "P(w)->Q (3 seeds)" in texts and "prune weights starts" in texts


def test_op_starts():
    spec = Spec(rules=[Rule(modules=["Conv2d"], weight=[Prune(sparsity=0.5, start="40%", end="60%"), Quantize(bits=4, start=90)])])
    assert plots.op_starts(spec, 100) == [(40, "prune weights"), (90, "quantize weights")]


def test_schedule_labels_stay_inside_the_axes(tmp_path, figures):
    plots.plot_schedule(order_spec("P(w,a)->Q", functions=("relu",)), 210, tmp_path / "schedule.png")
    (fig,) = figures
    ax = fig.axes[0]
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    canvas = FigureCanvasAgg(fig)  # the saved figure was closed: draw it again to measure it
    canvas.draw()
    renderer = canvas.get_renderer()
    box = ax.get_window_extent(renderer)
    assert len(ax.texts) == 4
    for text in ax.texts:
        extent = text.get_window_extent(renderer)
        assert box.x0 <= extent.x0 and extent.x1 <= box.x1, text.get_text()


def test_sites_of_a_deep_model_leave_no_empty_band(tmp_path):
    import torchvision

    import fxqp

    spec = Spec(
        rules=[Rule(modules=["Conv2d"], weight=[Quantize(bits=4, start=0)]), Rule(modules=["ReLU"], activation=[Quantize(bits=8, start=0)])]
    )
    gm = fxqp.transform(torchvision.models.resnet50(num_classes=10), spec)
    image = matplotlib.image.imread(plots.plot_sites(gm, tmp_path / "sites.png", title="resnet50"))
    white_rows = (image[..., :3] > 0.99).all(axis=(1, 2))
    longest = run = 0
    for white in white_rows:
        run = run + 1 if white else 0
        longest = max(longest, run)
    assert image.shape[0] > 2000  # about a hundred rows of sites
    assert longest < 0.02 * image.shape[0]  # no blank band (the title sat 10% of the height above the bars)
