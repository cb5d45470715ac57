"""The non-commutativity experiment's schedules, training loop, tables and plots."""

import pytest
import torch

import fxqp
from fxqp import Prune, Quantize
from fxqp.data import digits
from fxqp.experiment import ExperimentError, RunResult, TrainConfig, compare, fit, order_spec, relu_selectors, results_table, train, winners
from fxqp.models import ESPCN, DigitsNet
from fxqp.plots import plot_curves, plot_schedule, plot_sites, plot_size_tradeoff, ramp


def _ops(spec, kind):
    rules = [r for r in spec.rules if getattr(r, kind) is not None]
    return list(getattr(rules[0], kind)) if rules else []


def test_orders_compose_and_time_like_the_seed_paper():
    assert order_spec("baseline").rules == ()
    q = order_spec("Q")
    assert [type(op) for op in _ops(q, "weight")] == [Quantize] and _ops(q, "weight")[0].start == "40%"
    assert _ops(q, "activation")[0].start == "44%"

    pw = _ops(order_spec("P(w)->Q"), "weight")
    assert [type(op) for op in pw] == [Prune, Quantize]  # Q(P(w))
    assert (pw[0].start, pw[0].end, pw[0].every, pw[1].start) == ("40%", "64%", "6%", "92%")
    assert [type(op) for op in _ops(order_spec("P(w)->Q"), "activation")] == [Quantize]

    qp = _ops(order_spec("Q->P(w)"), "weight")
    assert [type(op) for op in qp] == [Quantize, Prune]  # P(Q(w))
    assert (qp[0].start, qp[1].start, qp[1].end) == ("40%", "52%", "76%")

    pwa = _ops(order_spec("P(w,a)->Q", dynamic_activations=True), "activation")
    assert [type(op) for op in pwa] == [Prune, Quantize] and pwa[0].dynamic and pwa[1].start == "94%"
    qpa = _ops(order_spec("Q->P(w,a)"), "activation")
    assert [type(op) for op in qpa] == [Quantize, Prune] and not qpa[1].dynamic

    # over 1000 steps: the paper's 250 epochs scaled (prune from epoch 100, every 15, ...)
    pw = _ops(order_spec("P(w)->Q").resolve(1000), "weight")
    assert (pw[0].start, pw[0].end, pw[0].every, pw[1].start) == (400, 640, 60, 920)


def test_order_spec_errors():
    with pytest.raises(fxqp.SpecError, match="expected one of baseline"):
        order_spec("P->Q")
    with pytest.raises(
        fxqp.SpecError, match=r"rules\[0\]\.weight\[0\]\.end: '64%' of a run of 2 steps is step 1, not after start '40%' = step 1"
    ):
        order_spec("P(w)->Q").resolve(2)


def test_relu_selectors_follow_the_model():
    assert relu_selectors(DigitsNet()) == {"modules": ("Conv2d", "Linear"), "activations": ("ReLU",), "functions": ("relu",)}
    assert relu_selectors(ESPCN()) == {"modules": ("Conv2d",), "activations": ("ReLU",), "functions": ()}


@pytest.fixture(scope="module")
def digits_runs():
    data = digits()
    config = TrainConfig(epochs=3, progress=False)
    runs = []
    for order in ("baseline", "P(w,a)->Q"):
        torch.manual_seed(0)
        model = DigitsNet(width=16)
        runs.append(train(model, data, order_spec(order, **relu_selectors(model)), config, order=order))
    return data, runs


def test_training_learns_lowers_and_shrinks(digits_runs):
    data, (base, compressed) = digits_runs
    assert [h.epoch for h in base.history] == [1, 2, 3] and base.history[-1].step == 3 * (1347 // 64)
    assert base.history[-1].train_loss < base.history[0].train_loss
    assert base.metric > 50.0  # 10 classes: far above chance after 3 epochs
    assert compressed.metric == pytest.approx(compressed.eval_metric, abs=0.3)  # lowered == eval (one sample at most)
    assert compressed.packed_bytes < base.packed_bytes / 3  # 8-bit, half the weights
    # the ops really ran: half of every weight is zero, activations are quantized and pruned
    rows = fxqp.summary(compressed.model).to_dicts()
    assert all(r["actual"] == 0.5 for r in rows if r["kind"] == "weight")
    assert {r["bits"] for r in rows} == {8}


def _run(order, metric, seed=0, packed=1000):
    return RunResult(order, seed, metric, metric, packed, 4000)


def _pair(first, second, a_metrics, b_metrics):
    return [_run(first, m, seed) for seed, m in enumerate(a_metrics)] + [_run(second, m, seed) for seed, m in enumerate(b_metrics)]


def test_winners_pair_runs_by_seed():
    # the means differ by 4.7 points, but the order flips from seed to seed: no winner
    flipping = _pair("P(w)->Q", "Q->P(w)", [90, 80, 99], [85, 85, 85])
    assert compare(flipping, "P(w)->Q", "Q->P(w)").differences == (5, -5, 14)
    assert compare(flipping, "P(w)->Q", "Q->P(w)").winner is None
    assert winners(flipping) == {
        "weights": "no winner beyond seed noise (P(w)->Q − Q->P(w) per seed: +5.00, -5.00, +14.00; mean +4.67 ± 5.49 s.e.)"
    }

    # the means differ by less than the seeds' spread, but every seed's pair agrees: a winner
    consistent = _pair("P(w,a)->Q", "Q->P(w,a)", [90, 80, 70], [89, 79.5, 69.2])
    assert compare(consistent, "P(w,a)->Q", "Q->P(w,a)").winner == "P(w,a)->Q"
    assert winners(consistent) == {
        "weights and activations": "P(w,a)->Q (P(w,a)->Q − Q->P(w,a) per seed: +1.00, +0.50, +0.80; mean +0.77 ± 0.15 s.e.)"
    }
    assert compare(consistent, "Q->P(w,a)", "P(w,a)->Q").winner == "P(w,a)->Q"  # either way round

    # one sign, but carried by one large difference: the mean is under twice its standard error
    lopsided = _pair("P(w)->Q", "Q->P(w)", [50.01, 50.01, 53], [50, 50, 50])
    assert compare(lopsided, "P(w)->Q", "Q->P(w)").winner is None
    # a tie in one seed, one seed only, or a seed that ran one order only: no winner
    assert compare(_pair("P(w)->Q", "Q->P(w)", [91, 92, 90], [90, 92, 89]), "P(w)->Q", "Q->P(w)").winner is None
    assert compare(_pair("P(w)->Q", "Q->P(w)", [99], [90]), "P(w)->Q", "Q->P(w)").winner is None
    assert str(compare(_pair("P(w)->Q", "Q->P(w)", [99], [90]), "P(w)->Q", "Q->P(w)")).endswith("per seed: +9.00; one seed)")
    partial = _pair("P(w)->Q", "Q->P(w)", [91, 92, 93], [90, 91])
    assert compare(partial, "P(w)->Q", "Q->P(w)").differences == (1, 1)


def test_winners_reject_two_runs_of_one_order_and_seed():
    with pytest.raises(ExperimentError, match=r"two runs of P\(w\)->Q with seed 0"):
        compare([_run("P(w)->Q", 90), _run("P(w)->Q", 91), _run("Q->P(w)", 90)], "P(w)->Q", "Q->P(w)")


def test_results_table_shows_mean_std_and_each_seed():
    runs = [_run("baseline", 99), _run("P(w)->Q", 95), _run("P(w)->Q", 93, 1), _run("Q->P(w)", 90), _run("Q->P(w)", 91, 1)]
    table = results_table(digits(), runs)
    rows = {line.split("|")[1].strip(): [cell.strip() for cell in line.split("|")[2:-1]] for line in table.splitlines()[2:]}
    assert list(rows) == ["baseline", "P(w)->Q", "Q->P(w)"]  # absent orders are left out
    assert rows["P(w)->Q"] == ["94.00 ± 1.41", "95.00 / 93.00", "1,000", "4.00"]
    assert rows["baseline"][:2] == ["99.00", "99.00"]  # one seed: no spread
    assert "mean ± std" in table.splitlines()[0] and "seed 0, 1" in table.splitlines()[0]


def test_progress_bar_only_on_a_terminal(monkeypatch, capsys):
    import io

    data = digits()
    model = DigitsNet(width=4)
    fit(model, data, 2, TrainConfig(progress=True))
    assert capsys.readouterr().err == ""  # pytest's captured stderr is not a terminal: no bar

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    terminal = Terminal()
    monkeypatch.setattr("sys.stderr", terminal)
    fit(model, data, 2, TrainConfig(progress=True), desc="on a terminal")
    assert "on a terminal" in terminal.getvalue()
    quiet = Terminal()
    monkeypatch.setattr("sys.stderr", quiet)
    fit(model, data, 2, TrainConfig(progress=False))
    assert quiet.getvalue() == ""


def test_plots_write_pngs(tmp_path, digits_runs):
    import matplotlib.image

    data, runs = digits_runs
    paths = [
        plot_sites(runs[1].model, tmp_path / "sites.png"),
        plot_schedule(order_spec("Q->P(w,a)", functions=("relu",)), 200, tmp_path / "schedule.png"),
        plot_curves(runs, tmp_path / "curves.png", metric=data.metric),
        plot_size_tradeoff(runs, tmp_path / "size.png", metric=data.metric),
    ]
    for path in paths:
        image = matplotlib.image.imread(path)
        assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100
    assert sorted(p.name for p in tmp_path.iterdir()) == ["curves.png", "schedule.png", "sites.png", "size.png"]  # no temporaries left


def test_ramp_is_the_agp_formula():
    op = Prune(sparsity=0.5, start=10, end=20)
    assert ramp(op, 9) == 0.0 and ramp(op, 20) == 0.5 and ramp(op, 30) == 0.5
    assert ramp(op, 15) == pytest.approx(0.5 * (1 - 0.5**3))
    assert ramp(Prune(sparsity=0.3, start=5), 5) == pytest.approx(0.3)


def test_evaluate_computes_the_parametrized_weights_once_per_test_set(digits_runs):
    from fxqp.experiment import evaluate

    data, runs = digits_runs
    model = runs[1].model  # P(w,a)->Q: pruned and quantized weights
    calls = []
    chains = [chain for module in model.modules() if hasattr(module, "parametrizations") for chain in module.parametrizations.values()]
    assert chains
    batch_size = 64
    assert len(data.test_y) > 2 * batch_size
    for chain in chains:
        chain[0].register_forward_pre_hook(lambda module, args: calls.append(module))
    metric = evaluate(model, data, batch_size=batch_size)
    assert len(calls) == len(chains)  # once each, not once per batch
    with torch.no_grad():  # the same accuracy as computing the weights at every batch
        model.eval()
        correct = sum(
            int((model(data.test_x[i : i + batch_size]).argmax(1) == data.test_y[i : i + batch_size]).sum())
            for i in range(0, len(data.test_y), batch_size)
        )
    assert metric == pytest.approx(100.0 * correct / len(data.test_y))
    assert len(calls) > 2 * len(chains)
