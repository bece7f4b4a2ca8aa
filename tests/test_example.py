"""examples/train_digits.py: a shortened run learns (the loss falls)."""
from __future__ import annotations

import importlib.util
import pathlib

import numpy as np
import pytest

pytest.importorskip("sklearn")

EXAMPLE = pathlib.Path(__file__).resolve().parents[1] / "examples" / "train_digits.py"


def _load():
    spec = importlib.util.spec_from_file_location("train_digits", EXAMPLE)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_short_training_run_lowers_the_loss():
    mod = _load()
    lines = []
    out = mod.train(epochs=4, seed=0, n_train=600, log=lines.append)
    losses = out["losses"]
    assert len(losses) == 4 and len(lines) == 5          # one line per epoch + accuracy
    assert all(np.isfinite(losses))
    assert losses[0] < np.log(10) + 0.2                  # starts near chance
    assert losses[-1] < 0.7 * losses[0]
    assert out["test_accuracy"] > 0.4                    # far above chance (0.1)


def test_model_gradients_match_finite_differences():
    """The example's hand-written backward (ReLU, pooling, linear, cross-entropy)."""
    mod = _load()
    rng = np.random.default_rng(0)
    model = mod.Model(np, seed=1, width=4)
    for c in model.convs:
        c.to(np.float64)
    model.fc_w = model.fc_w.astype(np.float64)
    model.fc_b = model.fc_b.astype(np.float64)
    x = rng.standard_normal((3, 1, 8, 8))
    y = np.array([1, 7, 3])

    def loss():
        return mod.softmax_cross_entropy(np, model.forward(x), y)[0]

    _, g = mod.softmax_cross_entropy(np, model.forward(x), y)
    grads = model.backward(g)
    params = model.parameters()
    h = 1e-6
    for p, gp in zip(params, grads):
        idx = tuple(int(rng.integers(0, s)) for s in p.shape)
        p[idx] += h
        up = loss()
        p[idx] -= 2 * h
        dn = loss()
        p[idx] += h
        assert abs((up - dn) / (2 * h) - gp[idx]) < 1e-6 * max(1.0, abs(gp[idx]))


def test_command_line_rejects_bad_arguments(capsys):
    mod = _load()
    with pytest.raises(SystemExit) as e:
        mod.main(["--device", "tpu"])
    assert e.value.code == 2
    with pytest.raises(SystemExit) as e:
        mod.main(["--epochs", "0"])
    assert e.value.code == 2
