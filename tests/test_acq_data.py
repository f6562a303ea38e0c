"""The demo's data pipeline (without running the demo) and the teacher/eval helpers."""
import pytest
import torch

from acqtrain.data import DIGITS_TEST, DIGITS_TRAIN, evaluate, load_digits_split, TensorData
from acqtrain.demo import format_table
from acqtrain import graph
from acqtrain.models import build_model, digits_net, resnet20, INPUT_SHAPE
from acqtrain.quant import WEIGHT_TYPES


def test_digits_split_shapes_range_and_determinism():
    xtr, ytr, xte, yte = load_digits_split(0)
    assert xtr.shape == (DIGITS_TRAIN, 1, 16, 16) and xte.shape == (DIGITS_TEST, 1, 16, 16)
    assert (DIGITS_TRAIN, DIGITS_TEST) == (1400, 397)
    assert xtr.dtype == torch.float32 and ytr.dtype == torch.int64
    assert xtr.min() >= -1 and xtr.max() <= 1 and xtr.min() == -1 and xtr.max() > 0.9
    assert set(ytr.tolist()) == set(range(10)) and set(yte.tolist()) == set(range(10))
    again = load_digits_split(0)
    assert torch.equal(again[0], xtr) and torch.equal(again[3], yte)
    # train and test are disjoint draws of the 1797 images
    flat_tr = {tuple(r) for r in xtr.flatten(1).tolist()}
    assert sum(tuple(r) in flat_tr for r in xte.flatten(1).tolist()) < 10  # (a few digits are exact duplicates)
    assert not torch.equal(load_digits_split(1)[1], ytr)


def test_evaluate_counts_correct_predictions():
    class Oracle(torch.nn.Module):
        def forward(self, x):
            return torch.nn.functional.one_hot(x[:, 0, 0, 0].long(), 3).float()
    x = torch.tensor([0, 1, 2, 2]).float().view(4, 1, 1, 1)
    data = TensorData(x, torch.tensor([0, 1, 2, 0]), batch_size=3)
    assert evaluate(Oracle(), data) == 75.0


def _stages(model, shape):
    gm = graph.trace(model)
    graph.propagate_shapes(gm, shape)
    return graph.stage_outputs(gm, WEIGHT_TYPES)


def test_models_and_attention_layers():
    m = digits_net()
    assert 70_000 < sum(p.numel() for p in m.parameters()) < 80_000
    # the residual stages' outputs, found from the graph (the one-conv stem is no stage)
    assert _stages(m, (1, 1, 16, 16)) == ["layer1_0_relu2", "layer2_0_relu2", "layer3_0_relu2"]
    assert INPUT_SHAPE["digits_net"] == (1, 16)
    r = resnet20(100)
    assert r(torch.randn(2, 3, 32, 32)).shape == (2, 100) and len(_stages(r, (1, 3, 32, 32))) == 3


def test_torchvision_resnet_stages():
    pytest.importorskip("torchvision")
    tv = build_model("resnet18", 10)  # torchvision's own definition, random weights
    assert _stages(tv, (1, 3, 64, 64)) == [f"layer{i}_1_relu_1" for i in range(1, 5)]
    assert tv(torch.randn(1, 3, 64, 64)).shape == (1, 10)


def test_table_formatting_uses_measured_values():
    res = {"rows": [{"bits": "W3A3", "fp": 99.5, "naive": 80.25, "gdfq": 97.0, "acq": 98.0}], "test_size": 397,
           "seconds_total": 1.0}
    table = format_table(res)
    assert "| W3A3 | 99.50 | 80.25 | 97.00 | 98.00 |" in table


def test_digits_teacher_depends_on_its_seed_only(tmp_path):
    """The cached teacher of a seed is the same whatever the caller did with the global RNG before."""
    from acqtrain.teacher import digits_teacher
    states = []
    for i, noise in enumerate((0, 7)):
        torch.manual_seed(1000 + noise)
        torch.rand(noise)  # the caller's own use of the global RNG
        model, _, trained = digits_teacher(str(tmp_path / f"t{i}.pt"), seed=3, epochs=1, progress=False)
        assert trained
        states.append(model.state_dict())
    for k in states[0]:
        assert torch.equal(states[0][k], states[1][k]), k
