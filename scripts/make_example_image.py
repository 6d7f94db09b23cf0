#!/usr/bin/env python
"""Write examples/shapes.png: scene 248 of the synthetic task's held-out test split (seed 0).

The README's quickstart asks the trained tiny-shapes model "Where is the red square?" about it
(answer: top left; a green triangle, a yellow circle and the red square, two of them in the top band).

    python scripts/make_example_image.py [OUT.png]
"""
import sys
from pathlib import Path

from feather_export.quality.synthetic import make_sample

INDEX = 248


def main(argv: list[str]) -> int:
    out = Path(argv[0]) if argv else Path(__file__).resolve().parents[1] / "examples" / "shapes.png"
    sample = make_sample("test", INDEX, seed=0)
    sample.image().save(out, format="PNG")
    objects = ", ".join(f"{o.colour} {o.shape} ({o.region})" for o in sample.scene.objects)
    print(f"wrote {out}: test sample {INDEX}: {objects}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
