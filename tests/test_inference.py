import itertools

import pytest
import torch

from deblur_diffusion.inference import Inference, tile_starts


@pytest.mark.parametrize("length", [1, 31, 64, 65, 100, 257, 1120, 1680])
@pytest.mark.parametrize(("tile", "stride"), [(64, 50), (64, 64), (256, 220), (32, 7)])
def test_tiles_cover_every_pixel_and_the_last_is_snapped_to_the_border(length, tile, stride):
    starts = tile_starts(length, tile, stride)
    covered = torch.zeros(max(length, tile), dtype=torch.bool)
    for start in starts:
        covered[start : start + tile] = True
    assert covered[:length].all()
    assert starts[0] == 0
    assert starts[-1] == max(0, length - tile)
    assert all(0 < b - a <= stride for a, b in itertools.pairwise(starts))


def test_paper_protocol_on_a_dpdd_sized_side():
    assert tile_starts(1120, 256, 220) == [0, 220, 440, 660, 864]


@pytest.mark.parametrize("blend", ["uniform", "gaussian"])
def test_identity_model_gives_back_the_input_exactly(blend):
    image = torch.rand(2, 3, 131, 97)
    restored = Inference("tiles", tile_size=48, stride=31, tile_batch_size=5, blend=blend)(lambda t: t, image)
    assert torch.equal(restored, image)


@pytest.mark.parametrize("blend", ["uniform", "gaussian"])
def test_per_pixel_model_is_the_same_tiled_and_whole(blend):
    torch.manual_seed(0)
    per_pixel = torch.nn.Conv2d(9, 3, kernel_size=1)
    image = torch.rand(1, 9, 90, 70)
    with torch.no_grad():
        whole = Inference("whole")(per_pixel, image)
        tiled = Inference("tiles", tile_size=32, stride=20, tile_batch_size=3, blend=blend)(per_pixel, image)
    torch.testing.assert_close(tiled, whole, atol=1e-6, rtol=0)


def test_extra_channels_are_cut_with_the_image():
    image = torch.rand(1, 6, 70, 50)
    prior_only = Inference("tiles", tile_size=32, stride=24)(lambda t: t[:, 3:], image)
    assert torch.equal(prior_only, image[:, 3:])


def test_result_does_not_depend_on_the_tile_batch_size():
    torch.manual_seed(0)
    model = torch.nn.Conv2d(3, 3, kernel_size=5, padding=2)
    image = torch.rand(2, 3, 75, 61)
    with torch.no_grad():
        results = [Inference("tiles", tile_size=32, stride=21, tile_batch_size=n)(model, image) for n in (1, 4, 100)]
    assert torch.equal(results[0], results[1]) and torch.equal(results[0], results[2])


def test_tile_larger_than_the_image_pads_and_crops():
    seen = []

    def model(tiles):
        seen.append(tuple(tiles.shape))
        return tiles * 2

    image = torch.rand(1, 3, 20, 13)
    restored = Inference("tiles", tile_size=64, stride=60)(model, image)
    assert seen == [(1, 3, 64, 64)]
    torch.testing.assert_close(restored, image * 2)


def test_a_large_image_goes_through_the_network_in_calls_of_at_most_tile_batch_tiles():
    # What bounds the network's activation memory; the measured memory is in benchmarks/inference.py.
    largest = []

    def model(tiles):
        largest.append(tiles.shape[0])
        return tiles[:, :3] * 0.5

    image = torch.rand(1, 3, 3000, 4000)
    restored = Inference("tiles", tile_size=256, stride=220, tile_batch_size=6)(model, image)
    assert restored.shape == (1, 3, 3000, 4000)
    tiles = len(tile_starts(3000, 256, 220)) * len(tile_starts(4000, 256, 220))
    assert max(largest) == 6 and sum(largest) == tiles and len(largest) == -(-tiles // 6)


@pytest.mark.parametrize(
    ("options", "message"),
    [({"mode": "patches"}, "mode"), ({"stride": 300}, "stride"), ({"blend": "hann"}, "blend"), ({"tile_batch_size": 0}, "tile_batch")],
)
def test_bad_options_are_named(options, message):
    with pytest.raises(ValueError, match=message):
        Inference(**options)
