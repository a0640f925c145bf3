"""Quality of the curation models on real labelled data, scored only on held-out rows.

Prints the refusal detector's accuracy (XSTest human labels) and the categoriser's macro-F1 (Equilibrate
EHD/IHD/MHD labels), each next to its baseline, then the leave-one-source-out tables for harm, refusal and group
(``bench/quality_loso.py``: every labelled folder of ``shared/data`` scored by a model fit without it, next to
in-distribution CV and a baseline), then the calibration of harm, refusal and group_confidence (``bench/calibration.py``:
reliability tables and expected calibration error on held-out rows). Returns the dicts.

    python bench/quality.py                       # everything (leave-one-source-out with the static embedder)
    python bench/quality.py --loso-only           # only the leave-one-source-out tables (~15 min on 2 cores)
    python bench/quality.py --no-loso             # only the two older in-distribution reports
    python bench/quality.py --embedder minilm     # leave-one-source-out with the shipped MiniLM (slow on CPU)
    python bench/quality.py --no-calibration      # without the reliability tables (MiniLM embeddings, ~3 min)
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))


def main(argv: list[str] | None = None) -> dict:
    argv = sys.argv[1:] if argv is None else argv
    results: dict = {}
    if "--loso-only" not in argv:
        import quality_categoriser
        import quality_refusal

        print("== refusal detector ==")
        results["refusal"] = quality_refusal.main()
        print(json.dumps(results["refusal"], indent=2))  # its main() returns the numbers without printing them
        print("\n== categoriser ==")
        results["categoriser"] = quality_categoriser.main()
    if "--no-loso" not in argv:
        import quality_loso

        print("\n== leave-one-source-out: harm, refusal, group ==")
        embedder = argv[argv.index("--embedder") + 1] if "--embedder" in argv else "static"
        results["leave_one_source_out"] = quality_loso.main(embedder)
    if "--no-calibration" not in argv and "--loso-only" not in argv:
        import calibration

        print("\n== calibration: reliability and expected calibration error on held-out rows ==")
        results["calibration"] = calibration.main(["--plot", "calibration.png"] if "--plot" in argv else [])
    return results


if __name__ == "__main__":
    main()
