"""Blinking Color Balls: the two colour rules on hand-made sequences, generator determinism and
consistency, patchification, config and file errors; the benchmark's error split (position vs colour)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from hclsm.bench.slotssm import blinking_errors, color_chance, visible_ball_classes, white_baseline
from hclsm.data.blinking import (BACKGROUND, CLASSES, WHITE, BlinkingConfig, blinking_episode, earliest_color,
                                 load_blinking, make_blinking, most_frequent_color, patchify, render, save_blinking,
                                 to_rgb)
from hclsm.errors import ConfigError, DataError

RED, GREEN, BLUE, YELLOW, PINK = 2, 3, 4, 5, 6


def test_earliest_color_on_hand_made_sequences():
    picks = np.array([2, 0, 2, 0, 0])
    colors = np.array([BLUE, RED, GREEN, YELLOW, RED])
    # ball 0: first RED; ball 1 never picked: white; ball 2: first BLUE (later GREEN ignored)
    assert earliest_color(picks, colors, 3).tolist() == [RED, WHITE, BLUE]
    assert earliest_color(np.array([1]), np.array([PINK]), 2).tolist() == [WHITE, PINK]


def test_most_frequent_color_on_hand_made_sequences():
    picks = np.array([0, 0, 0, 1, 1, 0, 2, 1, 1])
    colors = np.array([RED, BLUE, BLUE, GREEN, YELLOW, RED, PINK, YELLOW, GREEN])
    # ball 0: RED x2, BLUE x2 -> tie, RED was assigned first; ball 1: GREEN x2, YELLOW x2 -> GREEN first;
    # ball 2: PINK once
    assert most_frequent_color(picks, colors, 4).tolist() == [RED, GREEN, PINK, WHITE]
    # a clear majority wins over the earliest colour
    assert most_frequent_color(np.array([0, 0, 0]), np.array([RED, BLUE, BLUE]), 1).tolist() == [BLUE]
    # the tie goes to the earliest *among the most frequent*, not the overall earliest
    picks, colors = np.array([0, 0, 0, 0, 0]), np.array([PINK, GREEN, RED, RED, GREEN])
    assert most_frequent_color(picks, colors, 1).tolist() == [GREEN]
    assert earliest_color(picks, colors, 1).tolist() == [PINK]


@pytest.mark.parametrize("rule", ["earliest", "most_frequent"])
def test_episode_follows_the_rules(rule):
    cfg = BlinkingConfig(rule=rule, context_frames=8, image_size=32, balls=3, radius=3.0, seed=3)
    for i in range(5):
        ep = blinking_episode(cfg, i)
        assert ep["context"].shape == (8, 32, 32) and ep["target"].shape == (32, 32)
        for t in range(8):  # one ball coloured per frame, the others white
            classes = np.full(3, WHITE)
            classes[ep["picks"][t]] = ep["colors"][t]
            np.testing.assert_array_equal(ep["context"][t], render(ep["positions"][t], classes, 32, 3.0))
            assert set(np.unique(ep["context"][t])) <= {BACKGROUND, WHITE, int(ep["colors"][t])}
        rule_fn = earliest_color if rule == "earliest" else most_frequent_color
        expected = rule_fn(ep["picks"], ep["colors"], 3)
        np.testing.assert_array_equal(ep["target_colors"], expected)
        np.testing.assert_array_equal(ep["target"], render(ep["positions"][8], expected, 32, 3.0))
        assert ep["target"].max() < CLASSES


def test_generator_is_deterministic_and_balls_stay_inside():
    cfg = BlinkingConfig(seed=5)
    a, b = make_blinking(cfg, 3), make_blinking(cfg, 3)
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])
    np.testing.assert_array_equal(make_blinking(cfg, 1, start=2)["context"][0], a["context"][2])  # by index
    other = make_blinking(BlinkingConfig(seed=6), 3)
    assert not np.array_equal(other["context"], a["context"])
    pos = make_blinking(BlinkingConfig(seed=1, context_frames=40), 4)["positions"]
    assert pos.min() >= cfg.radius - 1e-6 and pos.max() <= cfg.image_size - cfg.radius + 1e-6
    assert np.abs(np.diff(pos, axis=1)).max() > 0.5  # the balls move


def test_sequence_lengths_of_the_paper():
    lengths = [BlinkingConfig(context_frames=t, patch=p).sequence_length
               for t, p in ((5, (4, 4)), (5, (4, 2)), (5, (2, 2)), (5, (2, 1)), (10, (2, 1)), (10, (1, 1)))]
    assert lengths == [80, 160, 320, 640, 1280, 2560]


def test_patchify_orders_frames_then_patches_in_raster_order():
    cfg = BlinkingConfig(context_frames=2, patch=(4, 2))
    ctx = make_blinking(cfg, 2)["context"]  # (2, 2, 16, 16)
    seq = patchify(ctx, cfg.patch)  # (2, 2 * 32, 4, 2, 3)
    assert seq.shape == (2, 64, 4, 2, 3)
    rgb = to_rgb(ctx)
    i = 32 + 3 * 8 + 5  # frame 1, patch row 3, patch column 5
    np.testing.assert_array_equal(seq[1, i].numpy(), rgb[1, 1, 12:16, 10:12].numpy())


def test_bad_config_and_bad_file_raise_clear_errors(tmp_path):
    with pytest.raises(ConfigError, match="blinking.rule"):
        BlinkingConfig(rule="latest")
    with pytest.raises(ConfigError, match="blinking.patch"):
        BlinkingConfig(image_size=16, patch=(3, 3))
    path = save_blinking(tmp_path / "b.npz", BlinkingConfig(seed=2), 2, progress=False)
    cfg, data = load_blinking(path)
    assert cfg == BlinkingConfig(seed=2)
    np.testing.assert_array_equal(data["target"], make_blinking(cfg, 2)["target"])
    bad = tmp_path / "bad.npz"
    bad.write_bytes(b"not a zip")
    with pytest.raises(DataError, match="bad.npz"):
        load_blinking(bad)


class _Fixed(torch.nn.Module):
    """A stand-in classifier whose logits are one-hot maps of fixed class images (N, H, W), in call order."""

    def __init__(self, classes: np.ndarray):
        super().__init__()
        self.classes, self.at = torch.as_tensor(classes, dtype=torch.long), 0

    def forward(self, patches: torch.Tensor) -> torch.Tensor:
        out = self.classes[self.at:self.at + len(patches)]
        self.at += len(patches)
        return torch.nn.functional.one_hot(out, CLASSES).permute(0, 3, 1, 2).float()


def test_blinking_errors_split_position_from_colour():
    cfg = BlinkingConfig(seed=4)
    data = make_blinking(cfg, 12)
    target = data["target"]
    balls = visible_ball_classes(data, cfg)
    white_share = float(np.mean(balls != WHITE))

    oracle = blinking_errors(_Fixed(target), data, cfg)
    assert oracle == {"error": 0.0, "ball_color_error": 0.0, "pixel_error": 0.0, "ball_recall": 1.0,
                      "masked_color_error": 0.0}

    white = blinking_errors(_Fixed(np.where(target != BACKGROUND, WHITE, BACKGROUND)), data, cfg)
    assert white["error"] == pytest.approx(white_baseline(data))
    assert white["ball_recall"] == 1.0
    assert white["ball_color_error"] == pytest.approx(white_share)
    assert white["masked_color_error"] == pytest.approx(white_share)

    empty = blinking_errors(_Fixed(np.zeros_like(target)), data, cfg)  # all background: no position, no colour
    assert empty["ball_recall"] == 0.0 and empty["error"] == 1.0 and empty["ball_color_error"] == 1.0
    assert empty["pixel_error"] == pytest.approx(float(np.mean(target != BACKGROUND)))

    counts = np.bincount(balls, minlength=CLASSES)
    assert color_chance(data, cfg) == pytest.approx(1 - counts.max() / counts.sum())
    assert color_chance(data, cfg) <= white_share
