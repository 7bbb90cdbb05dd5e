"""Each scheduler inside the unmodified FluxKontextPipeline (tiny random weights, CPU): it runs, returns the
requested size, and is deterministic under a seed. Accuracy is tests/test_scheduler_accuracy.py's job."""

from __future__ import annotations

import functools

import numpy as np
import pytest
import torch

from flux_kontext.models import build_random_pipeline
from flux_kontext.schedulers import SCHEDULERS, make_scheduler


@functools.lru_cache(maxsize=1)
def tiny_pipeline():
    return build_random_pipeline(tiny=True, device=torch.device("cpu"), dtype=torch.float32)


def generate(name: str) -> np.ndarray:
    pipe = tiny_pipeline()
    pipe.set_progress_bar_config(disable=True)
    pipe.scheduler = make_scheduler(name, dict(pipe.scheduler.config))
    image = pipe(
        prompt="a cat",
        width=256,
        height=256,
        max_area=256 * 256,
        num_inference_steps=4,
        generator=torch.Generator().manual_seed(0),
        max_sequence_length=64,
    ).images[0]
    assert pipe.scheduler.step_index == 4  # every step went through the swapped-in scheduler
    return np.asarray(image)


@pytest.mark.parametrize("name", SCHEDULERS)
def test_scheduler_runs_in_the_pipeline(name):
    first, second = generate(name), generate(name)
    assert first.shape == (256, 256, 3)
    np.testing.assert_array_equal(first, second)


def test_dpm_changes_the_result():
    """The swap is real: the second-order update gives a different image than Euler at the same steps."""
    assert not np.array_equal(generate("euler"), generate("dpmpp_2m"))


def test_apply_reports_the_schedulers():
    from flux_kontext.settings import Settings
    from flux_kontext.stack import Hardware, stack_for

    [report] = stack_for(Settings(model="tiny"), only=["dpm_solver"]).apply(tiny_pipeline(), Hardware("cpu"))
    assert report.status == "applied" and all(name in report.detail for name in SCHEDULERS)
    assert report.flag == "use_dpm_solver" and report.switchable_per_request
