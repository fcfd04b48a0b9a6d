"""Report figures: shapes, dtypes and a few pixel facts (dead slots hatched, births/deaths bordered,
matched segmentation colours; the matplotlib charts at the requested size, their series in their colours,
legends, threshold lines and truth markers where they belong)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from hclsm.viz import (
    BACKDROP,
    BIRTH_RGB,
    COUNT_RGB,
    DEATH_RGB,
    DIM_GREY,
    HATCH_GREY,
    PALETTE,
    TRUTH_RGB,
    alive_count_figure,
    alpha_heatmaps,
    colormap,
    resize_maps,
    segmentation_figure,
    slot_masks_figure,
)
from hclsm.viz.dynamics import (
    FIRED_BAND,
    FIRED_RGB,
    PREDICTED_RGB,
    THRESHOLD_RGB,
    event_timeline,
    slot_pca_figure,
)
from hclsm.viz.slotssm import PALETTE as SERIES_RGB
from hclsm.viz.slotssm import line_chart

T, K, R, H, SCALE, GAP = 5, 3, 8, 16, 2, 2


def _tile(img: np.ndarray, row: int, col: int, n_cols: int = T, h: int = H) -> np.ndarray:
    """The tile at (row, col) of a ``labelled_grid`` image (the label margin is on the left)."""
    step = (h + GAP) * SCALE
    margin = img.shape[1] - (n_cols * step - GAP * SCALE)
    y, x = row * step, margin + col * step
    return img[y:y + h * SCALE, x:x + h * SCALE]


def _clip():
    """A clip whose slot 1 covers everything on every frame except: slot 2 alive on frames 0-1 (covering
    the left half), dead on 2-3 and born again on 4."""
    video = torch.rand(T, 3, H, H) * 0.5 + 0.5
    alive = torch.ones(T, K, dtype=torch.bool)
    alive[2:4, 2] = False
    alphas = torch.zeros(T, K, R, R)
    alphas[:, 1] = 1.0
    alphas[alive[:, 2], 2, :, : R // 2] = 1.0
    alphas[alive[:, 2], 1, :, : R // 2] = 0.0
    return video, torch.rand(T, 3, R, R), alphas, alive


def test_slot_masks_figure_layout_dead_slots_and_birth_death_borders():
    video, recon, alphas, alive = _clip()
    img = slot_masks_figure(video, recon, alphas, alive, scale=SCALE)
    rows = 2 + K  # input, recon, one per slot
    assert img.dtype == np.uint8 and img.ndim == 3 and img.shape[2] == 3
    assert img.shape[0] == rows * H * SCALE + (rows - 1) * GAP * SCALE
    frames = (video.numpy().transpose(0, 2, 3, 1) * 255 + 0.5).astype(np.uint8)
    np.testing.assert_array_equal(_tile(img, 0, 1)[::SCALE, ::SCALE], frames[1])  # row 0: the input

    bg = _tile(img, 2, 0)  # slot 0: alive but its mask is 0 everywhere -> the backdrop
    assert (bg == BACKDROP).all()
    dead = _tile(img, 4, 3)  # slot 2, frame 3: dead (and not the frame it died) -> grey hatching only
    assert set(np.unique(dead)) == {HATCH_GREY, DIM_GREY}
    assert dead.mean() < frames.mean()  # dimmed against the (bright) frames
    died, born = _tile(img, 4, 2), _tile(img, 4, 4)
    assert (died[0, :] == DEATH_RGB).all() and (born[0, :] == BIRTH_RGB).all()
    assert (died[5:-5, 5:-5] <= DIM_GREY).all()  # inside the (2 px, scaled) border
    alive_tile = _tile(img, 4, 0)[3:-3, 3:-3]  # frame 0: the left half shows the frame, the right the backdrop
    half = alive_tile.shape[1] // 2
    assert alive_tile[:, : half - 2].mean() > 120 and (alive_tile[:, half + 2:] == BACKDROP).all()
    no_border = _tile(img, 3, 1)  # slot 1 alive throughout: no border
    assert not (no_border[0, :] == BIRTH_RGB).all() and not (no_border[0, :] == DEATH_RGB).all()


def test_slot_masks_figure_accepts_uint8_frames_and_checks_shapes():
    video, recon, alphas, alive = _clip()
    frames = (video.numpy().transpose(0, 2, 3, 1) * 255).astype(np.uint8)
    a = slot_masks_figure(frames, recon.numpy(), alphas.numpy(), alive.numpy(), scale=1)
    assert a.shape[0] == (2 + K) * H + (1 + K) * GAP
    with pytest.raises(ValueError, match="alive"):
        slot_masks_figure(video, recon, alphas, alive[:, :2])


def test_segmentation_figure_colours_each_slot_as_the_object_it_overlaps():
    frames = torch.ones(2, 3, H, H)
    gt = torch.zeros(2, H, H, dtype=torch.long)
    gt[:, 2:8, 2:8], gt[:, 10:14, 10:14] = 1, 2
    pred = torch.zeros(2, H, H, dtype=torch.long)
    pred[:, 2:8, 2:8], pred[:, 10:14, 10:14], pred[:, 0, :] = 4, 2, 3  # slot 4 ~ agent, 2 ~ block, 3 spurious
    img = segmentation_figure(frames, gt, pred, scale=1)
    assert img.dtype == np.uint8 and img.shape[0] == 3 * H + 2 * GAP
    slots = _tile_1x(img, 2, 0)
    truth = _tile_1x(img, 1, 0)
    np.testing.assert_array_equal(slots[4, 4], truth[4, 4])  # same colour as the agent
    np.testing.assert_array_equal(slots[12, 12], truth[12, 12])  # ... and as the block
    assert not np.array_equal(slots[0, 8], truth[4, 4]) and not np.array_equal(slots[0, 8], truth[12, 12])
    assert (slots[9, 0] == 255).all()  # background slot: uncoloured (the white frame)
    blend = (0.45 * 255 + 0.55 * PALETTE[1].astype(np.float32)).astype(np.uint8)
    np.testing.assert_array_equal(truth[4, 4], blend)
    unmatched = segmentation_figure(frames, gt, pred, match=False, scale=1)
    assert not np.array_equal(_tile_1x(unmatched, 2, 0)[4, 4], truth[4, 4])
    with pytest.raises(ValueError, match="pred_seg"):
        segmentation_figure(frames, gt, pred[:, :8])


def _tile_1x(img: np.ndarray, row: int, col: int) -> np.ndarray:
    step = H + GAP
    margin = img.shape[1] - (2 * step - GAP)
    return img[row * step:row * step + H, margin + col * step:margin + col * step + H]


def test_colormap_and_alpha_heatmaps():
    c = colormap(np.array([0.0, 0.5, 1.0, -3.0, 7.0]))
    assert c.dtype == np.uint8 and c.shape == (5, 3)
    np.testing.assert_array_equal(c[3], c[0])
    np.testing.assert_array_equal(c[4], c[2])
    assert c[0].sum() < c[1].sum() < c[2].sum()  # dark purple -> teal -> yellow
    _, _, alphas, alive = _clip()
    img = alpha_heatmaps(alphas, alive, size=H, scale=SCALE)
    assert img.dtype == np.uint8 and img.shape[2] == 3
    grid_h = K * H * SCALE + (K - 1) * GAP * SCALE
    assert img.shape[0] > grid_h  # the colour bar below
    full = _tile(img, 1, 0)[4:-4, 4:-4]  # slot 1, frame 0: 1 on the right half, 0 on the left
    half = full.shape[1] // 2
    assert (full[:, half + 2:] == colormap(1.0)).all() and (full[:, : half - 2] == colormap(0.0)).all()
    assert set(np.unique(_tile(img, 2, 3))) == {HATCH_GREY, DIM_GREY}  # dead slot hatched
    no_alive = alpha_heatmaps(alphas, size=H, scale=SCALE)
    assert (_tile(no_alive, 2, 3) == colormap(0.0)).all()  # without `alive`: just the (zero) masks


def test_resize_maps_is_bilinear_and_keeps_leading_axes():
    m = torch.zeros(2, 3, 4, 4)
    m[..., 2:] = 1.0
    out = resize_maps(m, (8, 8))
    assert out.shape == (2, 3, 8, 8) and out.dtype == np.float32
    assert out[0, 0, 0, 0] == 0 and out[0, 0, 0, -1] == 1 and 0 < out[0, 0, 0, 3] < 1
    assert resize_maps(m, (4, 4)) is not None and np.array_equal(resize_maps(m, (4, 4)), m.numpy())


def _mask(img: np.ndarray, rgb) -> np.ndarray:
    """Where ``img`` has exactly the colour ``rgb``."""
    return (img == np.array(rgb, np.uint8)).all(-1)


def _box(img: np.ndarray) -> tuple[int, int, int, int]:
    """The plot's frame (top, bottom, left, right rows / columns): the black lines across most of the chart."""
    black = _mask(img, (0, 0, 0))
    rows, cols = np.flatnonzero(black.mean(1) > 0.5), np.flatnonzero(black.mean(0) > 0.3)
    assert len(rows) >= 2 and len(cols) >= 2, "no plot frame found"
    return rows[0], rows[-1], cols[0], cols[-1]


def _line_row(img: np.ndarray, rgb, cols: slice) -> float:
    """Mean row of a horizontal line of colour ``rgb`` across the columns ``cols`` (rows where it covers more
    than half of them: not a legend key)."""
    rows = np.flatnonzero(_mask(img[:, cols], rgb).mean(1) > 0.5)
    assert len(rows), f"no {rgb} line"
    return float(rows.mean())


def test_alive_count_figure_follows_the_count():
    count = np.array([1, 1, 1, 1, 1, 3, 3, 3, 3, 3])
    img = alive_count_figure(count, width=300, height=160)
    assert img.shape == (160, 300, 3) and img.dtype == np.uint8
    top, bottom, x0, x1 = _box(img)
    assert 0 < top < bottom < 160 and 0 < x0 < x1 < 300 and (bottom - top) > 40 and (x1 - x0) > 200
    left, right = slice(x0 + 10, (x0 + x1) // 2 - 10), slice((x0 + x1) // 2 + 10, x1 - 10)
    y_left, y_right = _line_row(img, COUNT_RGB, left), _line_row(img, COUNT_RGB, right)
    assert top < y_right < y_left - 20 < bottom  # higher count = higher line, inside the plot
    np.testing.assert_allclose((bottom - y_left) / (y_left - y_right), 0.5, atol=0.1)  # 1 and 3 on the 0..4 axis
    assert not _mask(img, TRUTH_RGB).any()  # no truth, no orange
    assert _mask(img[:top], COUNT_RGB).any()  # the legend key above the plot
    flat = alive_count_figure(np.full(10, 2), width=300, height=160)
    assert abs(_line_row(flat, COUNT_RGB, left) - _line_row(flat, COUNT_RGB, right)) < 1
    with_truth = alive_count_figure(torch.tensor(count), torch.full((10,), 2), width=300, height=160)
    top, bottom, _, _ = _box(with_truth)
    orange = _mask(with_truth, TRUTH_RGB)
    assert orange[top:bottom].sum() > 50 and orange[:top].any()  # the (dashed) truth line and its legend key
    truth_rows = np.flatnonzero(orange[top:bottom].any(1)) + top
    assert _line_row(with_truth, COUNT_RGB, right) < truth_rows.mean() < _line_row(with_truth, COUNT_RGB, left)


def test_alive_count_figure_bad_input():
    with pytest.raises(ValueError, match="shape"):
        alive_count_figure(np.ones(5), np.ones(4))
    with pytest.raises(ValueError, match="empty"):
        alive_count_figure(np.ones(0))
    with pytest.raises(ValueError, match="too small"):
        alive_count_figure(np.ones(5), width=40, height=40)
    assert alive_count_figure(np.ones(5), width=200, height=160).shape == (160, 200, 3)


def test_alpha_heatmaps_colour_bar_runs_dark_to_yellow():
    _, _, alphas, _ = _clip()
    img = alpha_heatmaps(alphas, size=H, scale=SCALE)
    grid_h = K * H * SCALE + (K - 1) * GAP * SCALE
    strip = img[grid_h:].astype(np.int32)
    coloured = strip.max(-1) - strip.min(-1) > 30  # not white, black or grey (the text and the bar's outline)
    row = strip[coloured.sum(1).argmax()]  # a row through the bar
    bar = row[coloured[coloured.sum(1).argmax()]]
    assert len(bar) > strip.shape[1] // 3  # the bar spans the middle of the strip
    along = colormap((np.arange(len(bar)) + 0.5) / len(bar))  # viridis from 0 (left) to 1 (right)
    assert np.abs(bar - along)[2:-2].max() < 25  # (the edge pixels blend with the outline)
    assert np.abs(bar[2] - colormap(0.0)).max() < 25 and np.abs(bar[-3] - colormap(1.0)).max() < 25


def test_event_timeline_marks_threshold_fired_steps_and_true_events():
    prob = torch.linspace(0, 1, 12)
    chart = event_timeline(prob, (prob > 0.7).float(), 0.7, torch.arange(12) % 5 == 0, width=480, height=220)
    assert chart.shape == (220, 480, 3) and chart.dtype == np.uint8
    top, bottom, x0, x1 = _box(chart)
    plot = chart[top:bottom + 1]
    low = event_timeline(prob, (prob > 0.7).float(), 0.3, torch.arange(12) % 5 == 0, width=480, height=220)
    thr, thr_low = _line_row(chart, THRESHOLD_RGB, slice(x0, x1)), _line_row(low, THRESHOLD_RGB, slice(x0, x1))
    np.testing.assert_allclose((thr_low - thr) / (bottom - top), 0.4 / 1.08, atol=0.03)  # 0.7 -> 0.3: lower
    band = np.flatnonzero(_mask(plot, FIRED_BAND).any(0))  # shaded columns: the fired steps 8..11 (of 12)
    np.testing.assert_allclose([(band[0] - x0) / (x1 - x0), (band[-1] - x0) / (x1 - x0)], [8 / 12, 1], atol=0.02)
    red = np.flatnonzero(_mask(plot, FIRED_RGB).any(0))
    assert len(red) and red.min() >= band[0]  # fired dots only on fired steps
    assert _mask(plot, COUNT_RGB).any() and _mask(chart[:top], COUNT_RGB).any()  # the curve and its legend key
    orange = _mask(chart, TRUTH_RGB)
    assert orange[:top].any()  # the legend key
    ticks = np.flatnonzero(orange[bottom - 15:bottom + 1].any(0))  # ticks standing on the step axis: 0, 5, 10
    centres = [ticks[ticks < x0 + 0.3 * (x1 - x0)].mean(), ticks[(ticks > x0 + 0.3 * (x1 - x0))
                                                                 & (ticks < x0 + 0.7 * (x1 - x0))].mean(),
               ticks[ticks > x0 + 0.7 * (x1 - x0)].mean()]
    np.testing.assert_allclose((np.array(centres) - x0) / (x1 - x0), np.array([0.5, 5.5, 10.5]) / 12, atol=0.02)
    no_truth = event_timeline(prob, prob > 0.7, 0.7)
    assert not _mask(no_truth, TRUTH_RGB).any()  # no truth: no ticks and no legend key
    with pytest.raises(ValueError, match="same non-empty"):
        event_timeline(prob, prob[:5], 0.5)
    with pytest.raises(ValueError, match="too small"):
        event_timeline(prob, prob > 0.7, 0.7, width=60, height=60)


def test_slot_pca_figure_draws_alive_slots_in_their_colours_and_the_prediction_dashed():
    g = torch.Generator().manual_seed(0)
    slots, alive = torch.randn(8, 4, 16, generator=g), torch.ones(8, 4, dtype=torch.bool)
    alive[:, 3] = False  # never alive: not drawn, no legend entry
    fig = slot_pca_figure(slots, alive, width=400, height=300)
    assert fig.shape == (300, 400, 3) and fig.dtype == np.uint8
    top = _box(fig)[0]
    for j in range(3):  # bg black, slot j in PALETTE[j]
        assert _mask(fig[top + 2:], PALETTE[j]).sum() > 20 and _mask(fig[:top], PALETTE[j]).any()
    assert not _mask(fig, PALETTE[3]).any()
    assert _mask(fig, PREDICTED_RGB).sum(1).max() < 5  # no "predicted" legend key (a few text pixels at most)
    with_pred = slot_pca_figure(slots, alive, slots[-3:] + 0.1, width=400, height=300)
    assert _mask(with_pred[:_box(with_pred)[0]], PREDICTED_RGB).sum(1).max() >= 8  # its dashed legend key
    assert (with_pred != fig).any(-1)[_box(with_pred)[0] + 2:].sum() > 200  # the dashed paths
    no_bg = slot_pca_figure(slots, alive, background=False, width=400, height=300)
    inside = [img[t + 2:b - 1, x0 + 2:x1 - 1] for img in (fig, no_bg) for t, b, x0, x1 in [_box(img)]]
    assert _mask(inside[0], (0, 0, 0)).sum() > 20 and not _mask(inside[1], (0, 0, 0)).any()  # bg: black
    assert _mask(inside[1], PALETTE[3]).sum() > 20  # without a background slot, slot 2 takes PALETTE[3]
    with pytest.raises(ValueError, match="no alive"):
        slot_pca_figure(slots, torch.zeros(8, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="too small"):
        slot_pca_figure(slots, alive, width=90, height=90)


def test_line_chart_draws_each_series_in_its_colour_and_skips_missing_points():
    series = {"a": ([80, 160, 320], [1.0, 2.0, 4.0]), "b": ([80, 160, 320], [3.0, 1.0, None])}
    img = line_chart(series, "title", "length", "ms", log_x=True, width=420, height=260)
    assert img.shape == (260, 420, 3) and img.dtype == np.uint8
    top, bottom, x0, x1 = _box(img)
    for rgb in SERIES_RGB[:2]:
        plot = _mask(img[top + 2:bottom - 1, x0 + 2:x1 - 1], rgb)
        assert plot.sum() > 100 and _mask(img[:, x1 + 1:], rgb).any()  # the line and its legend key (right)
    ys, xs = np.nonzero(_mask(img[top + 2:bottom - 1, x0 + 2:x1 - 1], SERIES_RGB[0]))
    assert ys[xs == xs.min()].mean() > ys[xs == xs.max()].mean() + 50  # rising: lower on the left
    assert not _mask(img, SERIES_RGB[2]).any()
    for log_x, middle in ((True, 1 / 2), (False, 1 / 3)):  # where 160 sits between 80 and 320
        chart = line_chart(series, "title", "length", "ms", log_x=log_x, width=420, height=260)
        t, b, left, right = _box(chart)
        _, xs_a = np.nonzero(_mask(chart[t + 2:b - 1, left + 2:right - 1], SERIES_RGB[0]))
        _, xs_b = np.nonzero(_mask(chart[t + 2:b - 1, left + 2:right - 1], SERIES_RGB[1]))
        # b's None at 320 is skipped: it ends at 160 (measured from the left edge of the first dots)
        np.testing.assert_allclose((xs_b.max() - xs_a.min()) / (xs_a.max() - xs_a.min()), middle, atol=0.05)


def test_slot_masks_figure_without_a_reconstruction_row():
    video, _, alphas, alive = _clip()
    img = slot_masks_figure(video, None, alphas, alive, scale=1)
    assert img.shape[0] == (1 + K) * H + K * GAP
