"""The calibration jobs split over Ray tasks give the results of one in-process worker."""

import pytest
import torch
from safetensors.torch import load_file

from tpserve.quant.awq import auto_awq
from tpserve.quant.calibrate import calibrate
from conftest import local_ray
from test_quant_models import make_tiny, write_calib_text

KINDS = ("inputs", "outputs", "key", "value")


@pytest.fixture(scope="module")
def ray_local():
    with local_ray(2) as ray:
        yield ray


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("ray_jobs")
    model = make_tiny(root / "model", num_key_value_heads=2, outliers=True)
    return root, model, write_calib_text(root / "calib.txt")


@pytest.fixture
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the same kernels as a one-CPU Ray task
    yield
    torch.set_num_threads(threads)


def test_calibrate_two_workers_match_one(setup, ray_local, one_thread):
    root, model, data = setup
    calibrate(model, data, 6, 24, str(root / "c1"), num_workers=1, device="cpu")
    calibrate(model, data, 6, 24, str(root / "c2"), num_workers=2, device="cpu")
    assert ray_local.is_initialized()  # a Ray the caller started is left running
    for kind in KINDS:
        one, two = (torch.load(root / d / f"{kind}_stats.pth") for d in ("c1", "c2"))
        assert one["max"].keys() == two["max"].keys()
        for stat in ("max", "min", "absmax"):
            for key, t in one[stat].items():
                assert torch.equal(two[stat][key], t), (kind, stat, key)
        for stat in ("mean", "absmean"):
            for key, t in one[stat].items():
                assert torch.allclose(two[stat][key], t, rtol=1e-5, atol=1e-6), (kind, stat, key)


def test_awq_searches_as_ray_tasks(setup, ray_local, one_thread):
    root, model, data = setup
    kwargs = dict(w_group_size=32, calib_dataset=data, calib_samples=4, calib_seqlen=32, clip=True, device="cpu")
    auto_awq(model, str(root / "a1"), num_workers=1, **kwargs)
    auto_awq(model, str(root / "a2"), num_workers=2, **kwargs)
    one, two = (load_file(root / d / "model.safetensors") for d in ("a1", "a2"))
    assert one.keys() == two.keys()
    for key, t in one.items():
        assert torch.equal(two[key], t), key
