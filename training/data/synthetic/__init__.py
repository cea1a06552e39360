"""Seeded synthetic chest radiographs and head CT series, written as real DICOM Part 10 files.

Why a generator: no public images or weights can be downloaded on our machines, yet every model the service
runs must be trained and honestly evaluated. The generator draws anatomically ordered pictures with the
findings the demonstration models look for, and writes them exactly as a modality would: DICOM files with
patient and study identifiers plus a ``labels.csv`` in the generic format that
:func:`training.data.formats.generic.load_generic` reads.

Modules, by what they draw:

- :mod:`.chest_anatomy`: body, lungs and their markings, heart, diaphragm, ribs, clavicles;
- :mod:`.chest_findings`: pneumothorax and nodules;
- :mod:`.chest_acquisition`: exposure, noise, stored values and VOI window;
- :mod:`.ct_anatomy`: skull, brain, ventricles, skull base;
- :mod:`.ct_hemorrhage`: hemorrhage types with their per-pixel masks;
- :mod:`.writer`: DICOM files, ``labels.csv``, the per-series hemorrhage masks, worker processes;
- :mod:`.common`: seeded UIDs, patients, soft steps and band-passed noise.

Determinism: every patient is drawn from its own generator seeded with ``(seed, kind, patient index)``, so
the same seed gives byte-identical pixel data, masks and labels whatever the number of worker processes.
"""

from training.data.synthetic.common import CT_LABELS, CXR_LABELS, GENERATOR_VERSIONS, MANUFACTURER
from training.data.synthetic.writer import MASK_FILE, generate_ct, generate_cxr, read_mask

__all__ = [
    "CT_LABELS",
    "CXR_LABELS",
    "GENERATOR_VERSIONS",
    "MANUFACTURER",
    "MASK_FILE",
    "generate_ct",
    "generate_cxr",
    "read_mask",
]
