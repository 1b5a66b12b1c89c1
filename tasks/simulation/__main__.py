"""``python -m tasks.simulation --repo REPO --preset tiny|small|large [--seed N]``.

Creates (or fills) a butler repository with a simulated SimCam survey: instrument, skymap, visit
records, ``calexp``, ``src``, ``truth_sources``, ``truth_transients`` and ``truth_sky``.
"""

from __future__ import annotations

import argparse
import logging
import sys
from dataclasses import replace

from .presets import PRESETS, get_preset


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point; returns the process exit status."""
    parser = argparse.ArgumentParser(
        prog="python -m tasks.simulation",
        description="Fill a butler repository with a simulated SimCam survey (calexp, src and truth tables).",
    )
    parser.add_argument("--repo", required=True, help="Repository folder (created when missing).")
    parser.add_argument("--preset", default="tiny", choices=sorted(PRESETS), help="Survey preset (default: tiny).")
    parser.add_argument("--seed", type=int, default=None, help="Random seed (default: the preset's, 1).")
    parser.add_argument("--run", default=None, help="RUN collection (default: SimCam/sim/<preset>).")
    parser.add_argument("--bands", default=None, help="Comma-separated bands, e.g. g,r (default: the preset's).")
    parser.add_argument("-j", "--jobs", type=int, default=1, help="Worker processes (default 1).")
    parser.add_argument("-v", "--verbose", action="store_true", help="Log every visit-detector.")
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s"
    )

    from butler.errors import ButlerError

    from .survey import write_repository

    try:
        config = get_preset(args.preset)
        overrides = {}
        if args.seed is not None:
            overrides["seed"] = args.seed
        if args.bands:
            overrides["bands"] = tuple(b.strip() for b in args.bands.split(",") if b.strip())
        if overrides:
            config = replace(config, **overrides)
        summary = write_repository(args.repo, config, run=args.run, jobs=max(1, args.jobs))
    except (ButlerError, ValueError, KeyError) as exc:
        message = exc.args[0] if isinstance(exc, KeyError) and exc.args else exc
        print(f"error: {message}", file=sys.stderr)
        return 1
    steps = ", ".join(f"{k} {v:.1f}s" for k, v in summary["steps"].items())
    print(
        f"simulated preset {config.name} (seed {config.seed}) into {summary['repo']}: run {summary['run']}, "
        f"skymap {summary['skymap']}, {len(summary['visits'])} visits x {len(summary['detectors'])} detectors, "
        f"{summary['datasets_written']} datasets in {summary['seconds']:.1f} s ({steps})"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
