"""Accuracy on the real Con-ReID split against the reference figures (slow: embeds 5,507 crops per model)."""

import numpy as np
import pytest

from reidx.indexers.evaluation import evaluate_split
from reidx.pipeline.labelled_split import embed_side
from reidx.pipeline.embed import TorchEmbedder
from conftest import CON_REID

pytestmark = pytest.mark.slow

WEIGHTS = {"osnet_x0_25_msmt17": "msmt17_split", "osnet_x0_25_market1501": "market_split"}


@pytest.mark.parametrize("weights", WEIGHTS)
def test_plain_ranking_reproduces_reference(weights, reference, request):
    query, gallery = request.getfixturevalue(WEIGHTS[weights])
    expected = reference[f"{weights}.pth"]["plain_cosine"]
    report = evaluate_split(query, gallery).as_percent_dict()
    assert report["mAP"] == pytest.approx(expected["mAP"], abs=0.10)
    assert report["rank1"] == pytest.approx(expected["rank1"], abs=0.50)
    assert (report["queries"], report["queries_skipped"], report["gallery_items"]) == (208, 4, 5295)


def test_fast_path_keeps_every_feature_and_the_map(msmt17_split):
    """Shipped default path vs a plain fp32 eager torch model: every crop cosine ≥ 0.999, mAP within 0.10."""
    query, gallery = msmt17_split
    plain = TorchEmbedder("osnet_x0_25_msmt17", fast=False)
    plain_query = embed_side([str(CON_REID / "query")], plain)
    plain_gallery = embed_side([str(CON_REID / "bounding_box_test")], plain)
    for fast_side, plain_side in ((query, plain_query), (gallery, plain_gallery)):
        assert fast_side.table["path"].equals(plain_side.table["path"])
        assert (fast_side.features * plain_side.features).sum(1).min() >= 0.999
    fast_map = evaluate_split(query, gallery).mAP
    plain_map = evaluate_split(plain_query, plain_gallery).mAP
    assert abs(fast_map - plain_map) * 100 <= 0.10
    assert np.isfinite(fast_map)
