"""Quality of the curation models on real labelled data, scored only on held-out folds.

Prints the refusal detector's accuracy (XSTest human labels) and the categoriser's macro-F1
(Equilibrate EHD/IHD/MHD labels), each next to its baseline.

    python bench/quality.py
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))


def main() -> dict:
    import quality_categoriser
    import quality_refusal

    print("== refusal detector ==")
    refusal = quality_refusal.main()
    print(json.dumps(refusal, indent=2))  # its main() returns the numbers without printing them
    print("\n== categoriser ==")
    categoriser = quality_categoriser.main()
    return {"refusal": refusal, "categoriser": categoriser}


if __name__ == "__main__":
    main()
