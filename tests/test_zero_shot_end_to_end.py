"""Zero-shot data and reconstruction through each toolkit, judged where it matters: on
held-out images of the model's own data, against FP32.

The model is trained in seconds at import (conftest.trained_bn_model); its "real" data are
pseudo_images, which no step below sees. Each toolkit quantizes it at W4A4: calibrated on
Gaussian noise, calibrated on zero-shot (genie) images, and calibrated on those images then
reconstructed (genie-m), with learned rounding and with the rounding held at nearest.
Reconstruction must beat plain calibration on either data, and learned rounding must beat
nearest rounding: a broken generator, calibration or write-back shows up as a larger error
on the held-out set. Checked by putting bugs in: a routine that forgot to write the learned
rounding back into the toolkit's weights fails here in fx, pt2e and Brevitas (in NNCF the
learned steps alone keep it under the bars), one that forgot the learned weight steps fails
here in Brevitas; tests/test_reconstruction.py's toolkit-reproduces-the-routine test catches
both in every toolkit."""

import pytest
import torch

from tests.conftest import SHAPE, pseudo_images, trained_bn_model
from tests.test_adapter_conformance import BUILT_IN
from zsq_plugins import apply, synthesize

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::UserWarning")


@pytest.fixture(scope="module")
def data():
    model = trained_bn_model()
    genie = synthesize(model, 128, "genie", input_shape=SHAPE, iterations=60, progress=False)
    noise = synthesize(model, 128, "noise", input_shape=SHAPE, progress=False)
    return genie.images, noise.images


def _held_out_error(quantized, model) -> float:
    held_out = pseudo_images(512, torch.Generator().manual_seed(1))
    with torch.no_grad():
        return float((quantized(held_out) - model(held_out)).pow(2).mean())


@pytest.mark.slow
@pytest.mark.parametrize("toolkit", BUILT_IN)
def test_reconstruction_on_zero_shot_data_beats_plain_and_noise_on_held_out_images(toolkit, data):
    genie, noise = data
    model = trained_bn_model()
    errors = {}
    steps = {"iterations": 300}
    for name, images, reconstruction in (
        ("noise", noise, None),
        ("genie", genie, None),
        ("genie + genie-m", genie, steps),
        # The same reconstruction with the rounding held at nearest (a learning rate too small
        # to move it): what learned rounding, written back into the toolkit, adds.
        ("genie + genie-m, nearest rounding", genie, {**steps, "rounding_lr": 1e-9}),
    ):
        quantized, _ = apply(
            trained_bn_model(), toolkit, "W4A4", data=images, progress=False,
            reconstruct="genie-m" if reconstruction else None,
            reconstruct_options=reconstruction,
        )  # fmt: skip
        errors[name] = _held_out_error(quantized, model)
    assert errors["genie + genie-m"] < 0.8 * errors["genie"], errors
    assert errors["genie + genie-m"] < 0.8 * errors["noise"], errors
    assert errors["genie + genie-m"] < 0.9 * errors["genie + genie-m, nearest rounding"], errors
