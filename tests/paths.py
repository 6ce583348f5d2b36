"""Where the real sample data lives: ``shared/data`` beside the repository checkout.

``MEDTUNING_SHARED_DATA`` overrides it. Tests that need these files skip when they are absent.
"""

from __future__ import annotations

import os
from pathlib import Path

SHARED_DATA = Path(
    os.environ.get("MEDTUNING_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data")
)
HIPPOCAMPUS = SHARED_DATA / "msd_hippocampus"
KITS_CT_SAMPLE = SHARED_DATA / "kits19_layout_ct_sample"
