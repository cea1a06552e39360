"""The preview with a positive finding's heat map blended over the image and its legend in the banner."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from service.results.heatmap import encode_heatmap
from service.results.preview import BANNER_TEXT, build_preview, heatmap_finding, preview_scale
from service.results.schema import Code, Finding, HeatMap
from tests.service.results.test_preview import (
    banner_height,
    build,
    chest_dataset,
    result_for,
    write_and_check,
)

PNEUMOTHORAX = Code(scheme="SCT", value="36118008", meaning="Pneumothorax")


def pneumothorax(ds, heatmap: HeatMap | None, positive: bool = True) -> Finding:
    return Finding(
        model="cxr-pneumothorax",
        model_version="1.0.0",
        model_sha256="cd" * 32,
        label="pneumothorax",
        code=PNEUMOTHORAX,
        probability=0.91 if positive else 0.1,
        threshold=0.5,
        positive=positive,
        urgent=positive,
        urgency="stat",
        series_uid=str(ds.SeriesInstanceUID),
        key_instance_uid=str(ds.SOPInstanceUID),
        key_frame=1,
        heatmap=heatmap,
    )


def hot_top_left(ds) -> HeatMap:
    values = np.zeros((64, 64), np.float32)
    values[:24, :24] = 1.0
    return HeatMap(
        sop_instance_uid=str(ds.SOPInstanceUID), frame=1, rows=64, columns=64,
        values=encode_heatmap(values), peak=2.5, output="cam",
    )  # fmt: skip


def test_overlay_where_the_map_is_hot_and_a_legend_in_the_banner(tmp_path: Path) -> None:
    ds = chest_dataset()  # left half black, right half white
    result = result_for(ds, [pneumothorax(ds, hot_top_left(ds))])
    back = write_and_check(build(result, ds, heatmap=True), tmp_path)  # dciodvfy clean
    pixels = back.pixel_array.astype(int)
    scale, top = preview_scale(64, 64), banner_height(back, 64, 64)

    hot = pixels[top + round(8 * scale), round(8 * scale)]
    assert hot[0] > 100 and hot[0] > hot[1] + 60 and hot[0] > hot[2] + 60  # red over a black image
    cold = pixels[top + round(50 * scale), round(50 * scale)]
    assert cold[0] == cold[1] == cold[2]  # grey: no colour where the map is cold

    legend = pixels[: top - 2].reshape(-1, 3)
    coloured = (legend.max(axis=1) - legend.min(axis=1)) > 100
    assert coloured.sum() > 200, "the colour bar of the legend is in the banner"
    assert back.ImageComments.startswith(BANNER_TEXT) and "heat map" in back.ImageComments
    assert "AI heat map of pneumothorax (cxr-pneumothorax)" in back.DerivationDescription

    plain = build(result, ds)  # the ordinary preview: no overlay, no legend
    row = banner_height(plain, 64, 64) + round(8 * scale)
    assert len(set(plain.pixel_array[row, round(8 * scale)])) == 1
    assert banner_height(plain, 64, 64) < top


def test_only_positive_findings_with_a_map_on_that_frame(tmp_path: Path) -> None:
    ds = chest_dataset()
    negative = result_for(ds, [pneumothorax(ds, hot_top_left(ds), positive=False)])
    assert heatmap_finding(negative) is None
    with pytest.raises(ValueError, match="no positive finding has a heat map"):
        build(negative, ds, heatmap=True)
    assert heatmap_finding(result_for(ds, [pneumothorax(ds, None)])) is None
    other = chest_dataset()
    shown = result_for(ds, [pneumothorax(ds, hot_top_left(ds))])
    assert heatmap_finding(shown, str(other.SOPInstanceUID)) is None
    with pytest.raises(ValueError, match="no positive finding has a heat map"):
        build_preview(shown, other, sop_instance_uid="1.2.3", series_instance_uid="1.2.4", heatmap=True)
