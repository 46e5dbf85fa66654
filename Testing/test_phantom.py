import numpy as np
import pytest
import SimpleITK as sitk
from scipy import ndimage

from us3d.phantom import LABELS, simulate_sequence, simulate_volume
from us3d.phantom.export import displacement_image

RAYLEIGH_SNR = 1.913
RAYLEIGH_LOG_STD_DB = 5.57


@pytest.fixture(scope="module")
def sequence():
    return simulate_sequence(4, seed=2)


@pytest.fixture(scope="module")
def sliding_16mm():
    """Seed 2 breathing 16 mm under a wall that does not follow (two tests read it)."""
    from us3d.phantom import BreathingSettings

    return simulate_sequence(4, 2, breathing=BreathingSettings(amplitude=16.0))


def _parenchyma(labels):
    return ndimage.binary_erosion(labels == LABELS["parenchyma"], iterations=3)


@pytest.mark.parametrize("seed", [0, 5])
def test_fully_developed_speckle_statistics(seed):
    phantom = simulate_volume(seed)
    envelope = phantom.envelope[0][_parenchyma(phantom.labels[0])]
    assert envelope.size > 50_000
    assert envelope.mean() / envelope.std() == pytest.approx(RAYLEIGH_SNR, abs=0.05)
    assert (20 * np.log10(envelope)).std() == pytest.approx(RAYLEIGH_LOG_STD_DB, abs=0.1)


def test_clean_echogenicity_is_the_mean_of_the_speckled_bmode():
    phantom = simulate_volume(1)
    region = _parenchyma(phantom.labels[0])
    assert phantom.bmode[0][region].mean() == pytest.approx(phantom.echogenicity[0][region].mean(), abs=2.0)
    assert phantom.bmode[0][region].std() > 20  # speckle...
    assert phantom.echogenicity[0][region].std() < 3  # ...that the ground truth does not have


def test_deterministic_per_seed_and_anatomy_varies_with_seed():
    a, b, c = simulate_volume(3), simulate_volume(3), simulate_volume(4)
    np.testing.assert_array_equal(a.bmode, b.bmode)
    np.testing.assert_array_equal(a.displacement, b.displacement)
    assert (a.labels != c.labels).mean() > 0.01


def test_anatomy_has_the_expected_structures():
    labels = simulate_volume(0).labels[0]
    for name in ("abdominal_wall", "parenchyma", "vessel", "diaphragm"):
        assert (labels == LABELS[name]).any(), name
    lesions = np.isin(labels, [LABELS["lesion_hypoechoic"], LABELS["lesion_hyperechoic"]])
    assert lesions.any()


def test_motion_ground_truth_moves_the_speckle(sequence):
    """Resampling frame 0 with frame t's displacement field (SimpleITK) reproduces frame t."""
    def image(array):
        result = sitk.GetImageFromArray(array.astype(np.float32))
        result.SetSpacing(sequence.spacing)
        return result

    inner = (slice(4, -4), slice(20, -8), slice(40, -40))
    for t in range(1, 4):
        transform = sitk.DisplacementFieldTransform(displacement_image(sequence, t))
        warped = sitk.GetArrayFromImage(sitk.Resample(image(sequence.bmode[0]), image(sequence.bmode[t]),
                                                      transform, sitk.sitkLinear, 0.0))
        with_truth = np.corrcoef(warped[inner].ravel(), sequence.bmode[t][inner].ravel())[0, 1]
        without = np.corrcoef(sequence.bmode[0][inner].ravel(), sequence.bmode[t][inner].ravel())[0, 1]
        assert with_truth > 0.9
        assert with_truth > without + 0.15


def test_breathing_motion_range_and_no_folding(sequence):
    assert not sequence.displacement[0].any()  # frame 0 is the reference
    peak = np.abs(sequence.displacement).max(axis=(0, 1, 2, 3))
    assert 3.0 < peak[0] <= 12.0  # superior-inferior, along x
    assert peak[1] < peak[0] and peak[2] < peak[0]
    spacing = np.array(sequence.spacing)
    for t in range(1, 4):
        field = sequence.displacement[t].astype(np.float64)
        jacobian = np.zeros(field.shape[:3] + (3, 3))
        for component in range(3):
            dz, dy, dx = np.gradient(field[..., component], spacing[2], spacing[1], spacing[0])
            jacobian[..., component, :] = np.stack([dx, dy, dz], axis=-1)
        assert np.linalg.det(np.eye(3) + jacobian).min() > 0.5


def test_abdominal_wall_slides_instead_of_following_the_liver(sequence):
    labels, field = sequence.labels[3], sequence.displacement[3]
    wall = np.abs(field[..., 0][labels == LABELS["abdominal_wall"]])
    liver = np.abs(field[..., 0][labels == LABELS["parenchyma"]])
    assert np.median(wall) < 0.2 * np.median(liver)


def _warp_correlation(phantom, t):
    """(correlation of frame t with frame 0 resampled by frame t's true field, without it), inner region."""
    def image(array):
        result = sitk.GetImageFromArray(array.astype(np.float32))
        result.SetSpacing(phantom.spacing)
        return result

    transform = sitk.DisplacementFieldTransform(displacement_image(phantom, t))
    warped = sitk.GetArrayFromImage(sitk.Resample(image(phantom.bmode[0]), image(phantom.bmode[t]), transform,
                                                  sitk.sitkLinear, 0.0))
    inner = (slice(4, -4), slice(24, -24), slice(24, -24))
    return (np.corrcoef(warped[inner].ravel(), phantom.bmode[t][inner].ravel())[0, 1],
            np.corrcoef(phantom.bmode[0][inner].ravel(), phantom.bmode[t][inner].ravel())[0, 1])


def test_varied_conditions_keep_the_truth_exact_in_both_orientations():
    """Varied imaging and breathing, depth along j or i: the true field still maps frame 0 onto frame t;
    `draw_conditions` says what was drawn."""
    from us3d.phantom.varied import draw_conditions, simulate_conditions

    orientations = set()
    for seed in (9600, 9601, 9602, 9603):
        phantom = simulate_conditions("varied", 3, seed)
        orientations.add(phantom.depth_axis)
        setup, _, swapped = draw_conditions("varied", seed)
        assert phantom.depth_axis == ("i" if swapped else "j")
        assert phantom.setup.frequency_mhz == setup.frequency_mhz
        wall = phantom.labels[0] == LABELS["abdominal_wall"]
        # the wall lies at the top of the depth axis
        axis = 1 if phantom.depth_axis == "j" else 2
        assert np.nonzero(wall)[axis].mean() < 0.3 * wall.shape[axis]
        with_truth, without = _warp_correlation(phantom, 2)
        assert with_truth > 0.6 and with_truth > without + 0.4
    assert orientations == {"i", "j"}


def test_sector_geometry_attenuation_and_gain():
    from us3d.phantom import ImagingSetup

    sector = simulate_volume(1, ImagingSetup(sector_deg=60.0))
    mask = ImagingSetup(sector_deg=60.0).sector_mask().numpy()
    assert not mask[0, 0] and mask[0, 64] and mask[-1, 64]  # the top corners lie outside the fan
    assert (sector.bmode[0][:, ~mask] == 0).all() and (sector.echogenicity[0][:, ~mask] == 0).all()
    # attenuation without TGC darkens the deep parenchyma; full TGC gives the level back
    dark = simulate_volume(1, ImagingSetup(attenuation_db_cm_mhz=0.5, tgc=0.0))
    compensated = simulate_volume(1, ImagingSetup(attenuation_db_cm_mhz=0.5, tgc=1.0))
    plain = simulate_volume(1)
    deep = (plain.labels[0] == LABELS["parenchyma"]) & (np.arange(128)[None, :, None] > 80)
    assert dark.echogenicity[0][deep].mean() < plain.echogenicity[0][deep].mean() - 20
    assert abs(compensated.echogenicity[0][deep].mean() - plain.echogenicity[0][deep].mean()) < 1.0


def test_a_wall_that_follows_and_one_that_slides(sliding_16mm):
    from us3d.phantom import BreathingSettings

    follows = simulate_sequence(4, 2, breathing=BreathingSettings(sliding=False))
    slides = sliding_16mm
    for phantom, ratio in ((follows, 0.5), (slides, 0.2)):
        labels, field = phantom.labels[3], phantom.displacement[3]
        wall = np.median(np.abs(field[..., 0][labels == LABELS["abdominal_wall"]]))
        liver = np.median(np.abs(field[..., 0][labels == LABELS["parenchyma"]]))
        assert (wall > ratio * liver) if phantom is follows else (wall < ratio * liver)
    assert 14.0 < np.abs(slides.displacement[..., 0]).max() <= 16.0 * 1.3


def test_the_wall_slides_at_its_base_in_every_frame(sliding_16mm):
    """The sliding surface moves with the tissue: a wall that breathes 3-4 mm along depth keeps all of
    its tissue still along x, down to 1.5 mm above its base, and the liver 1.5 mm below it moves."""
    phantom = sliding_16mm
    labels, field = phantom.labels[3], phantom.displacement[3]
    margin = int(np.ceil(1.5 / phantom.spacing[1]))  # voxels along depth (j)
    wall = labels == LABELS["abdominal_wall"]
    inside = wall[:, :-margin] & wall[:, margin:]  # still wall 1.5 mm deeper
    below = (labels[:, margin:] == LABELS["parenchyma"]) & wall[:, :-margin]  # wall 1.5 mm higher
    assert np.abs(field[:, :-margin][inside][:, 0]).max() < 1.0
    assert np.abs(field[..., 1]).max() > 3.0  # the base moved along depth by more than the margin
    assert np.abs(field[:, margin:][below][:, 0]).min() > 3.0


def test_breathing_motion_is_the_sequence_s_truth_and_its_interface_can_be_made_sharp(sliding_16mm):
    """`breathing_motion` gives the displacement `simulate_sequence` stores; with `interface_width` 0 the
    field jumps from the wall's motion to the liver's at the base and is unchanged away from it."""
    import dataclasses as _dc

    from us3d.phantom import BreathingSettings, ImagingSetup, breathing_motion

    phantom, breathing = sliding_16mm, BreathingSettings(amplitude=16.0)
    grid = ImagingSetup().voxel_centres()
    smooth = breathing_motion(2, None, breathing).backward(grid, 3).numpy()
    np.testing.assert_array_equal(smooth, phantom.displacement[3])
    sharp = breathing_motion(2, None, _dc.replace(breathing, interface_width=0.0)).backward(grid, 3).numpy()
    change = np.abs(sharp - smooth)[..., 0]  # along x, the axis the liver slides along
    wall = phantom.labels[3] == LABELS["abdominal_wall"]
    depth = np.arange(wall.shape[1]).reshape(1, -1, 1)
    base = np.where(wall, depth, -1).max(axis=1, keepdims=True)  # the wall's lowest row in each column
    far = np.abs(depth - base) * phantom.spacing[1] > 3.0  # mm from the base
    assert change[far & (base >= 0)].max() < 0.01
    near = (np.abs(depth - base) <= 1) & (base >= 0)  # the rows next to the base: the smooth step's middle
    assert np.median(change[near]) > 2.0
    # the sharp field takes one of two values across the base in a column: the wall's or the liver's
    column = sharp[16, :, 64, 0]
    assert np.abs(np.diff(column)).max() > 10.0 and np.sort(np.abs(np.diff(column)))[-2] < 1.0


def test_a_shallow_field_of_view_still_simulates():
    """Lesion and vessel depths fall back to the middle of the liver when it is too thin to draw them
    (a varied setup with fine axial spacing failed with 'high - low < 0')."""
    import dataclasses as _dc

    from us3d.phantom import ImagingSetup, simulate_sequence

    setup = _dc.replace(ImagingSetup(), shape=(8, 48, 64), spacing=(0.4, 0.2, 0.8))
    phantom = simulate_sequence(1, 3, setup)
    assert phantom.bmode.shape == (1, 8, 48, 64) and phantom.bmode.std() > 0
