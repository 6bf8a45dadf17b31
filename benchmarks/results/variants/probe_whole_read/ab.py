"""The probe rows' whole read, off and on, in the whole-run benchmark (docs/speed.md, "The probe rows read at once").

    python benchmarks/results/variants/probe_whole_read/ab.py off   # row-by-row reads (MAX_BULK_BYTES = 0)
    python benchmarks/results/variants/probe_whole_read/ab.py on    # the default
"""

import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "..", ".."))

import hf_ddlr._batches as batches  # noqa: E402

if sys.argv[1] == "off":
    batches.MAX_BULK_BYTES = 0
import wallclock  # noqa: E402

wallclock.main(["--tasks", "cnn", "--configs", "defaults", "--rounds", "3",
                "--output_dir", os.path.join("/tmp", f"hf_ddlr_probe_read_{sys.argv[1]}")])
