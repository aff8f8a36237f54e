"""FreeSurfer's vocabulary: the label numbers and names regedu's brains, readers and figures share.

- :data:`FREESURFER_NAMES`: FreeSurfer's lookup-table names of the labels
  regedu evaluates and a few neighbours (``17: "Left-Hippocampus"``);
- :data:`STRUCTURE_NAMES`: short names of the 30 structures the VoxelMorph
  and VV-Net papers score (``17: "L hippocampus"``), for tables and figures;
- :data:`FREESURFER_30`: those 30 labels, in the order of
  docs/conventions.md, "The 30 evaluation structures".
"""

__all__ = ["FREESURFER_NAMES", "STRUCTURE_NAMES", "FREESURFER_30"]

#: FreeSurfer's LUT names of the labels regedu evaluates (docs/conventions.md) and a few neighbours.
FREESURFER_NAMES = {
    0: "Unknown", 2: "Left-Cerebral-White-Matter", 3: "Left-Cerebral-Cortex",
    4: "Left-Lateral-Ventricle", 5: "Left-Inf-Lat-Vent", 7: "Left-Cerebellum-White-Matter",
    8: "Left-Cerebellum-Cortex", 10: "Left-Thalamus", 11: "Left-Caudate", 12: "Left-Putamen",
    13: "Left-Pallidum", 14: "3rd-Ventricle", 15: "4th-Ventricle", 16: "Brain-Stem",
    17: "Left-Hippocampus", 18: "Left-Amygdala", 24: "CSF", 26: "Left-Accumbens-area",
    28: "Left-VentralDC", 30: "Left-vessel", 31: "Left-choroid-plexus",
    41: "Right-Cerebral-White-Matter", 42: "Right-Cerebral-Cortex",
    43: "Right-Lateral-Ventricle", 44: "Right-Inf-Lat-Vent", 46: "Right-Cerebellum-White-Matter",
    47: "Right-Cerebellum-Cortex", 49: "Right-Thalamus", 50: "Right-Caudate", 51: "Right-Putamen",
    52: "Right-Pallidum", 53: "Right-Hippocampus", 54: "Right-Amygdala",
    58: "Right-Accumbens-area", 60: "Right-VentralDC", 62: "Right-vessel",
    63: "Right-choroid-plexus", 77: "WM-hypointensities", 85: "Optic-Chiasm",
}
#: Short names of the 30 FreeSurfer structures of the VV-Net/VoxelMorph evaluation.
STRUCTURE_NAMES = {
    2: "L cerebral WM", 3: "L cerebral cortex", 4: "L lateral ventricle", 7: "L cerebellum WM",
    8: "L cerebellum cortex", 10: "L thalamus", 11: "L caudate", 12: "L putamen", 13: "L pallidum",
    14: "3rd ventricle", 15: "4th ventricle", 16: "brainstem", 17: "L hippocampus",
    18: "L amygdala", 24: "CSF", 28: "L ventral DC", 31: "L choroid plexus", 41: "R cerebral WM",
    42: "R cerebral cortex", 43: "R lateral ventricle", 46: "R cerebellum WM",
    47: "R cerebellum cortex", 49: "R thalamus", 50: "R caudate", 51: "R putamen", 52: "R pallidum",
    53: "R hippocampus", 54: "R amygdala", 60: "R ventral DC", 63: "R choroid plexus",
}

#: The 30 FreeSurfer structures of the VoxelMorph and VV-Net evaluations.
FREESURFER_30 = tuple(STRUCTURE_NAMES)
