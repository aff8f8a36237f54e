"""What can be downloaded: one record per dataset, with its terms and citation.

Checksums are the ones the hosts publish (md5 for neurite-oasis) or a sha256
of a known-good copy. A record without a checksum is marked ``manual``: the
user downloads it by hand after accepting its terms and regedu only checks that
the file is the kind of archive it claims to be.
"""
from __future__ import annotations

from dataclasses import dataclass, field

__all__ = ["DatasetInfo", "REGISTRY"]

_VXM_COMMIT = "860b4887354d2ebe5e6e70f62c5aaecf11945a1e"
_VXM_RAW = f"https://raw.githubusercontent.com/voxelmorph/voxelmorph/{_VXM_COMMIT}/data"


@dataclass(frozen=True)
class DatasetInfo:
    """One downloadable file.

    Attributes
    ----------
    name : str
        Registry key (``regedu fetch NAME``).
    url : str
        Where it is downloaded from.
    filename : str
        Name of the file in the cache and in a mirror folder.
    sha256, md5 : str or None
        Expected checksum (hex). At most one is needed; ``sha256`` wins.
    size : int or None
        Size in bytes when known exactly (a wrong size fails before hashing).
    approx_size : str
        Human-readable size for listings.
    license : str
        License or terms of use, in one line; the dataset card has the rest.
    citation : str
        What to cite.
    extract : bool
        Unpack the archive next to it after verification.
    manual : bool
        No checksum is published: the file must be put in place by hand.
    card : str
        The dataset card, relative to the repository's ``datasets/`` folder.
    """

    name: str
    url: str
    filename: str
    sha256: str | None = None
    md5: str | None = None
    size: int | None = None
    approx_size: str = ""
    license: str = ""
    citation: str = ""
    extract: bool = False
    manual: bool = False
    card: str = ""
    notes: tuple[str, ...] = field(default_factory=tuple)

    @property
    def checksum(self) -> tuple[str, str] | None:
        """``(algorithm, hexdigest)`` or None."""
        if self.sha256:
            return "sha256", self.sha256.lower()
        if self.md5:
            return "md5", self.md5.lower()
        return None


_OASIS_TERMS = ("OASIS data use agreement (oasis-brains.org): research use, no re-identification, "
                "acknowledge OASIS (P50 AG05681, P01 AG03991, ...) in publications")

REGISTRY: dict[str, DatasetInfo] = {d.name: d for d in [
    DatasetInfo(
        name="vxm-test-scan",
        url=f"{_VXM_RAW}/test_scan.npz",
        filename="test_scan.npz",
        sha256="32b14f2d7027518d9b3689ca0bdb908a1ed402db1a61ff2eb4c8184a475b12e0",
        size=3616674, approx_size="3.6 MB",
        license="Apache-2.0 (voxelmorph repository); the scan comes from OASIS, whose terms apply",
        citation="Balakrishnan et al., VoxelMorph, IEEE TMI 38(8), 2019",
        card="voxelmorph-test-scan.md"),
    DatasetInfo(
        name="vxm-labels",
        url=f"{_VXM_RAW}/labels.npz",
        filename="labels.npz",
        sha256="23d42ff4572fbd87d9d3bb08c36cf5996e49a76a148a3729b765313b3e024beb",
        size=261, approx_size="261 B",
        license="Apache-2.0 (voxelmorph repository)",
        citation="Balakrishnan et al., VoxelMorph, IEEE TMI 38(8), 2019",
        card="voxelmorph-test-scan.md"),
    DatasetInfo(
        name="fire",
        url="https://projects.ics.forth.gr/cvrl/fire/FIRE.7z",
        filename="FIRE.7z",
        sha256="4f164d89a572d88a5f46bf7fe433813a21561163c83481d6e101573621f79700",
        size=276589879, approx_size="264 MB",
        license="research use (FORTH); no redistribution",
        citation=("Hernandez-Matas et al., FIRE: Fundus Image Registration Dataset, "
                  "Journal for Modeling in Ophthalmology 1(4):16-28, 2017"),
        extract=True, card="fire.md",
        notes=("The sha256 was recorded from a download of the official archive, "
               "not published by FORTH.",)),
    DatasetInfo(
        name="neurite-oasis-2d",
        url="https://surfer.nmr.mgh.harvard.edu/ftp/data/neurite/data/neurite-oasis.2d.v1.0.tar",
        filename="neurite-oasis.2d.v1.0.tar",
        md5="c9ae5864f250c7e4b8d83a104e51ae8e", approx_size="24 MB",
        license=_OASIS_TERMS,
        citation=("Marcus et al., OASIS, J Cogn Neurosci 19(9), 2007; Hoopes et al., "
                  "HyperMorph, IPMI 2021"),
        extract=True, card="neurite-oasis.md"),
    DatasetInfo(
        name="neurite-oasis-3d",
        url="https://surfer.nmr.mgh.harvard.edu/ftp/data/neurite/data/neurite-oasis.v1.0.tar",
        filename="neurite-oasis.v1.0.tar",
        md5="081392a8150ff99ab7a64a9ded377835", approx_size="6.6 GB",
        license=_OASIS_TERMS,
        citation=("Marcus et al., OASIS, J Cogn Neurosci 19(9), 2007; Hoopes et al., "
                  "HyperMorph, IPMI 2021; Balakrishnan et al., VoxelMorph, IEEE TMI 2019"),
        extract=True, card="neurite-oasis.md"),
    DatasetInfo(
        name="learn2reg-oasis",
        url="https://learn2reg.grand-challenge.org/Datasets/",
        filename="OASIS.zip",
        approx_size="1.5 GB",
        license=_OASIS_TERMS + "; Learn2Reg challenge terms",
        citation=("Hering et al., Learn2Reg, IEEE TMI 42(3), 2023; Marcus et al., OASIS, 2007; "
                  "Hoopes et al., HyperMorph, IPMI 2021"),
        extract=True, manual=True, card="learn2reg-oasis.md",
        notes=("Download OASIS.zip from the Learn2Reg page after accepting its terms.",)),
]}
