"""Patient coordinate conventions shared by the file, Slicer and field code.

ITK, SimpleITK and the files us3d writes use LPS (x to the patient's left, y posterior, z superior);
Slicer's scene uses RAS. The two differ by the sign of x and y, so one matrix converts either way.
"""

from __future__ import annotations

import numpy as np

#: RAS <-> LPS for points and direction columns (its own inverse): lps = LPS_FROM_RAS @ ras.
LPS_FROM_RAS = np.diag([-1.0, -1.0, 1.0])
RAS_FROM_LPS = LPS_FROM_RAS
