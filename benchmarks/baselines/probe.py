"""The baseline linear probe as a command: `python -m benchmarks.baselines.probe TRAIN TEST --size 96`.

Prints one JSON line: seconds, extract_seconds, accuracy, C, image_size.
"""

import argparse
import json

from benchmarks.baselines.plain import linear_probe

if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("train")
    p.add_argument("test")
    p.add_argument("--size", type=int, default=96)
    a = p.parse_args()
    print(json.dumps(linear_probe(a.train, a.test, a.size)))
