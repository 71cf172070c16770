"""One process of a 2-process run on localhost in which process 1 dies mid-epoch.

    python tests/lost_process_check.py PROCESS_ID PORT OUT_DIR

Both train scVI with a checkpoint every epoch (process 0 writes it). Once the
checkpoint holds two epochs, process 1 SIGKILLs itself a moment into the
next one, printing ``DYING <time>``. Process 0 prints ``STOPPED <time>
<error type>: <message>`` when training stops.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
import time
from pathlib import Path

TIMEOUT_S = 10  # lost_process_timeout_s of this run


def _die_in_epoch_three(ckpt: Path) -> None:
    while True:
        try:
            if len(json.loads((ckpt / "metadata.json").read_text())["loop"]["history"]) >= 2:
                break
        except (OSError, ValueError, KeyError):
            pass
        time.sleep(0.02)
    time.sleep(0.2)
    print(f"DYING {time.time()}", flush=True)
    os.kill(os.getpid(), signal.SIGKILL)


def main() -> int:
    pid, port, out = int(sys.argv[1]), int(sys.argv[2]), Path(sys.argv[3])
    import jaxscanvi as js
    from jaxscanvi import distributed

    distributed.initialize(
        f"localhost:{port}", num_processes=2, process_id=pid, lost_process_timeout_s=TIMEOUT_S
    )
    a = js.synthetic_atlas(
        n_cells=4000,
        n_genes=50,
        n_batches=2,
        n_lineages=1,
        types_per_lineage=2,
        seed=0,
        markers_per_type=5,
    )
    js.SCVI.setup_anndata(a, batch_key="batch")
    m = js.SCVI(a, n_hidden=16, n_latent=4)
    if pid == 1:
        threading.Thread(target=_die_in_epoch_three, args=(out / "ckpt",), daemon=True).start()
    try:
        m.train(max_epochs=100, batch_size=64, progress_bar=False, checkpoint_dir=out / "ckpt")
    except Exception as e:  # noqa: BLE001 - reported for the test
        print(f"STOPPED {time.time()} {type(e).__name__}: {e}", flush=True)
        return 1
    print("FINISHED", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
