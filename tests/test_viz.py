"""Report figures: shapes, dtypes and a few pixel facts (dead slots hatched, births/deaths bordered,
matched segmentation colours, the count chart following the count)."""
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


def _line_rows(img: np.ndarray, rgb, cols: slice) -> float:
    """Mean row of the pixels of colour ``rgb`` in the columns ``cols`` (below the title and legend)."""
    part = img[44:, cols]
    ys, _ = np.nonzero((part == np.array(rgb, np.uint8)).all(-1))
    assert len(ys), f"no {rgb} pixels"
    return float(ys.mean()) + 44


def test_alive_count_figure_follows_the_count():
    count = np.array([1, 1, 1, 1, 1, 3, 3, 3, 3, 3])
    img = alive_count_figure(count, width=300, height=160)
    assert img.shape == (160, 300, 3) and img.dtype == np.uint8
    left, right = slice(50, 130), slice(180, 280)
    assert _line_rows(img, COUNT_RGB, left) > _line_rows(img, COUNT_RGB, right) + 20  # higher count = higher line
    assert not (img == np.array(TRUTH_RGB, np.uint8)).all(-1).any()  # no truth, no orange
    flat = alive_count_figure(np.full(10, 2), width=300, height=160)
    assert abs(_line_rows(flat, COUNT_RGB, left) - _line_rows(flat, COUNT_RGB, right)) < 1
    with_truth = alive_count_figure(torch.tensor(count), torch.full((10,), 2), width=300, height=160)
    assert (with_truth == np.array(TRUTH_RGB, np.uint8)).all(-1).sum() > 50  # truth line and legend swatch
    assert (with_truth[:40] == np.array(TRUTH_RGB, np.uint8)).all(-1).any()  # legend on top


def test_alive_count_figure_bad_input():
    with pytest.raises(ValueError, match="shape"):
        alive_count_figure(np.ones(5), np.ones(4))
    with pytest.raises(ValueError, match="empty"):
        alive_count_figure(np.ones(0))
    with pytest.raises(ValueError, match="too small"):
        alive_count_figure(np.ones(5), width=40, height=40)


def test_slot_masks_figure_without_a_reconstruction_row():
    video, _, alphas, alive = _clip()
    img = slot_masks_figure(video, None, alphas, alive, scale=1)
    assert img.shape[0] == (1 + K) * H + K * GAP
