"""The Keras reference computes our models' function: same parameter counts, same outputs given the same weights.

pytest benchmarks/tests          # needs pip install -e ".[bench]"
"""

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("tensorflow")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import reference_keras as rk  # noqa: E402

from genreclf.models import GRUConfig, GRUTagger, TransformerConfig, TransformerTagger, count_parameters  # noqa: E402


@pytest.mark.parametrize(
    "kind, model, n_params",
    [
        ("gru", lambda: GRUTagger(GRUConfig()), 768_595),
        ("transformer", lambda: TransformerTagger(TransformerConfig()), 720_467),
    ],
)
def test_same_parameters_and_outputs_as_ours(kind, model, n_params):
    torch.manual_seed(0)
    ours, ref = model().eval(), rk.build(kind)
    assert count_parameters(ours) == ref.count_params() == n_params
    rk.port_weights(ours, ref, kind)
    x = np.random.default_rng(0).standard_normal((3, 300, 128)).astype(np.float32)
    with torch.no_grad():
        p_ours = torch.sigmoid(ours(torch.from_numpy(x))).numpy()
    np.testing.assert_allclose(ref(x, training=False).numpy(), p_ours, atol=1e-5)
