"""Data for regedu: offline images, real-dataset readers, fetching and pair samplers.

Offline (shipped with the dependencies, no network):

- fundus: :func:`make_fire_pair` (FIRE-like S/P/A pairs of
  ``skimage.data.retina()`` with exact ground truth and control points),
  :func:`synthetic_fundus` (procedural retinas), :func:`retina_green`;
- brain: :func:`mni_brain` (MNI152 2009 + Desikan-Killiany, 30-structure
  FreeSurfer labels, :data:`MNI_NOTICE`), :func:`synth_subject`,
  :func:`donor_brain` (six Allen donors, affinely aligned), :func:`label_table`;
- realistic subjects: :func:`realistic_subject` (pose, real anatomy,
  deformation, intensity), :func:`complete_donor`, the split of anatomy
  (:data:`TRAIN_ANATOMY`, :data:`HELD_OUT_ANATOMY`), :func:`vxm_subject` (the
  held-out real scan on the template's grid);
- preprocessing as the paper's: :func:`preprocess` (affine pre-alignment to
  the atlas, intensity normalisation), :func:`normalise_intensity`.

Real datasets: :class:`FIRE`, :class:`NeuriteOASIS`, :class:`Learn2RegOASIS`,
:func:`load_vxm_scan`, :func:`load_vxm_labels`; downloads through
:func:`fetch` (``regedu fetch``), cached in ``REGEDU_DATA``.

Pair samplers (torch Datasets): :class:`FundusPairs`, :class:`BrainPairs`,
:class:`SubjectPairs`, :class:`FIREPairs`, :class:`RealisticPairs` (pre-aligned
realistic subjects, pooled on disk); the command line's :class:`PairFolder`
(a folder of image files) and :class:`OfflinePairs`.

Supervised pairs with a known field (RegNet, Sokooti et al. 2017):
:func:`regnet_field` (random points displaced, Gaussian-smoothed, coarse to
fine, maximum displacement bounded; one scale: :func:`point_field`) and
:class:`SyntheticPairs` (``disp`` is the label of the ``"field"`` loss).

Image files (NIfTI, ``.npy``, ``.npz``): :func:`read_image`, :func:`write_image`,
:func:`write_displacement` (:mod:`regedu.datasets.files`).
"""
from ._image import resize_image, resize_labels, scale_points
from .brain import (BRAIN_SHAPES, DONORS, MNI_NOTICE, Brain, donor_brain, donor_dice, label_table, mni_brain,
                    synth_subject, to_freesurfer)
from .fetch import (REGISTRY, ChecksumError, DatasetInfo, DataUnavailableError, UnsafeArchiveError,
                    cache_status, data_dir, fetch, is_cached, mirror_dir, safe_extract, verify_file)
from .fundus import (CATEGORIES, FIRE_SIZE, FundusPair, fire_lines, make_fire_pair, parse_fire_lines,
                     retina_green, synthetic_fundus, vessel_contrast)
from .files import read_image, write_displacement, write_image
from .freesurfer import FREESURFER_30, FREESURFER_NAMES, STRUCTURE_NAMES
from .prealign import Preprocessed, atlas_pair, normalise_intensity, preprocess
from .subjects import (ANATOMIES, COURSE_TEST_SETS, HELD_OUT_ANATOMY, TRAIN_ANATOMY, Misaligned, RealisticPairs,
                       anatomy, anatomy_split, complete_donor, course_test_sets, random_pose, realistic_subject,
                       vxm_subject)
from .readers import (FIRE, Learn2RegOASIS, NeuriteOASIS, load_vxm_labels,
                      load_vxm_scan, read_label_table)
from .samplers import BrainPairs, FIREPairs, FundusPairs, OfflinePairs, PairFolder, SubjectPairs, brain_slice
from .synthetic import REGNET_SCALES, SyntheticPairs, point_field, regnet_field

__all__ = [
    "resize_image", "resize_labels", "scale_points",
    "BRAIN_SHAPES", "DONORS", "MNI_NOTICE", "Brain", "donor_brain", "donor_dice", "label_table",
    "mni_brain", "synth_subject", "to_freesurfer",
    "REGISTRY", "ChecksumError", "DatasetInfo", "DataUnavailableError", "UnsafeArchiveError",
    "cache_status", "data_dir", "fetch", "is_cached", "mirror_dir", "safe_extract", "verify_file",
    "CATEGORIES", "FIRE_SIZE", "FundusPair", "fire_lines", "make_fire_pair", "parse_fire_lines",
    "retina_green", "synthetic_fundus", "vessel_contrast",
    "FREESURFER_30", "FREESURFER_NAMES", "STRUCTURE_NAMES",
    "FIRE", "Learn2RegOASIS", "NeuriteOASIS", "load_vxm_labels", "load_vxm_scan",
    "read_label_table",
    "read_image", "write_image", "write_displacement",
    "BrainPairs", "FIREPairs", "FundusPairs", "OfflinePairs", "PairFolder", "SubjectPairs", "brain_slice",
    "Preprocessed", "atlas_pair", "normalise_intensity", "preprocess",
    "ANATOMIES", "COURSE_TEST_SETS", "HELD_OUT_ANATOMY", "TRAIN_ANATOMY", "anatomy", "anatomy_split",
    "complete_donor", "course_test_sets",
    "random_pose", "realistic_subject", "vxm_subject", "RealisticPairs", "Misaligned",
    "REGNET_SCALES", "SyntheticPairs", "point_field", "regnet_field",
]
