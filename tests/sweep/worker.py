"""A sweep worker: reads one JSON job per line on stdin, writes one JSON result per line.

Runs as `python -m sweep.worker ROOT` with tests/ on the path; torch and transformers are
imported once and serve every job, one thread each (two workers share two cores).
"""

from __future__ import annotations

import gc
import json
import os
import sys
import warnings


def main() -> None:
    root = sys.argv[1]
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    warnings.filterwarnings("ignore")
    import torch
    import transformers

    torch.set_num_threads(1)
    transformers.logging.set_verbosity_error()
    from sweep.check import check

    gc.collect()
    gc.freeze()  # the imported modules never die: collections skip them (0.19 s -> ms each)

    out = sys.stdout
    sys.stdout = sys.stderr  # whatever a model prints stays off the result channel
    out.write(json.dumps({"ready": True}) + "\n")
    out.flush()
    for line in sys.stdin:
        job = json.loads(line)
        result = check(job["type"], job["class"], root)
        out.write(json.dumps({**job, **result}) + "\n")
        out.flush()


if __name__ == "__main__":
    main()
