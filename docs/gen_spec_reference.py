"""Write docs/spec.md, the sweep-spec reference, from the spec models (orchestrator/spec_doc.py).

    python docs/gen_spec_reference.py            # rewrite docs/spec.md
    python docs/gen_spec_reference.py --check    # exit 1 when docs/spec.md is stale (a test runs it)
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from orchestrator.spec_doc import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
